"""fio's side of a benchmark: the same job handed to fio's io_uring engine, configured
for its best (fixed buffers, registered files), as the physical limit to compare with."""

from __future__ import annotations

import json
import shutil
import subprocess

from engine.bench.job import Job, format_size
from engine.bench.result import RunResult

FIO_TIMEOUT_SLACK_S = 60


def fio_arguments(job: Job) -> list[str]:
    """fio's command line for job (without the executable)."""
    # fio separates files with ':', so a ':' inside a path is escaped.
    filenames = ":".join(target.replace(":", "\\:") for target in job.targets)
    arguments = [
        "--name=fio",
        f"--filename={filenames}",
        f"--rw={job.rw}",
        f"--bs={format_size(job.block_bytes)}",
        f"--iodepth={job.iodepth}",
        f"--numjobs={job.numjobs}",
        "--ioengine=io_uring",
        "--direct=1",
        "--fixedbufs=1",
        "--registerfiles=1",
        "--group_reporting=1",
        "--output-format=json",
    ]
    if job.size_bytes is not None:
        arguments.append(f"--size={job.size_bytes}")
    if job.runtime_s is not None:
        arguments.append(f"--runtime={job.runtime_s:g}s")
    if job.time_based:
        arguments.append("--time_based=1")
    return arguments


def run_fio(job: Job) -> RunResult:
    executable = shutil.which("fio")
    if executable is None:
        raise FileNotFoundError(
            "fio is not installed (Debian package fio; `make setup` installs it)"
        )
    timeout_s = (job.runtime_s or 600) + FIO_TIMEOUT_SLACK_S
    completed = subprocess.run(
        [executable, *fio_arguments(job)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if completed.returncode != 0:
        output = completed.stderr.strip() or completed.stdout.strip()
        raise RuntimeError(f"fio exited with {completed.returncode}: {output}")
    # fio may print warnings before the JSON document.
    start = completed.stdout.find("{")
    if start < 0:
        raise RuntimeError(f"fio printed no JSON report: {completed.stdout[:500]!r}")
    return RunResult.from_fio_json(json.loads(completed.stdout[start:]), job.direction)
