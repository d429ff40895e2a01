"""The raw path's acceptance figures: ctxkv against fio on a loop device and on a plain
file, same job, same target, same run, interleaved fio/ctxkv, medians and ratios.

    .venv/bin/python bench/raw_vs_fio.py [--rounds 5] [--runtime 4] [--size 2G] [--dir /var/tmp]

Attaches one loop device (direct I/O, 4096-byte sectors) over an image in --dir, writes
both targets once so reads hit real blocks (not holes), reserves hugetlb pages so fio's
buffers are hugepage-backed like ctxkv's (see engine/bench/fio.py), runs each job,
prints a table and writes bench/results/raw_vs_fio.json. Restores the hugepage count,
detaches the loop device and deletes both images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import hugepages_reserved, loop_device, make_image

from engine.bench.compare import Comparison, run_compare
from engine.bench.job import Job, parse_size
from engine.bench.raw import run_raw
from engine.bench.report import comparison_json, describe_comparison

RESULTS = Path(__file__).resolve().parent / "results" / "raw_vs_fio.json"
MiB = 1 << 20
HUGEPAGES = 64  # 128 MiB: fio's or ctxkv's buffers at 4 MiB x QD8, with room to spare

# (label, rw, iodepth, what the acceptance looks at)
JOBS = [
    ("4M read QD8", "read", 8, "bw_bytes"),
    ("4M write QD8", "write", 8, "bw_bytes"),
    ("4M read QD1", "read", 1, "lat_ns_p50"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", type=float, default=4.0, help="seconds per run")
    parser.add_argument("--size", type=parse_size, default=2 << 30, help="bytes per target")
    parser.add_argument("--dir", default="/var/tmp", help="where the images go (a disk, not tmpfs)")
    arguments = parser.parse_args()

    workdir = Path(arguments.dir) / f"ctxkv-bench-{os.getpid()}"
    workdir.mkdir(parents=True)
    loop_image, file_target = workdir / "loop.img", workdir / "target.img"
    make_image(loop_image, arguments.size)
    make_image(file_target, arguments.size)
    report: dict[str, dict] = {}
    try:
        with loop_device(loop_image) as device, hugepages_reserved(HUGEPAGES):
            for kind, target in (("loop device", device), ("file", str(file_target))):
                # Fill every block once: reading a hole measures the filesystem, not the disk.
                run_raw(Job(targets=(target,), rw="write", block_bytes=4 * MiB, iodepth=8))
                for label, rw, iodepth, metric in JOBS:
                    job = Job(
                        targets=(target,),
                        rw=rw,
                        block_bytes=4 * MiB,
                        iodepth=iodepth,
                        runtime_s=arguments.runtime,
                        time_based=True,
                    )
                    print(f"== {kind}: {label} ({arguments.rounds} rounds)", flush=True)
                    comparison: Comparison = run_compare(job, arguments.rounds)
                    print(describe_comparison(comparison), flush=True)
                    entry = comparison_json(comparison)
                    entry["acceptance_metric"] = metric
                    report[f"{kind}: {label}"] = entry
    finally:
        for path in (loop_image, file_target):
            path.unlink(missing_ok=True)
        workdir.rmdir()

    print("\nsummary (ctxkv/fio, medians of interleaved runs)")
    print(
        f"{'target and job':<28} {'bandwidth':>9} {'p50':>7} {'p99':>7} {'p99.9':>7} "
        f"{'usr us/io ctxkv':>15} {'fio':>6}"
    )
    for name, entry in report.items():
        ratio = entry["comparison"]["ratio_over_fio"]["ctxkv"]
        usr_ctxkv = entry["comparison"]["median"]["ctxkv"]["usr_cpu_ns_per_op"] / 1e3
        usr_fio = entry["comparison"]["median"]["fio"]["usr_cpu_ns_per_op"] / 1e3
        print(
            f"{name:<28} {ratio['bw_bytes']:9.3f} {ratio['lat_ns_p50']:7.3f} "
            f"{ratio['lat_ns_p99']:7.3f} {ratio['lat_ns_p99.9']:7.3f} {usr_ctxkv:15.1f} "
            f"{usr_fio:6.1f}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%S"), **report}, indent=2))
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
