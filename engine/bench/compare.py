"""ctxkv against fio on the same job and target, interleaved (fio, ctxkv, fio, ctxkv ...)
so that drift in a noisy machine hits both sides alike; the verdict is the ratio of
medians, never one run."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.bench.fio import run_fio
from engine.bench.job import Job
from engine.bench.raw import ProgressCallback, run_raw
from engine.bench.result import RunResult

# name -> (how to read it off a result, True when higher is better)
METRICS: dict[str, tuple[Callable[[RunResult], float], bool]] = {
    "bw_bytes": (lambda r: r.bw_bytes, True),
    "iops": (lambda r: r.iops, True),
    "lat_ns_p50": (lambda r: r.lat_ns_percentile[50.0], False),
    "lat_ns_p99": (lambda r: r.lat_ns_percentile[99.0], False),
    "lat_ns_p99.9": (lambda r: r.lat_ns_percentile[99.9], False),
    "usr_cpu_ns_per_op": (lambda r: r.usr_cpu_ns_per_op, False),
    "sys_cpu_ns_per_op": (lambda r: r.sys_cpu_ns_per_op, False),
}


@dataclass
class Comparison:
    job: Job
    fio: list[RunResult] = field(default_factory=list)
    ctxkv: list[RunResult] = field(default_factory=list)

    def median(self, engine: str, metric: str) -> float:
        read, _ = METRICS[metric]
        runs = self.fio if engine == "fio" else self.ctxkv
        return statistics.median(read(run) for run in runs)

    def ratio(self, metric: str) -> float:
        """ctxkv's median over fio's: above 1 is more bandwidth or more latency."""
        fio_median = self.median("fio", metric)
        return self.median("ctxkv", metric) / fio_median if fio_median else float("nan")

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            "median_fio": {m: self.median("fio", m) for m in METRICS},
            "median_ctxkv": {m: self.median("ctxkv", m) for m in METRICS},
            "ratio_ctxkv_over_fio": {m: self.ratio(m) for m in METRICS},
        }


def run_compare(
    job: Job,
    rounds: int,
    on_result: Callable[[int, RunResult], None] | None = None,
    on_progress: ProgressCallback | None = None,
) -> Comparison:
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    comparison = Comparison(job)
    for round_index in range(1, rounds + 1):
        fio_result = run_fio(job)
        comparison.fio.append(fio_result)
        if on_result:
            on_result(round_index, fio_result)
        ctxkv_result = run_raw(job, on_progress)
        comparison.ctxkv.append(ctxkv_result)
        if on_result:
            on_result(round_index, ctxkv_result)
    return comparison
