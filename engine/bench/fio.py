"""fio's side of a benchmark: the same job handed to fio's io_uring engine, configured
for its best (fixed buffers, registered files, hugepage buffers when the system has
hugetlb pages free), as the physical limit to compare with.

Hugepages matter more than anything else here: on this VM fio's 4 MiB QD1 reads ran at
~0.8 GB/s from 4 KiB-page buffers and ~3.3 GB/s from hugetlb buffers (fewer segments
per request for virtio). ctxkv's pool gets 2 MiB pages either from hugetlb or from
transparent hugepages; fio can only use hugetlb (mem=shmhuge), so a like-for-like
comparison reserves some: `echo 64 > /proc/sys/vm/nr_hugepages`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from engine.bench.job import Job, format_size
from engine.bench.result import RunResult
from engine.nvme.discovery import block_name_of, max_hw_transfer_bytes
from engine.nvme.passthru import generic_path_of

FIO_TIMEOUT_SLACK_S = 60
HUGEPAGE_BYTES = 2 << 20


def hugepages_free_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1]) * HUGEPAGE_BYTES
    return 0


def fio_buffer_bytes(job: Job) -> int:
    """What fio allocates for I/O buffers: iodepth blocks per job, plus alignment slack."""
    return job.numjobs * (job.iodepth * job.block_bytes + HUGEPAGE_BYTES)


def fio_arguments(job: Job, *, hugepages: bool = False) -> list[str]:
    """fio's command line for job (without the executable)."""
    passthru = job.io_path == "passthru"
    targets = [generic_path_of(target) for target in job.targets] if passthru else job.targets
    # fio separates files with ':', so a ':' inside a path is escaped.
    filenames = ":".join(target.replace(":", "\\:") for target in targets)
    arguments = [
        "--name=fio",
        f"--filename={filenames}",
        f"--rw={job.rw}",
        f"--bs={format_size(job.block_bytes)}",
        f"--iodepth={job.iodepth}",
        f"--numjobs={job.numjobs}",
        # NVMe commands on the char devices; O_DIRECT means nothing there (and open
        # refuses it on a char device).
        *(
            ["--ioengine=io_uring_cmd", "--cmd_type=nvme"]
            if passthru
            else ["--ioengine=io_uring", "--direct=1"]
        ),
        "--fixedbufs=1",
        "--registerfiles=1",
        "--group_reporting=1",
        "--lat_percentiles=1",
        "--output-format=json",
    ]
    if hugepages:
        arguments.append("--mem=shmhuge")
    if job.size_bytes is not None:
        arguments.append(f"--size={job.size_bytes}")
    if job.runtime_s is not None:
        arguments.append(f"--runtime={job.runtime_s:g}s")
    if job.time_based:
        arguments.append("--time_based=1")
    arguments += [f"--{name}={value}" for name, value in sorted(job.extra.items())]
    return arguments


def check_passthru_block_size(job: Job) -> None:
    """fio's io_uring_cmd engine sends each block as one NVMe command, unsplit: a block
    above the namespace's max transfer (MDTS) would fail with EINVAL for every I/O."""
    for target in job.targets:
        block_name = block_name_of(os.path.basename(generic_path_of(target)))
        limit = max_hw_transfer_bytes(block_name or "")
        if limit and job.block_bytes > limit:
            raise ValueError(
                f"--bs {format_size(job.block_bytes)} is above the {format_size(limit)} that "
                f"{target} takes in one NVMe command, and fio's io_uring_cmd engine does not "
                f"split; use --bs {format_size(limit)} or less, or --io-path block"
            )


def run_fio(job: Job) -> RunResult:
    if job.io_path == "passthru":
        check_passthru_block_size(job)
    executable = shutil.which("fio")
    if executable is None:
        raise FileNotFoundError(
            "fio is not installed (Debian package fio; `make setup` installs it)"
        )
    timeout_s = (job.runtime_s or 600) + FIO_TIMEOUT_SLACK_S
    hugepages = hugepages_free_bytes() >= fio_buffer_bytes(job)
    completed = subprocess.run(
        [executable, *fio_arguments(job, hugepages=hugepages)],
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
    result = RunResult.from_fio_json(json.loads(completed.stdout[start:]), job.direction)
    result.extra["fio_mem"] = "shmhuge" if hugepages else "malloc"
    return result
