"""The store's side of a benchmark (`ctxkv bench --mode store`): puts or gets of values
of one extent (bs) through engine.Store, one thread per job, with the store keeping
iodepth I/Os in flight (its queue_depth) so the device sees fio's iodepth. Gets stream
every value through one read_iter per pass, as an inference engine's get of a whole
prefix would; a get's latency is the caller's wait for each value. Puts go in
put_many calls of BATCH_PER_DEPTH * iodepth values unless told otherwise, each call
durable as a whole when it returns (a call of every value of a size-based job is durable
once, at its end, as fio's end_fsync job is); a put's latency is its call's. Formats the
targets: everything on them is lost."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np

from engine.bench.job import Job
from engine.bench.raw import PROGRESS_INTERVAL_S, ProgressCallback, thread_cpu_ns
from engine.bench.result import RunResult
from engine.io.ring import monotonic_ns
from engine.store.store import STRICT, Store

FILL_FRACTION = 0.9  # of the store's slots, so reads never meet an eviction
BATCH_PER_DEPTH = 8
# A time-based read streams about this many values per read_iter: planning every key
# up front costs ~5 us a key, so a big store's keys are not repeated sixteen times.
TIME_BASED_STREAM_VALUES = 4096


def value_count(job: Job, store: Store) -> int:
    slots = store.stats()["slots"]
    wanted = slots if job.size_bytes is None else job.size_bytes // job.block_bytes
    return max(BATCH_PER_DEPTH * job.iodepth, min(wanted, int(slots * FILL_FRACTION)))


def read_stream(
    store: Store, keys: list[bytes], latencies: list[int], deadline_ns: int
) -> tuple[int, int]:
    """Reads keys through one read_iter, adding the wait for each value to latencies,
    until the deadline (monotonic ns, 0 for none): (values read, when the last came)."""
    got = asked = monotonic_ns()
    read = 0
    with contextlib.closing(store.read_iter(keys)) as values:
        for lease in values:
            got = monotonic_ns()
            latencies.append(got - asked)
            assert lease is not None, "a bench value went missing"
            lease.release()
            read += 1
            if deadline_ns and got >= deadline_ns:
                break
            asked = monotonic_ns()
    return read, got


def run_store(
    job: Job,
    on_progress: ProgressCallback | None = None,
    durability: str = STRICT,
    values_per_call: int | None = None,
) -> RunResult:
    """values_per_call: put_many's batch for write jobs (default BATCH_PER_DEPTH * iodepth)."""
    if values_per_call is None:
        values_per_call = BATCH_PER_DEPTH * job.iodepth
    if values_per_call <= 0:
        raise ValueError(f"values per call must be positive, got {values_per_call}")
    store = Store.format(
        job.targets, extent_size=job.block_bytes, force=True,
        pool_buffers=BATCH_PER_DEPTH * job.iodepth * job.numjobs + 2, durability=durability,
        io_path=job.io_path, queue_depth=job.iodepth,
    )  # fmt: skip
    with store:
        count = value_count(job, store)
        value = np.random.default_rng(0).integers(0, 256, job.block_bytes, dtype=np.uint8).tobytes()
        keys = [f"bench-{i}".encode() for i in range(count)]
        if job.is_read:
            batch = BATCH_PER_DEPTH * job.iodepth
            for start in range(0, count, batch):
                store.put_many([(key, value) for key in keys[start : start + batch]])
        done_bytes = [0] * job.numjobs
        outcomes: list[tuple] = []
        errors: list[BaseException] = []
        deadline_ns = monotonic_ns() + round(job.runtime_s * 1e9) if job.runtime_s else 0

        def one_job(index: int) -> None:
            try:
                latencies = []
                order = (
                    np.random.default_rng(index).permutation(count)
                    if job.is_random
                    else range(count)
                )
                mine = [keys[i] for i in order]
                usr0, sys0 = thread_cpu_ns()
                start_ns = monotonic_ns()
                position = 0
                last_value_ns = 0
                while True:
                    if job.is_read:
                        # A time-based job streams its keys over and over through one
                        # read_iter, as fio wraps around its region, rather than draining
                        # the queue at the end of every pass.
                        passes = -(-TIME_BASED_STREAM_VALUES // len(mine)) if job.time_based else 1
                        done, last_value_ns = read_stream(
                            store, mine * passes, latencies, deadline_ns
                        )
                        done_bytes[index] += done * job.block_bytes
                        if not job.time_based or (deadline_ns and last_value_ns >= deadline_ns):
                            break
                        continue
                    batch = mine[position : position + values_per_call]
                    began = monotonic_ns()
                    store.put_many([(key, value) for key in batch])
                    ended = monotonic_ns()
                    latencies.extend([ended - began] * len(batch))
                    done_bytes[index] += len(batch) * job.block_bytes
                    position += len(batch)
                    if position >= len(mine):
                        if not job.time_based:
                            break
                        position = 0
                    if deadline_ns and ended >= deadline_ns:
                        break
                # A read's clock stops at the last value delivered: what the stream read
                # ahead past the deadline is waited for and given back unread, where fio
                # counts the bytes of the I/O it drains as well as their time.
                end_ns = last_value_ns if job.is_read else monotonic_ns()
                usr1, sys1 = thread_cpu_ns()
                lat_ns = np.array(latencies, dtype=np.int64)
                outcomes.append(
                    (lat_ns, done_bytes[index], start_ns, end_ns, usr1 - usr0, sys1 - sys0)
                )
            except BaseException as error:
                errors.append(error)

        threads = [
            threading.Thread(target=one_job, args=(i,), name=f"ctxkv-store-bench-{i}")
            for i in range(job.numjobs)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(PROGRESS_INTERVAL_S)
                if on_progress is not None:
                    on_progress(sum(done_bytes), time.monotonic() - started)
        if errors:
            raise errors[0]
        stats = store.stats()
        return RunResult.from_latencies(
            engine="ctxkv-store",
            direction=job.direction,
            io_bytes=sum(o[1] for o in outcomes),
            runtime_ns=max(o[3] for o in outcomes) - min(o[2] for o in outcomes),
            lat_ns=np.concatenate([o[0] for o in outcomes]),
            usr_cpu_ns=sum(o[4] for o in outcomes),
            sys_cpu_ns=sum(o[5] for o in outcomes),
            extra={
                "values": count,
                "values_per_call": None if job.is_read else min(values_per_call, count),
                "durability": durability,
                "journal_commits": stats["journal_commits"],
                "pool_backing": stats["pool_backing"],
            },
        )
