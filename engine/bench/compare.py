"""ctxkv against fio on the same job and target, interleaved (fio, ctxkv, fio, ctxkv ...)
so that drift in a noisy machine hits every side alike; the verdict is the ratio of
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
    """Runs of each engine, in the order they ran; fio first."""

    job: Job
    runs: dict[str, list[RunResult]] = field(default_factory=dict)

    @property
    def engines(self) -> list[str]:
        return list(self.runs)

    def median(self, engine: str, metric: str) -> float:
        read, _ = METRICS[metric]
        return statistics.median(read(run) for run in self.runs[engine])

    def ratio(self, engine: str, metric: str) -> float | None:
        """engine's median over fio's: above 1 is more bandwidth or more latency. None
        when fio's median is 0 (a short fio run often reports 0% user CPU): no ratio, and
        no NaN for a JSON reader to choke on."""
        fio_median = self.median("fio", metric)
        return self.median(engine, metric) / fio_median if fio_median else None

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        return {
            "median": {e: {m: self.median(e, m) for m in METRICS} for e in self.engines},
            "ratio_over_fio": {
                e: {m: self.ratio(e, m) for m in METRICS} for e in self.engines if e != "fio"
            },
        }


Runner = Callable[[Job, ProgressCallback | None], RunResult]


def run_compare(
    job: Job,
    rounds: int,
    on_result: Callable[[int, RunResult], None] | None = None,
    on_progress: ProgressCallback | None = None,
    runners: dict[str, Runner] | None = None,
) -> Comparison:
    """Round after round, fio then each of runners (default: ctxkv's raw path)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    runners = {"fio": lambda job, _progress: run_fio(job), **(runners or {"ctxkv": run_raw})}
    comparison = Comparison(job, {engine: [] for engine in runners})
    for round_index in range(1, rounds + 1):
        for engine, runner in runners.items():
            result = runner(job, on_progress)
            result.engine = engine
            comparison.runs[engine].append(result)
            if on_result:
                on_result(round_index, result)
    return comparison
