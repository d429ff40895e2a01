"""`ctxkv bench`: fio-style runs of ctxkv's raw I/O path, optionally against fio itself."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from engine.bench.compare import run_compare
from engine.bench.job import RW_MODES, Job, parse_size
from engine.bench.raw import ProgressCallback, run_raw
from engine.bench.report import comparison_json, describe_comparison, describe_run, run_json
from engine.bench.result import RunResult
from engine.bench.store_mode import run_store
from engine.cli.store import add_io_path_argument
from engine.nvme.passthru import AUTO, BLOCK, PASSTHRU, split_target
from engine.store.store import RELAXED, STRICT


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench",
        help="measure the raw I/O path (fio-style), optionally side by side with fio",
        description="Runs a fio-style job through ctxkv's io_uring path. With --compare-fio, "
        "fio runs the same job on the same targets, interleaved, and both are printed "
        "with their ratio. Write jobs overwrite the targets, as fio's do; store mode "
        "formats them.",
    )
    parser.add_argument("targets", nargs="+", metavar="TARGET", help="block device or file")
    parser.add_argument(
        "--mode",
        choices=["raw", "store"],
        default="raw",
        help="raw: ctxkv's io_uring path; store: puts/gets of bs-sized values through the "
        "store (formats the targets; with --compare-fio also runs raw mode)",
    )
    parser.add_argument(
        "--durability",
        choices=[STRICT, RELAXED],
        default=STRICT,
        help="store mode: flush on every put (strict) or on a timer (relaxed)",
    )
    parser.add_argument(
        "--values-per-call",
        type=int,
        default=None,
        metavar="N",
        help="store mode, write jobs: values per put_many call, each call durable as a whole "
        "(default 8 x iodepth); size/bs or more puts the whole job in one call, durable once "
        "at its end, as fio's end_fsync makes its job durable",
    )
    parser.add_argument("--rw", choices=RW_MODES, default="read")
    parser.add_argument("--bs", type=parse_size, default=4 << 20, help="block size (4k, 4M)")
    parser.add_argument("--iodepth", type=int, default=8)
    parser.add_argument("--numjobs", type=int, default=1)
    parser.add_argument(
        "--size",
        type=parse_size,
        default=None,
        help="bytes per job, spread over the targets (default: whole target)",
    )
    parser.add_argument("--runtime", type=float, default=None, help="seconds")
    parser.add_argument(
        "--time-based", action="store_true", help="repeat the region until --runtime has passed"
    )
    parser.add_argument("--output-format", choices=["normal", "json"], default="normal")
    parser.add_argument(
        "--compare-fio",
        action="store_true",
        help="also run fio's io_uring engine, interleaved with ctxkv",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="fio/ctxkv pairs with --compare-fio (default 3)"
    )
    add_io_path_argument(parser)
    parser.set_defaults(run=run)


def terminal_progress(label: str) -> ProgressCallback | None:
    """A progress line on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None

    def show(bytes_done: int, elapsed_s: float) -> None:
        rate = bytes_done / elapsed_s / (1 << 20) if elapsed_s else 0.0
        sys.stderr.write(
            f"\r{label}: {bytes_done / (1 << 20):.0f} MiB, {rate:.0f} MiB/s, {elapsed_s:.1f}s "
        )
        sys.stderr.flush()

    return show


def unwritten_regions(job: Job) -> list[str]:
    """Why reading these files would not measure a device: the ones with a never-written
    (sparse) region where the job may read, which the filesystem answers with zeros
    from memory."""
    found = []
    for target in job.targets:
        if not os.path.isfile(target):
            continue
        end = os.path.getsize(target)
        if job.size_bytes is not None:
            end = min(end, job.size_bytes // len(job.targets) * job.numjobs)
        with open(target, "rb") as file:
            hole = os.lseek(file.fileno(), 0, os.SEEK_HOLE)
        if hole < end:
            found.append(f"{target} has never-written regions from byte {hole}")
    return found


def run(arguments: argparse.Namespace) -> int:
    job = Job(
        targets=tuple(arguments.targets),
        rw=arguments.rw,
        block_bytes=arguments.bs,
        iodepth=arguments.iodepth,
        numjobs=arguments.numjobs,
        size_bytes=arguments.size,
        runtime_s=arguments.runtime,
        time_based=arguments.time_based,
        io_path=arguments.io_path,
    )
    normal = arguments.output_format == "normal"
    if job.is_read and (arguments.mode == "raw" or arguments.compare_fio):
        for problem in unwritten_regions(job):
            print(
                f"warning: {problem}: reads there measure no device; write it first "
                f"(a write job of the same size)",
                file=sys.stderr,
            )
    progress = terminal_progress(f"ctxkv {job.rw}")

    def clear_progress() -> None:
        if progress is not None:
            sys.stderr.write("\r\033[K")

    def store_runner(job: Job, on_progress: ProgressCallback | None) -> RunResult:
        return run_store(
            job, on_progress, durability=arguments.durability,
            values_per_call=arguments.values_per_call,
        )  # fmt: skip

    runner = store_runner if arguments.mode == "store" else run_raw
    if not arguments.compare_fio:
        result = runner(job, progress)
        clear_progress()
        print(
            describe_run(job, result, "ctxkv")
            if normal
            else json.dumps(run_json(job, result), indent=2)
        )
        return 0

    def show_run(round_index: int, result: RunResult) -> None:
        clear_progress()
        if normal:
            print(describe_run(job, result, f"round {round_index} {result.engine}"), flush=True)
        elif sys.stderr.isatty():
            sys.stderr.write(f"round {round_index}: {result.engine} done\n")

    runners = {"ctxkv": run_raw}
    if job.io_path == AUTO and all(split_target(target, AUTO)[1] for target in job.targets):
        # NVMe namespaces: both of ctxkv's paths, against fio's io_uring_cmd engine.
        job = dataclasses.replace(job, io_path=PASSTHRU)
        runners = {
            "ctxkv-passthru": run_raw,
            "ctxkv-block": lambda job, progress: run_raw(
                dataclasses.replace(job, io_path=BLOCK), progress
            ),
        }
    if arguments.mode == "store":
        runners["ctxkv-store"] = store_runner
    comparison = run_compare(job, arguments.rounds, show_run, progress, runners)
    if normal:
        print()
        print(describe_comparison(comparison))
    else:
        print(json.dumps(comparison_json(comparison), indent=2))
    return 0
