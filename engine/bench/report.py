"""How bench results are shown: fio-like text for people, fio-schema JSON for tools."""

from __future__ import annotations

import time
from typing import Any

from engine import __version__
from engine.bench.compare import METRICS, Comparison
from engine.bench.job import Job, format_size
from engine.bench.result import PERCENTILES, RunResult

MiB = 1 << 20


def job_options(job: Job) -> dict[str, str]:
    options = {
        "rw": job.rw,
        "bs": format_size(job.block_bytes),
        "iodepth": str(job.iodepth),
        "numjobs": str(job.numjobs),
        "filename": ":".join(job.targets),
    }
    if job.size_bytes is not None:
        options["size"] = format_size(job.size_bytes)
    if job.runtime_s is not None:
        options["runtime"] = f"{job.runtime_s:g}s"
    if job.time_based:
        options["time_based"] = "1"
    return options


def describe_run(job: Job, result: RunResult, label: str) -> str:
    """fio's normal output, in short."""
    us = 1e-3
    percentiles = ", ".join(
        f"p{p:g}={v * us:.0f}" for p, v in sorted(result.lat_ns_percentile.items())
    )
    lines = [
        f"{label}: rw={job.rw}, bs={format_size(job.block_bytes)}, iodepth={job.iodepth}, "
        f"numjobs={job.numjobs}, targets={','.join(job.targets)}",
        f"  {result.direction}: IOPS={result.iops:.1f}, BW={result.bw_bytes / MiB:.0f}MiB/s "
        f"({result.bw_bytes / 1e6:.0f}MB/s)({result.io_bytes / MiB:.0f}MiB/"
        f"{result.runtime_ns / 1e6:.0f}msec)",
        f"    lat (usec): min={result.lat_ns_min * us:.0f}, max={result.lat_ns_max * us:.0f}, "
        f"avg={result.lat_ns_mean * us:.1f}",
        f"    lat percentiles (usec): {percentiles}",
        f"  cpu: usr={result.usr_cpu_pct:.2f}%, sys={result.sys_cpu_pct:.2f}%; per I/O: "
        f"usr={result.usr_cpu_ns_per_op * us:.1f}us, sys={result.sys_cpu_ns_per_op * us:.1f}us",
    ]
    if result.engine == "fio":
        lines.append(f"  buffers: mem={result.extra['fio_mem']}")
    elif result.engine == "ctxkv-store":
        extra = result.extra
        calls = (
            "streamed by read_iter (latency is the wait for each)"
            if extra["values_per_call"] is None
            else f"{extra['values_per_call']} per call (latency is a call's)"
        )
        lines.append(
            f"  store: {extra['values']} values of one extent, {calls}, "
            f"{extra['durability']} durability, {extra['journal_commits']} journal commits, "
            f"{extra['pool_backing']} pool"
        )
    else:
        extra = result.extra
        lines.append(
            f"  io_uring: {'|'.join(extra['ring_setup_flags']) or 'no setup flags'}, fixed buffers "
            f"({extra['pool_backing']} pool), registered files, chunks of "
            f"{format_size(extra['chunk_bytes'])}"
        )
    return "\n".join(lines)


def describe_comparison(comparison: Comparison) -> str:
    header = (
        f"{'round':>6} {'engine':>12} {'MiB/s':>9} {'IOPS':>9} {'p50 us':>9} {'p99 us':>9} "
        f"{'p99.9 us':>9} {'usr us/io':>10}"
    )

    def row(label: str, engine: str, values: dict[str, float]) -> str:
        return (
            f"{label:>6} {engine:>12} {values['bw_bytes'] / MiB:9.1f} {values['iops']:9.1f} "
            f"{values['lat_ns_p50'] / 1e3:9.0f} {values['lat_ns_p99'] / 1e3:9.0f} "
            f"{values['lat_ns_p99.9'] / 1e3:9.0f} {values['usr_cpu_ns_per_op'] / 1e3:10.1f}"
        )

    lines = [header]
    rounds = len(comparison.runs["fio"])
    for index in range(rounds):
        for engine in comparison.engines:
            run = comparison.runs[engine][index]
            lines.append(
                row(str(index + 1), engine, {m: read(run) for m, (read, _) in METRICS.items()})
            )
    summary = comparison.summary()
    for engine in comparison.engines:
        lines.append(row("median", engine, summary["median"][engine]))
    if any(run.extra["fio_mem"] == "malloc" for run in comparison.runs["fio"]):
        lines.append(
            "note: fio ran on 4 KiB-page buffers (too few free hugetlb pages), ctxkv on 2 MiB "
            "pages: not like for like. Reserve some (`echo 64 > /proc/sys/vm/nr_hugepages`) "
            "and fio uses mem=shmhuge."
        )
    if any(
        run.extra.get("durability") == "strict" and run.direction == "write"
        for runs in comparison.runs.values()
        for run in runs
    ):
        lines.append(
            "note: strict store puts are on stable media when they return (two device "
            "flushes per batch); fio's and the raw path's writes stop in the device's cache. "
            "bench/store_vs_fio.py also runs fio with end_fsync=1 for the durable comparison."
        )
    per_call = {
        engine: runs[0].extra["values_per_call"]
        for engine, runs in comparison.runs.items()
        if "values_per_call" in runs[0].extra
    }
    for engine, values in per_call.items():
        measured = (
            "the wait for each value of a read_iter stream"
            if values is None
            else f"that of a call of {values} values"
        )
        lines.append(
            f"note: {engine} latency is {measured} (what its caller waits for), fio's that "
            f"of one I/O: compare their bandwidth, not their latency."
        )
    for engine, ratio in summary["ratio_over_fio"].items():
        latency = (
            ""
            if engine in per_call
            else f"p50 latency {ratio_text(ratio['lat_ns_p50'])}, "
            f"p99 {ratio_text(ratio['lat_ns_p99'])}, p99.9 {ratio_text(ratio['lat_ns_p99.9'])}, "
        )
        lines.append(
            f"{engine}/fio (medians): bandwidth {ratio_text(ratio['bw_bytes'])}, {latency}"
            f"usr CPU per I/O {ratio_text(ratio['usr_cpu_ns_per_op'], digits=2)}"
        )
    return "\n".join(lines)


def ratio_text(ratio: float | None, digits: int = 3) -> str:
    return "n/a (fio measured 0)" if ratio is None else f"{ratio:.{digits}f}"


def run_json(job: Job, result: RunResult) -> dict[str, Any]:
    return {
        "ctxkv version": __version__,
        "timestamp": int(time.time()),
        "jobs": [result.fio_job_json(job.name, job_options(job))],
    }


def comparison_json(comparison: Comparison) -> dict[str, Any]:
    job = comparison.job
    options = job_options(job)
    jobs = []
    for index in range(len(comparison.runs["fio"])):
        for engine in comparison.engines:
            run = comparison.runs[engine][index]
            jobs.append(run.fio_job_json(f"{engine}-round{index + 1}", options))
    return {
        "ctxkv version": __version__,
        "fio version": comparison.runs["fio"][0].extra.get("fio_version", ""),
        "timestamp": int(time.time()),
        "percentiles": [f"{p:g}" for p in PERCENTILES],
        "jobs": jobs,
        "comparison": comparison.summary(),
    }
