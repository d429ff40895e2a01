"""ctxkv's side of a benchmark: the job run through ctxkv's own raw I/O path (Device,
BufferPool, Ring), the path the store uses, with one thread and one ring per job."""

from __future__ import annotations

import contextlib
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.bench.job import Job
from engine.bench.result import RunResult
from engine.io.buffers import PAGE_BYTES, BufferPool
from engine.io.ring import Op, Progress, Ring, monotonic_ns
from engine.nvme.device import Device

# Called about twice a second with (bytes done, seconds elapsed) while a run goes on.
ProgressCallback = Callable[[int, float], None]
PROGRESS_INTERVAL_S = 0.5


@dataclass
class _ThreadOutcome:
    lat_ns: np.ndarray
    io_bytes: int
    start_ns: int
    end_ns: int
    usr_cpu_ns: int
    sys_cpu_ns: int
    setup_flags: list[str]
    error: BaseException | None = None


def region_bytes(job: Job, devices: list[Device]) -> int:
    """Bytes of each target the job covers: size split over the targets, whole blocks."""
    smallest = min(device.geometry.capacity_bytes for device in devices)
    share = smallest if job.size_bytes is None else job.size_bytes // len(devices)
    if share > smallest:
        raise ValueError(
            f"size {job.size_bytes} asks for {share} bytes of each target, but "
            f"{min(devices, key=lambda d: d.geometry.capacity_bytes).path} holds {smallest}"
        )
    share -= share % job.block_bytes
    if share == 0:
        raise ValueError(f"the targets hold no whole block of {job.block_bytes} bytes")
    return share


def build_ios(
    job: Job,
    job_index: int,
    region: int,
    ntargets: int,
    pool: BufferPool,
    buffer_indexes: list[int],
) -> np.ndarray:
    """Every I/O of one pass over the region, round-robin over the targets, as fio's
    file_service_type=roundrobin does. Random jobs visit each block once, in a seeded
    random order (fio's random map)."""
    blocks = region // job.block_bytes
    rng = np.random.default_rng(job_index)
    per_target = [
        rng.permutation(blocks) if job.is_random else np.arange(blocks) for _ in range(ntargets)
    ]
    count = blocks * ntargets
    ios = Ring.batch(count)
    sequence = np.arange(count)
    ios["file_index"] = sequence % ntargets
    ios["offset"] = np.stack(per_target, axis=1).reshape(-1).astype(np.uint64) * job.block_bytes
    # The bench never looks at the bytes, so I/Os may share a buffer; each I/O still
    # reads or writes a whole registered buffer, as a store I/O does.
    slot = np.array(buffer_indexes, dtype=np.uint64)[sequence % len(buffer_indexes)]
    ios["buf_index"] = slot
    ios["addr"] = pool.arena_address + slot * pool.buffer_bytes
    ios["nbytes"] = job.block_bytes
    ios["opcode"] = Op.READ if job.is_read else Op.WRITE
    return ios


def thread_cpu_ns() -> tuple[int, int]:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return round(usage.ru_utime * 1e9), round(usage.ru_stime * 1e9)


def _run_one_job(
    job: Job,
    job_index: int,
    devices: list[Device],
    pool: BufferPool,
    buffer_indexes: list[int],
    region: int,
    progress: Progress,
    outcome: list[_ThreadOutcome],
) -> None:
    try:
        ios = build_ios(job, job_index, region, len(devices), pool, buffer_indexes)
        with Ring(devices, pool, entries=max(64, 4 * job.iodepth)) as ring:
            latencies: list[np.ndarray] = []
            io_bytes = 0
            usr_before, sys_before = thread_cpu_ns()
            start_ns = monotonic_ns()
            deadline_ns = start_ns + round(job.runtime_s * 1e9) if job.runtime_s else 0
            while True:
                done = ring.run(ios, depth=job.iodepth, deadline_ns=deadline_ns, progress=progress)
                latencies.append(done["complete_ns"] - done["submit_ns"])
                io_bytes += int(done["result"].sum())
                if not job.time_based or len(done) < len(ios) or progress.cancelled:
                    break
            end_ns = monotonic_ns()
            usr_after, sys_after = thread_cpu_ns()
            outcome.append(
                _ThreadOutcome(
                    lat_ns=np.concatenate(latencies),
                    io_bytes=io_bytes,
                    start_ns=start_ns,
                    end_ns=end_ns,
                    usr_cpu_ns=usr_after - usr_before,
                    sys_cpu_ns=sys_after - sys_before,
                    setup_flags=ring.setup_flag_names,
                )
            )
    except BaseException as error:  # re-raised by the main thread
        outcome.append(_ThreadOutcome(np.empty(0), 0, 0, 0, 0, 0, [], error=error))


def run_raw(job: Job, on_progress: ProgressCallback | None = None) -> RunResult:
    """Runs job through ctxkv's raw path; returns what it measured."""
    with contextlib.ExitStack() as stack:
        devices = [
            stack.enter_context(Device.open(target, writable=not job.is_read, io_path=job.io_path))
            for target in job.targets
        ]
        region = region_bytes(job, devices)
        buffer_bytes = -(-job.block_bytes // PAGE_BYTES) * PAGE_BYTES
        pool = stack.enter_context(BufferPool(buffer_bytes, job.iodepth * job.numjobs))
        leases = [pool.lease() for _ in range(pool.count)]
        for lease in leases:
            stack.callback(lease.release)
        if not job.is_read:
            # Incompressible bytes, so no layer below can cheat by compressing zeros.
            fill = np.random.default_rng(0).integers(0, 256, buffer_bytes, dtype=np.uint8)
            for lease in leases:
                lease.array[:] = fill

        progresses = [Progress() for _ in range(job.numjobs)]
        outcomes: list[_ThreadOutcome] = []
        threads = [
            threading.Thread(
                target=_run_one_job,
                name=f"ctxkv-bench-{index}",
                args=(
                    job,
                    index,
                    devices,
                    pool,
                    [
                        lease.index
                        for lease in leases[index * job.iodepth : (index + 1) * job.iodepth]
                    ],
                    region,
                    progresses[index],
                    outcomes,
                ),
            )
            for index in range(job.numjobs)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(PROGRESS_INTERVAL_S)
                    if on_progress is not None:
                        on_progress(
                            sum(p.bytes_done for p in progresses), time.monotonic() - started
                        )
        except KeyboardInterrupt:
            for progress in progresses:
                progress.cancel()
            for thread in threads:
                thread.join()
            raise
        assert len(outcomes) == job.numjobs
        for outcome in outcomes:
            if outcome.error is not None:
                raise outcome.error
        first_device = devices[0].geometry
        return RunResult.from_latencies(
            engine="ctxkv",
            direction=job.direction,
            io_bytes=sum(o.io_bytes for o in outcomes),
            runtime_ns=max(o.end_ns for o in outcomes) - min(o.start_ns for o in outcomes),
            lat_ns=np.concatenate([o.lat_ns for o in outcomes]),
            usr_cpu_ns=sum(o.usr_cpu_ns for o in outcomes),
            sys_cpu_ns=sum(o.sys_cpu_ns for o in outcomes),
            extra={
                "ring_setup_flags": outcomes[0].setup_flags,
                "pool_backing": pool.backing,
                "chunk_bytes": first_device.max_transfer_bytes,
                "io_path": devices[0].io_path,
            },
        )
