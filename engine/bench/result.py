"""What one run of a job measured, for ctxkv and fio alike, and its fio-schema JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# fio's keys for the percentiles ctxkv reports; fio's default percentile_list has them all.
PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99)

# Latency here is fio's "lat": from queueing an I/O to reaping its completion, submission
# included. fio's "clat" starts after io_uring_enter returns, which ctxkv cannot observe
# because one io_uring_enter both submits and waits; on this VM fio's submission of a
# 4 MiB read alone took ~77 us, so comparing ctxkv's lat with fio's clat would be unfair
# to ctxkv by ~5% at QD1.
LATENCY_DEFINITION = "queue to completion, submission included (fio's lat_ns)"


def percentile_key(percentile: float) -> str:
    return f"{percentile:.6f}"


@dataclass
class RunResult:
    engine: str  # "ctxkv" or "fio"
    direction: str  # "read" or "write"
    io_bytes: int
    total_ios: int
    runtime_ns: int
    lat_ns_percentile: dict[float, int]
    lat_ns_min: int
    lat_ns_max: int
    lat_ns_mean: float
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
        lat_ns: np.ndarray,
        usr_cpu_ns: int,
        sys_cpu_ns: int,
        extra: dict[str, Any] | None = None,
    ) -> RunResult:
        if len(lat_ns) == 0:
            raise ValueError("the run completed no I/O: nothing to report")
        values = np.percentile(lat_ns, PERCENTILES, method="nearest")
        return cls(
            engine=engine,
            direction=direction,
            io_bytes=io_bytes,
            total_ios=len(lat_ns),
            runtime_ns=runtime_ns,
            lat_ns_percentile={p: int(v) for p, v in zip(PERCENTILES, values, strict=True)},
            lat_ns_min=int(lat_ns.min()),
            lat_ns_max=int(lat_ns.max()),
            lat_ns_mean=float(lat_ns.mean()),
            usr_cpu_pct=100.0 * usr_cpu_ns / runtime_ns,
            sys_cpu_pct=100.0 * sys_cpu_ns / runtime_ns,
            extra=extra or {},
        )

    @classmethod
    def from_fio_json(cls, report: dict[str, Any], direction: str) -> RunResult:
        """Reads fio's --output-format=json (one job, or group_reporting, with
        lat_percentiles=1 so lat_ns carries percentiles)."""
        jobs = report.get("jobs") or []
        if len(jobs) != 1:
            raise ValueError(f"expected one (grouped) fio job in the report, found {len(jobs)}")
        job = jobs[0]
        if job.get("error"):
            raise RuntimeError(f"fio reported error {job['error']} for job {job.get('jobname')}")
        section = job[direction]
        lat = section["lat_ns"]
        fio_percentiles = lat.get("percentile", {})
        return cls(
            engine="fio",
            direction=direction,
            io_bytes=int(section["io_bytes"]),
            total_ios=int(section["total_ios"]),
            runtime_ns=int(section["runtime"]) * 1_000_000,
            lat_ns_percentile={
                p: int(fio_percentiles[percentile_key(p)])
                for p in PERCENTILES
                if percentile_key(p) in fio_percentiles
            },
            lat_ns_min=int(lat["min"]),
            lat_ns_max=int(lat["max"]),
            lat_ns_mean=float(lat["mean"]),
            usr_cpu_pct=float(job["usr_cpu"]),
            sys_cpu_pct=float(job["sys_cpu"]),
            extra={"fio_version": report.get("fio version", "")},
        )

    def fio_job_json(self, jobname: str, options: dict[str, str]) -> dict[str, Any]:
        """This result as one entry of fio's jobs[], for the fields ctxkv has."""
        latency = {
            "min": self.lat_ns_min,
            "max": self.lat_ns_max,
            "mean": self.lat_ns_mean,
            "N": self.total_ios,
            "percentile": {percentile_key(p): v for p, v in self.lat_ns_percentile.items()},
        }
        measured = {
            "io_bytes": self.io_bytes,
            "io_kbytes": self.io_bytes // 1024,
            "bw_bytes": round(self.bw_bytes),
            "bw": round(self.bw_bytes / 1024),
            "iops": self.iops,
            "runtime": round(self.runtime_ns / 1e6),
            "total_ios": self.total_ios,
            # ctxkv cannot split submission from completion (see LATENCY_DEFINITION),
            # so its clat_ns and lat_ns are the same measurement.
            "clat_ns": latency,
            "lat_ns": latency,
        }
        idle = dict.fromkeys(measured, 0)
        idle["clat_ns"] = idle["lat_ns"] = {
            "min": 0,
            "max": 0,
            "mean": 0.0,
            "N": 0,
            "percentile": {},
        }
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
                "latency": LATENCY_DEFINITION,
                "usr_cpu_ns_per_op": self.usr_cpu_ns_per_op,
                "sys_cpu_ns_per_op": self.sys_cpu_ns_per_op,
                **self.extra,
            },
        }
