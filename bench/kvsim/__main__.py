"""kvsim: one workload trace replayed, interleaved, on ctxkv in-process, ctxkv serve,
LMCache's local disk backend, LMCache's lm:// server and LMCache with the ctxkv plugin,
with fio on the same file as the physical limit; then a sweep of extent sizes.

    .venv/bin/python -m bench.kvsim [--model llama-3-8b] [--requests 72] [--segments 4]

Writes bench/results/kvsim.json and three PNGs there, and prints the comparison table.
Interleaving: the trace is cut into segments and every system replays a segment before
any replays the next (order rotated per segment), with fio runs between segments, so a
noisy minute on this shared machine lands on all of them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import hugepages_reserved
from bench.kvsim import plots
from bench.kvsim.models import MODELS, Model, gpu_seconds
from bench.kvsim.replay import Payloads, TierRecord, replay
from bench.kvsim.tiers import (
    CtxkvInProcess,
    CtxkvServer,
    LMCacheServerProcess,
    LMCacheTier,
    Tier,
    format_store,
    lmcache_config,
)
from bench.kvsim.workload import WorkloadShape, make_trace, working_set_chunks
from engine.bench.fio import HUGEPAGE_BYTES, fio_buffer_bytes, run_fio
from engine.bench.job import Job
from engine.store.store import Store

MiB, GiB = 1 << 20, 1 << 30
RESULTS = Path(__file__).resolve().parents[1] / "results"
FIO_RUNTIME_S = 2.0
FIO_HUGEPAGES = 64  # headroom over fio's own buffers, which get hugepages as ctxkv's pool does
LMCACHE_DISK = "LMCache local disk"
LMCACHE_LM = "LMCache lm:// server"
PLUGIN = "LMCache + ctxkv plugin"


def fio(target: Path, rw: str, block_bytes: int, iodepth: int) -> dict:
    job = Job(
        targets=(str(target),),
        rw=rw,
        block_bytes=block_bytes,
        iodepth=iodepth,
        runtime_s=FIO_RUNTIME_S,
        time_based=True,
    )
    # fio's buffers plus headroom: other processes on this machine (ctxkv pools among
    # them) may take free hugepages between fio's check and its allocation; then retry.
    pages = fio_buffer_bytes(job) // HUGEPAGE_BYTES + FIO_HUGEPAGES
    for attempt in range(3):
        try:
            with hugepages_reserved(pages):
                result = run_fio(job)
            break
        except RuntimeError as error:
            if "huge pages" not in str(error) or attempt == 2:
                raise
    return {
        "mibps": result.bw_bytes / MiB,
        "lat_ms": {p: ns / 1e6 for p, ns in result.lat_ns_percentile.items()},
    }


def percentile_ms(values_ns: list[float], percentile: float) -> float:
    return float(np.percentile(values_ns, percentile)) / 1e6 if values_ns else float("nan")


def summarise(record: TierRecord) -> dict:
    return {
        "system": record.name,
        "hit_ratio": record.hit_chunks / max(record.context_chunks, 1),
        "hit_chunks": record.hit_chunks,
        "context_chunks": record.context_chunks,
        "bytes_served": record.bytes_served,
        "bytes_written": record.bytes_written,
        "chunk_reads": len(record.get_latency_ns),
        "get_ms_p50": percentile_ms(record.get_latency_ns, 50),
        "get_ms_p99": percentile_ms(record.get_latency_ns, 99),
        "get_ms_p999": percentile_ms(record.get_latency_ns, 99.9),
        "put_ms_per_chunk_p50": percentile_ms(record.put_latency_ns, 50),
        "put_ms_per_chunk_p99": percentile_ms(record.put_latency_ns, 99),
        "lookup_ms_p50": percentile_ms(record.lookup_latency_ns, 50),
        "throughput_mibps": (record.bytes_served + record.bytes_written)
        / MiB
        / (record.busy_ns / 1e9),
        "read_mibps": record.bytes_served / MiB / max(record.read_ns / 1e9, 1e-9),
        "write_mibps": record.bytes_written / MiB / max(record.write_ns / 1e9, 1e-9),
        "prefill_pflops_avoided": record.flops_avoided / 1e15,
        "h100_seconds_avoided": gpu_seconds(record.flops_avoided),
        "chunks_held_before_restart": record.held_before_restart,
        "chunks_held_after_restart": record.held_after_restart,
        "restart_s": record.restart_s,
    }


def extent_sweep(directory: Path, chunk_bytes: int, extents_mib: list[int], chunks: int) -> list:
    """Whole chunks put and got on stores of each extent size, and fio on the same file
    with the I/O ctxkv issues for a chunk: extent-sized blocks, chunk/extent deep."""
    target, rows = directory / "sweep.img", []
    size = max(512 * MiB, (chunks + 4) * chunk_bytes * 5 // 4)
    payloads = Payloads(chunk_bytes, chunks, seed=2)
    keys = [f"sweep-{i}".encode().ljust(16, b".") for i in range(chunks)]
    for extent_mib in extents_mib:
        extent = extent_mib * MiB
        format_store(target, size, extent, chunk_bytes)
        depth = max(1, min(32, chunk_bytes // extent))
        with Store.open([target], pool_buffers=max(8, chunk_bytes // extent)) as store:
            started = time.perf_counter()
            store.put_many(list(zip(keys, payloads.stamped(keys), strict=True)))
            put_s = time.perf_counter() - started
            started = time.perf_counter()
            for key in keys:
                store.read(key).release()
            get_s = time.perf_counter() - started
        rows.append(
            {
                "extent_mib": extent_mib,
                "iodepth": depth,
                "ctxkv_put_mibps": chunks * chunk_bytes / MiB / put_s,
                "ctxkv_get_mibps": chunks * chunk_bytes / MiB / get_s,
                "fio_read_mibps": fio(target, "randread", extent, depth)["mibps"],
                "fio_write_mibps": fio(target, "randwrite", extent, depth)["mibps"],
            }
        )
    target.unlink()
    return rows


def table(rows: list[dict], fio_summary: dict) -> str:
    by_name = {row["system"]: row for row in rows}
    header = (
        "| system | hit ratio | GiB served | get ms p50 / p99 / p99.9 | MiB/s (busy) "
        "| read / fio | get p50 / fio | write / fio | vs LMCache disk | vs lm:// "
        "| prefill avoided PFLOP (H100 s) | chunks kept by a restart |"
    )
    lines = [header, "|" + "---|" * 12]
    for row in rows:
        disk = by_name[LMCACHE_DISK]["throughput_mibps"]
        lm = by_name[LMCACHE_LM]["throughput_mibps"]
        lines.append(
            f"| {row['system']} | {row['hit_ratio']:.3f} | {row['bytes_served'] / GiB:.1f} "
            f"| {row['get_ms_p50']:.1f} / {row['get_ms_p99']:.1f} / {row['get_ms_p999']:.1f} "
            f"| {row['throughput_mibps']:.0f} "
            f"| {row['read_mibps'] / fio_summary['read_mibps']:.2f} "
            f"| {row['get_ms_p50'] / fio_summary['chunk_read_ms_p50']:.2f} "
            f"| {row['write_mibps'] / fio_summary['write_mibps']:.2f} "
            f"| {row['throughput_mibps'] / disk:.2f} | {row['throughput_mibps'] / lm:.2f} "
            f"| {row['prefill_pflops_avoided']:.1f} ({row['h100_seconds_avoided']:.2f}) "
            f"| {row['chunks_held_after_restart']} of {row['chunks_held_before_restart']} |"
        )
    lines.append(
        f"| fio (same file) | | | {fio_summary['chunk_read_ms_p50']:.1f} / "
        f"{fio_summary['chunk_read_ms_p99']:.1f} / {fio_summary['chunk_read_ms_p999']:.1f} "
        f"| read {fio_summary['read_mibps']:.0f}, write {fio_summary['write_mibps']:.0f} "
        "| 1 | 1 | 1 | | | | |"
    )
    return "\n".join(lines)


def run_systems(
    directory: Path,
    trace: list,
    model: Model,
    chunk_tokens: int,
    extent: int,
    durability: str,
    capacity: int,
    segments: int,
) -> tuple[list[str], dict[str, TierRecord], list[dict]]:
    """Every system replays the trace, segment by segment, with fio after each segment."""
    chunk_bytes = model.chunk_bytes(chunk_tokens)
    longest = max(len(r.chunk_keys) for r in trace)
    scratch = directory / "fio-write.img"
    cpu_buffer = (longest + 4) * chunk_bytes
    plugin_server = lm_server = None
    tiers: list[Tier] = []
    try:
        tiers.append(CtxkvInProcess(directory / "inprocess.img", chunk_bytes, extent, durability))
        tiers.append(CtxkvServer(directory / "serve.img", chunk_bytes, extent, durability))
        disk_config = lmcache_config(
            chunk_tokens,
            cpu_buffer,
            local_disk=f"file://{directory}/lmcache-disk/",
            max_local_disk_size=capacity / GiB,
            extra_config={"use_odirect": True},
        )
        tiers.append(LMCacheTier(LMCACHE_DISK, lambda: disk_config, model, chunk_tokens))
        lm_server = LMCacheServerProcess()

        def lm_config() -> dict:
            url = f"lm://127.0.0.1:{lm_server.port}"
            return lmcache_config(chunk_tokens, cpu_buffer, remote_url=url)

        tiers.append(LMCacheTier(LMCACHE_LM, lm_config, model, chunk_tokens, lm_server))
        plugin_server = CtxkvServer(directory / "plugin.img", chunk_bytes, extent, durability)

        def plugin_config() -> dict:
            return lmcache_config(
                chunk_tokens,
                cpu_buffer,
                remote_storage_plugins=["ctxkv"],
                extra_config={
                    "remote_storage_plugin.ctxkv.module_path": "engine.integrations.lmcache",
                    "remote_storage_plugin.ctxkv.class_name": "CtxkvConnectorAdapter",
                    "remote_storage_plugin.ctxkv.url": f"ctxkv://{plugin_server.address}",
                },
            )

        tiers.append(LMCacheTier(PLUGIN, plugin_config, model, chunk_tokens, backing=plugin_server))

        records = {tier.name: TierRecord(tier.name) for tier in tiers}
        payloads = Payloads(chunk_bytes, longest)
        fio_runs: list[dict] = []
        bounds = np.linspace(0, len(trace), segments + 1).astype(int)
        for index, (start, end) in enumerate(itertools.pairwise(bounds)):
            order = tiers[index % len(tiers) :] + tiers[: index % len(tiers)]
            for tier in order:
                replay(tier, trace[start:end], records[tier.name], payloads, model, chunk_tokens)
            fio_runs.append(
                {
                    "chunk_read": fio(directory / "inprocess.img", "randread", chunk_bytes, 1),
                    "read": fio(directory / "inprocess.img", "randread", extent, 8),
                    "write": fio(scratch, "randwrite", extent, 8),
                }
            )
            print(f"  segment {index + 1}/{segments} done", flush=True)
        # Warm restart: what each system still holds after being stopped and started.
        working_set = sorted({key for request in trace for key in request.chunk_keys})
        for tier in tiers:
            record = records[tier.name]
            record.held_before_restart = tier.holds(working_set)
            started = time.perf_counter()
            tier.restart()
            record.restart_s = time.perf_counter() - started
            kept = [key for key in working_set if tier.holds([key])]
            for key in kept:  # every chunk kept is read back and its stamp checked
                tier.get(key, payloads.landing)
            record.held_after_restart = len(kept)
    finally:
        for tier in tiers:
            tier.close()
        for process in (plugin_server, lm_server):
            if process is not None:
                process.close()

    return [tier.name for tier in tiers], records, fio_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kvsim", description=__doc__)
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3-8b")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--requests", type=int, default=72)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--store-gib", type=float, default=1.5, help="each store file's size")
    parser.add_argument("--extent-mib", type=int, default=4)
    parser.add_argument(
        "--durability",
        choices=["strict", "relaxed"],
        default="strict",
        help="ctxkv's (strict: a put returns once flushed; LMCache's disk never fsyncs)",
    )
    parser.add_argument("--sweep-extents-mib", default="1,4,16")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/ctxkv-kvsim"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    arguments = parser.parse_args(argv)
    os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

    model = MODELS[arguments.model]
    chunk_tokens, extent = arguments.chunk_tokens, arguments.extent_mib * MiB
    durability = arguments.durability
    chunk_bytes = model.chunk_bytes(chunk_tokens)
    shape = WorkloadShape(requests=arguments.requests)
    trace = make_trace(shape)
    directory = arguments.dir
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    try:
        store_bytes = int(arguments.store_gib * GiB)
        capacity = 0
        for name in ("inprocess", "serve", "plugin"):
            capacity = format_store(directory / f"{name}.img", store_bytes, extent, chunk_bytes)
        with open(directory / "fio-write.img", "wb") as file:
            file.truncate(store_bytes)
        print(
            f"kvsim: {model.name}, {chunk_tokens}-token chunks of {chunk_bytes / MiB:.0f} MiB; "
            f"{len(trace)} requests, working set {working_set_chunks(trace)} chunks "
            f"({working_set_chunks(trace) * chunk_bytes / GiB:.1f} GiB), capacity "
            f"{capacity // chunk_bytes} chunks ({capacity / GiB:.2f} GiB) per system",
            flush=True,
        )
        names, records, fio_runs = run_systems(
            directory, trace, model, chunk_tokens, extent, durability, capacity, arguments.segments
        )
        sweep_extents = [int(e) for e in arguments.sweep_extents_mib.split(",")]
        sweep = extent_sweep(directory, chunk_bytes, sweep_extents, chunks=8)
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    rows = [summarise(records[name]) for name in names]
    chunk_percentiles = {
        p: statistics.median(run["chunk_read"]["lat_ms"][p] for run in fio_runs)
        for p in fio_runs[0]["chunk_read"]["lat_ms"]
    }
    fio_summary = {
        "read_mibps": statistics.median(run["read"]["mibps"] for run in fio_runs),
        "write_mibps": statistics.median(run["write"]["mibps"] for run in fio_runs),
        "chunk_read_ms_p50": chunk_percentiles[50.0],
        "chunk_read_ms_p99": chunk_percentiles[99.0],
        "chunk_read_ms_p999": chunk_percentiles[99.9],
        "jobs": "randread bs=chunk QD1 (latency), randread/randwrite bs=extent QD8 "
        f"({FIO_RUNTIME_S:g} s each, after every segment; medians)",
    }
    report = {
        "model": model.name,
        "chunk_tokens": chunk_tokens,
        "chunk_bytes": chunk_bytes,
        "extent_bytes": extent,
        "ctxkv_durability": durability,
        "workload": shape.__dict__,
        "working_set_chunks": working_set_chunks(trace),
        "capacity_chunks_per_system": capacity // chunk_bytes,
        "notes": [
            "lm:// keeps every chunk in its server's RAM with no capacity limit: it never "
            "evicts, so its hit ratio is the trace's ceiling",
            "LMCache local disk runs with use_odirect (like ctxkv and fio) and the same "
            "capacity in bytes as each ctxkv store",
            "puts to LMCache's write-behind backends are timed until written",
            f"ctxkv runs with durability={durability}"
            + (
                ": a put returns once its data and journal are flushed"
                if durability == "strict"
                else ": flushes are batched in the background"
            )
            + "; LMCache's local disk backend never calls fsync",
            "throughput = (bytes served + bytes written) / time in lookups, reads, writes",
            "restart: ctxkv serve and the servers behind LMCache get SIGTERM and start again "
            "(on the same store file for ctxkv); the in-process store is closed and reopened; "
            "LMCache engines are destroyed and built again on the same configuration",
        ],
        "systems": rows,
        "fio": fio_summary,
        "fio_runs": fio_runs,
        "extent_sweep": sweep,
    }
    results = arguments.results
    results.mkdir(parents=True, exist_ok=True)
    (results / "kvsim.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    plots.latency_cdf(
        results / "kvsim_latency_cdf.png",
        {name: np.asarray(r.get_latency_ns) / 1e6 for name, r in records.items()},
        {p: ms for p, ms in chunk_percentiles.items() if p <= 99.9},
    )
    plots.extent_bandwidth(results / "kvsim_extent_bandwidth.png", sweep)
    plots.versus_fio(
        results / "kvsim_vs_fio.png", rows, fio_summary["read_mibps"], fio_summary["write_mibps"]
    )
    print(table(rows, fio_summary))
    print("extent sweep (MiB/s): " + "; ".join(
        f"{r['extent_mib']} MiB: get {r['ctxkv_get_mibps']:.0f} vs fio {r['fio_read_mibps']:.0f}, "
        f"put {r['ctxkv_put_mibps']:.0f} vs fio {r['fio_write_mibps']:.0f}" for r in sweep
    ))  # fmt: skip
    print(f"wrote {results}/kvsim.json and kvsim_*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
