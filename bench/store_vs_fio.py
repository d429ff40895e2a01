"""The store's acceptance figures (issue 3): put and get bandwidth at 4 MiB against raw
mode and fio on the same loop device in the same run, device write amplification after
the store has wrapped twice, and recovery time for a journal of 1 million records.

    .venv/bin/python bench/store_vs_fio.py [--rounds 5] [--size 1G] [--dir /var/tmp]

fio runs twice per round: plain (the device's cache speed) and with end_fsync=1 (the
durable speed, what a strict put pays for). Strict puts run twice: in put_many calls of
64 values, each durable when it returns, and as one call of the whole job, durable once
at its end as fio's end_fsync job is (the like-for-like pair: on the loop device a flush
per 256 MiB costs ~7% against one per GiB). The store is four times the job, so that
one call is not split into groups (a call over a quarter of the store would be). Before
each write run the device is flushed,
so no run pays for the dirty data of the one before. A read run repeats its region for
READ_SECONDS: a single pass over 1 GiB takes ~0.4 s here, too short to trust. Engines
alternate within each round (every other round in reverse order); each ratio is given as
the ratio of medians and as the median of the rounds' own ratios. Writes
bench/results/store_vs_fio.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from common import hugepages_reserved, loop_device, make_image

from engine.bench.fio import run_fio
from engine.bench.job import Job, parse_size
from engine.bench.raw import run_raw
from engine.bench.store_mode import run_store
from engine.store.store import RELAXED, STRICT, Store

RESULTS = Path(__file__).resolve().parent / "results" / "store_vs_fio.json"
MiB = 1 << 20
READ_SECONDS = 3.0


def sectors_written(device: str) -> int:
    """Sectors (512 bytes) the kernel has written to the device since it appeared."""
    fields = Path(f"/sys/block/{os.path.basename(device)}/stat").read_text().split()
    return int(fields[6])


def flush(device: str) -> None:
    """Writes back what the previous run left dirty (the loop device's backing file, and
    with it the host's cache of the image), so the next run starts clean."""
    descriptor = os.open(device, os.O_RDWR)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def ratios(runs: dict[str, list[float]], baseline: str) -> dict:
    """Each engine against baseline two ways: the ratio of medians, and the median of the
    rounds' own ratios, which a host that slows down or speeds up mid-run moves less."""
    suffix = "fio" if baseline == "fio" else baseline.replace(" ", "_")
    base = runs[baseline]
    return {
        f"ratio_over_{suffix}": {
            name: statistics.median(values) / statistics.median(base)
            for name, values in runs.items()
        },
        f"median_round_ratio_over_{suffix}": {
            name: statistics.median(v / b for v, b in zip(values, base, strict=True))
            for name, values in runs.items()
        },
    }


def bandwidth(device: str, rounds: int, size: int) -> dict:
    engines = {
        "fio": lambda job: run_fio(job),
        "fio end_fsync": lambda job: run_fio(replace(job, extra={"end_fsync": "1"})),
        "ctxkv raw": lambda job: run_raw(job),
        "ctxkv store strict": lambda job: run_store(job, durability=STRICT),
        "ctxkv store strict, one call": lambda job: run_store(
            job, durability=STRICT, values_per_call=job.size_bytes // job.block_bytes
        ),
        "ctxkv store relaxed": lambda job: run_store(job, durability=RELAXED),
    }
    report = {}
    for rw in ("write", "read"):
        job = Job(targets=(device,), rw=rw, block_bytes=4 * MiB, iodepth=8, size_bytes=size)
        if rw == "read":
            job = replace(job, runtime_s=READ_SECONDS, time_based=True)
        runs: dict[str, list[float]] = {name: [] for name in engines}
        for round_index in range(rounds):
            # Every other round runs the engines in reverse, so none always follows another.
            order = list(engines.items())[:: -1 if round_index % 2 else 1]
            for name, run in order:
                if rw == "read" and name in (
                    "fio end_fsync",
                    "ctxkv store strict, one call",
                    "ctxkv store relaxed",
                ):
                    continue  # durability and put calls change nothing for reads
                if rw == "write":
                    flush(device)
                result = run(job)
                runs[name].append(result.bw_bytes)
                print(
                    f"{rw} round {round_index + 1} {name}: {result.bw_bytes / MiB:.0f} MiB/s",
                    flush=True,
                )
        runs = {name: values for name, values in runs.items() if values}
        report[rw] = {
            "median_bw_bytes": {name: statistics.median(values) for name, values in runs.items()},
            **ratios(runs, "fio"),
        }
        if rw == "write":
            report[rw].update(ratios(runs, "fio end_fsync"))
    return report


def write_amplification(device: str) -> dict:
    """Puts 4 MiB values until the log has wrapped twice; device bytes written over bytes put."""
    with Store.format([device], extent_size=4 * MiB, force=True, durability=RELAXED) as store:
        slots = store.stats()["slots"]
        value = random.Random(1).randbytes(4 * MiB)
        before = sectors_written(device)
        puts = 2 * slots + 8
        for start in range(0, puts, 8):
            store.put_many(
                [(f"wa-{i}".encode(), value) for i in range(start, min(start + 8, puts))]
            )
        store.checkpoint()
        stats = store.stats()
    written = (sectors_written(device) - before) * 512
    return {
        "slots": slots,
        "puts": puts,
        "bytes_put": stats["bytes_put"],
        "device_bytes_written": written,
        "write_amplification": written / stats["bytes_put"],
        "evictions": stats["evictions"],
    }


RECOVERY_WRITER = r"""
import os, sys
from engine.store.store import RELAXED, Store
store = Store.format([sys.argv[1]], extent_size=64 << 10, force=True, journal_bytes=256 << 20,
                     durability=RELAXED, pool_buffers=256)
records = int(sys.argv[2])
keys = [f"r-{i}".encode() for i in range(1000)]
for start in range(0, records, 250):
    store.put_many([(keys[i % 1000], b"v" * 100) for i in range(start, start + 250)])
store._flush(range(1))
os._exit(0)  # no close(): the next open must replay every record
"""


def recovery_time(directory: Path, records: int) -> dict:
    target = directory / "recovery.img"
    make_image(target, 512 * MiB)
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", RECOVERY_WRITER, str(target), str(records)], check=True)
    write_s = time.monotonic() - started
    started = time.monotonic()
    with Store.open([target]) as store:
        open_s = time.monotonic() - started
        replayed = store.replayed_records
    target.unlink()
    return {"records_replayed": replayed, "open_seconds": open_s, "write_seconds": write_s,
            "records_per_second": replayed / open_s}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="bytes per run")
    parser.add_argument("--records", type=int, default=1_000_000, help="journal records to recover")
    parser.add_argument("--dir", default="/var/tmp")
    arguments = parser.parse_args()
    workdir = Path(arguments.dir) / f"ctxkv-store-bench-{os.getpid()}"
    workdir.mkdir(parents=True)
    image = workdir / "loop.img"
    make_image(image, 4 * arguments.size + 256 * MiB)
    report: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        with loop_device(image) as device, hugepages_reserved(64):
            # Fill every block once so no run measures writes into holes.
            run_raw(Job(targets=(device,), rw="write", block_bytes=4 * MiB, iodepth=8))
            report["bandwidth"] = bandwidth(device, arguments.rounds, arguments.size)
            report["write_amplification"] = write_amplification(device)
        report["recovery"] = recovery_time(workdir, arguments.records)
    finally:
        image.unlink(missing_ok=True)
        for leftover in workdir.iterdir():
            leftover.unlink()
        workdir.rmdir()
    print(json.dumps({k: v for k, v in report.items() if k != "when"}, indent=2))
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
