"""What one run of a job measured, for ctxkv and fio alike, and its fio-schema JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# fio's keys for the percentiles ctxkv reports; fio's default percentile_list has them all.
PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99)


def percentile_key(percentile: float) -> str:
    return f"{percentile:.6f}"


@dataclass
class RunResult:
    engine: str  # "ctxkv" or "fio"
    direction: str  # "read" or "write"
    io_bytes: int
    total_ios: int
    runtime_ns: int
    clat_ns_percentile: dict[float, int]
    clat_ns_min: int
    clat_ns_max: int
    clat_ns_mean: float
    usr_cpu_pct: float  # CPU time outside the kernel, in % of runtime (fio's usr_cpu)
    sys_cpu_pct: float
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.direction in ("read", "write"), self.direction
        assert self.runtime_ns > 0 and self.total_ios >= 0 and self.io_bytes >= 0

    @property
    def bw_bytes(self) -> float:
        return self.io_bytes * 1e9 / self.runtime_ns

    @property
    def iops(self) -> float:
        return self.total_ios * 1e9 / self.runtime_ns

    @property
    def usr_cpu_ns_per_op(self) -> float:
        """CPU time spent outside the kernel per I/O: the engine's own overhead."""
        return self.usr_cpu_pct / 100 * self.runtime_ns / max(self.total_ios, 1)

    @property
    def sys_cpu_ns_per_op(self) -> float:
        return self.sys_cpu_pct / 100 * self.runtime_ns / max(self.total_ios, 1)

    @classmethod
    def from_latencies(
        cls,
        *,
        engine: str,
        direction: str,
        io_bytes: int,
        runtime_ns: int,
        clat_ns: np.ndarray,
        usr_cpu_ns: int,
        sys_cpu_ns: int,
        extra: dict[str, Any] | None = None,
    ) -> RunResult:
        if len(clat_ns) == 0:
            raise ValueError("the run completed no I/O: nothing to report")
        values = np.percentile(clat_ns, PERCENTILES, method="nearest")
        return cls(
            engine=engine,
            direction=direction,
            io_bytes=io_bytes,
            total_ios=len(clat_ns),
            runtime_ns=runtime_ns,
            clat_ns_percentile={p: int(v) for p, v in zip(PERCENTILES, values, strict=True)},
            clat_ns_min=int(clat_ns.min()),
            clat_ns_max=int(clat_ns.max()),
            clat_ns_mean=float(clat_ns.mean()),
            usr_cpu_pct=100.0 * usr_cpu_ns / runtime_ns,
            sys_cpu_pct=100.0 * sys_cpu_ns / runtime_ns,
            extra=extra or {},
        )

    @classmethod
    def from_fio_json(cls, report: dict[str, Any], direction: str) -> RunResult:
        """Reads fio's --output-format=json (one job, or group_reporting)."""
        jobs = report.get("jobs") or []
        if len(jobs) != 1:
            raise ValueError(f"expected one (grouped) fio job in the report, found {len(jobs)}")
        job = jobs[0]
        if job.get("error"):
            raise RuntimeError(f"fio reported error {job['error']} for job {job.get('jobname')}")
        section = job[direction]
        clat = section["clat_ns"]
        fio_percentiles = clat.get("percentile", {})
        return cls(
            engine="fio",
            direction=direction,
            io_bytes=int(section["io_bytes"]),
            total_ios=int(section["total_ios"]),
            runtime_ns=int(section["runtime"]) * 1_000_000,
            clat_ns_percentile={
                p: int(fio_percentiles[percentile_key(p)])
                for p in PERCENTILES
                if percentile_key(p) in fio_percentiles
            },
            clat_ns_min=int(clat["min"]),
            clat_ns_max=int(clat["max"]),
            clat_ns_mean=float(clat["mean"]),
            usr_cpu_pct=float(job["usr_cpu"]),
            sys_cpu_pct=float(job["sys_cpu"]),
            extra={"fio_version": report.get("fio version", "")},
        )

    def fio_job_json(self, jobname: str, options: dict[str, str]) -> dict[str, Any]:
        """This result as one entry of fio's jobs[], for the fields ctxkv has."""
        measured = {
            "io_bytes": self.io_bytes,
            "io_kbytes": self.io_bytes // 1024,
            "bw_bytes": round(self.bw_bytes),
            "bw": round(self.bw_bytes / 1024),
            "iops": self.iops,
            "runtime": round(self.runtime_ns / 1e6),
            "total_ios": self.total_ios,
            "clat_ns": {
                "min": self.clat_ns_min,
                "max": self.clat_ns_max,
                "mean": self.clat_ns_mean,
                "N": self.total_ios,
                "percentile": {percentile_key(p): v for p, v in self.clat_ns_percentile.items()},
            },
        }
        idle = dict.fromkeys(measured, 0)
        idle["clat_ns"] = {"min": 0, "max": 0, "mean": 0.0, "N": 0, "percentile": {}}
        other = "write" if self.direction == "read" else "read"
        return {
            "jobname": jobname,
            "groupid": 0,
            "error": 0,
            "job options": options,
            self.direction: measured,
            other: idle,
            "usr_cpu": self.usr_cpu_pct,
            "sys_cpu": self.sys_cpu_pct,
            "ctxkv": {
                "usr_cpu_ns_per_op": self.usr_cpu_ns_per_op,
                "sys_cpu_ns_per_op": self.sys_cpu_ns_per_op,
                **self.extra,
            },
        }
