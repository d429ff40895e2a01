"""`ctxkv bench`: fio-schema output, the fio comparison, io_uring doing the data I/O,
and clear errors for bad targets. Speed itself is measured in bench/, not asserted here."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from engine.bench.compare import Comparison
from engine.bench.fio import fio_arguments
from engine.bench.job import Job, format_size, parse_size
from engine.bench.report import comparison_json, describe_comparison
from engine.bench.result import RunResult

MIB = 1 << 20
CTXKV = [sys.executable, "-m", "engine.cli.main"]


def ctxkv(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run([*CTXKV, *arguments], capture_output=True, text=True, check=False)
    if check and completed.returncode != 0:
        pytest.fail(
            f"ctxkv {' '.join(arguments)} exited {completed.returncode}: {completed.stderr}"
        )
    return completed


def test_sizes_read_like_fio():
    assert parse_size("4k") == 4096
    assert parse_size("4M") == 4 * MIB
    assert parse_size("1g") == 1 << 30
    assert parse_size("4096") == 4096
    assert format_size(4 * MIB) == "4M"
    assert format_size(1280 * 1024) == "1280K"
    with pytest.raises(ValueError, match="cannot read 'four'"):
        parse_size("four")


def test_fio_gets_the_same_job():
    job = Job(
        targets=("/dev/loop0", "/tmp/a:b"),
        rw="randwrite",
        block_bytes=4 * MIB,
        iodepth=8,
        numjobs=2,
        size_bytes=64 * MIB,
        runtime_s=3,
        time_based=True,
    )
    arguments = fio_arguments(job)
    for expected in [
        "--filename=/dev/loop0:/tmp/a\\:b",
        "--rw=randwrite",
        "--bs=4M",
        "--iodepth=8",
        "--numjobs=2",
        f"--size={64 * MIB}",
        "--runtime=3s",
        "--time_based=1",
        "--ioengine=io_uring",
        "--direct=1",
        "--fixedbufs=1",
        "--registerfiles=1",
        "--lat_percentiles=1",
        "--output-format=json",
    ]:
        assert expected in arguments


@pytest.mark.parametrize("rw", ["write", "read", "randread", "randwrite"])
def test_json_output_follows_fio_schema(target_file, rw):
    target = target_file(size_bytes=32 * MIB)
    completed = ctxkv(
        "bench",
        "--rw",
        rw,
        "--bs",
        "1M",
        "--iodepth",
        "4",
        "--size",
        "16M",
        "--output-format",
        "json",
        target,
    )
    report = json.loads(completed.stdout)
    [job] = report["jobs"]
    direction = "read" if "read" in rw else "write"
    other = "write" if direction == "read" else "read"
    section = job[direction]
    assert section["io_bytes"] == 16 * MIB and section["total_ios"] == 16
    assert section["bw_bytes"] > 0 and section["iops"] > 0
    assert section["clat_ns"] == section["lat_ns"]
    percentiles = section["lat_ns"]["percentile"]
    assert 0 < percentiles["50.000000"] <= percentiles["99.000000"] <= percentiles["99.900000"]
    assert job[other]["io_bytes"] == 0
    assert job["ctxkv"]["usr_cpu_ns_per_op"] >= 0
    assert "SINGLE_ISSUER" in job["ctxkv"]["ring_setup_flags"]


@pytest.mark.parametrize("runtime", ["", "1"])
def test_store_mode_puts_then_streams_every_value(target_file, runtime):
    """--mode store: a put job stores size/bs values (32 here: at least 8 per queue slot);
    a read job streams them all back through read_iter, verified (a missing one fails the
    run); time-based jobs go on over their keys until the runtime is up."""
    target = target_file(size_bytes=64 * MIB)
    timing = ["--runtime", runtime, "--time-based"] if runtime else []
    for rw in ("write", "read"):
        completed = ctxkv(
            "bench", "--mode", "store", "--rw", rw, "--bs", "1M", "--iodepth", "4",
            "--size", "32M", *timing, "--output-format", "json", target,
        )  # fmt: skip
        [job] = json.loads(completed.stdout)["jobs"]
        section = job[rw]
        if not runtime:
            assert section["io_bytes"] == 32 * MIB and section["total_ios"] == 32
        else:
            assert section["io_bytes"] > 32 * MIB and section["io_bytes"] % MIB == 0
        assert section["bw_bytes"] > 0 and section["lat_ns"]["percentile"]["50.000000"] > 0


def test_store_mode_puts_as_many_values_per_call_as_asked(target_file):
    """--values-per-call sets put_many's batch, each call one journal commit: 32 values in
    calls of 8 are 4 commits, in one call of them all 1 (fio end_fsync's granularity: the
    store is over four times the job, so the call is not split into groups)."""
    target = target_file(size_bytes=192 * MIB)
    for per_call, commits in (("8", 4), ("32", 1)):
        completed = ctxkv(
            "bench", "--mode", "store", "--rw", "write", "--bs", "1M", "--iodepth", "4",
            "--size", "32M", "--values-per-call", per_call, "--output-format", "json", target,
        )  # fmt: skip
        [job] = json.loads(completed.stdout)["jobs"]
        assert job["write"]["io_bytes"] == 32 * MIB
        assert job["ctxkv"]["values_per_call"] == int(per_call)
        assert job["ctxkv"]["journal_commits"] == commits
    refused = ctxkv(
        "bench", "--mode", "store", "--rw", "write", "--size", "32M", "--values-per-call", "0",
        target, check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "values per call must be positive" in refused.stderr


def test_numjobs_and_several_targets(loop_device, target_file):
    targets = [loop_device(size_bytes=16 * MIB), target_file(size_bytes=16 * MIB)]
    completed = ctxkv(
        "bench",
        "--rw",
        "write",
        "--bs",
        "64k",
        "--iodepth",
        "2",
        "--numjobs",
        "2",
        "--size",
        "8M",
        "--output-format",
        "json",
        *targets,
    )
    [job] = json.loads(completed.stdout)["jobs"]
    # Each job writes its 8M, half on each target.
    assert job["write"]["io_bytes"] == 2 * 8 * MIB


def test_compare_fio_interleaves_and_reports_ratios(loop_device):
    target = loop_device(size_bytes=32 * MIB)
    completed = ctxkv(
        "bench",
        "--compare-fio",
        "--rounds",
        "2",
        "--rw",
        "read",
        "--bs",
        "1M",
        "--iodepth",
        "4",
        "--size",
        "16M",
        "--output-format",
        "json",
        target,
    )
    report = json.loads(completed.stdout)
    names = [job["jobname"] for job in report["jobs"]]
    assert names == ["fio-round1", "ctxkv-round1", "fio-round2", "ctxkv-round2"]
    for job in report["jobs"]:
        assert job["read"]["io_bytes"] == 16 * MIB
    ratio = report["comparison"]["ratio_over_fio"]["ctxkv"]["bw_bytes"]
    median_fio = report["comparison"]["median"]["fio"]["bw_bytes"]
    median_ctxkv = report["comparison"]["median"]["ctxkv"]["bw_bytes"]
    assert ratio == pytest.approx(median_ctxkv / median_fio)
    assert report["fio version"].startswith("fio-")


def test_a_ratio_over_a_fio_figure_of_zero_is_none_not_nan():
    """A short fio run often reports 0% user CPU: the comparison has no ratio for it
    (JSON null, "n/a" in text) rather than a NaN that strict JSON readers refuse."""
    job = Job(targets=("/dev/null",), rw="read", size_bytes=4 << 20)

    def result(engine: str, usr_cpu_ns: int) -> RunResult:
        return RunResult.from_latencies(
            engine=engine, direction="read", io_bytes=4 << 20, runtime_ns=10**6,
            lat_ns=np.array([1000, 2000]), usr_cpu_ns=usr_cpu_ns, sys_cpu_ns=0,
            extra={"fio_mem": "shmhuge"} if engine == "fio" else {},
        )  # fmt: skip

    comparison = Comparison(job, {"fio": [result("fio", 0)], "ctxkv": [result("ctxkv", 500)]})
    ratio = comparison.summary()["ratio_over_fio"]["ctxkv"]
    assert ratio["usr_cpu_ns_per_op"] is None and ratio["bw_bytes"] == pytest.approx(1.0)

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in the JSON report")

    report = json.loads(json.dumps(comparison_json(comparison)), parse_constant=refuse)
    assert report["comparison"]["ratio_over_fio"]["ctxkv"]["usr_cpu_ns_per_op"] is None
    assert "usr CPU per I/O n/a (fio measured 0)" in describe_comparison(comparison)


def test_normal_output_prints_both_and_the_ratio(target_file):
    target = target_file(size_bytes=16 * MIB)
    completed = ctxkv(
        "bench",
        "--compare-fio",
        "--rounds",
        "1",
        "--rw",
        "write",
        "--bs",
        "1M",
        "--size",
        "8M",
        target,
    )
    assert "round 1 fio" in completed.stdout and "round 1 ctxkv" in completed.stdout
    assert re.search(r"ctxkv/fio \(medians\): bandwidth \d+\.\d+", completed.stdout)


def test_reading_a_sparse_file_warns_that_it_measures_no_device(target_file):
    target = target_file(size_bytes=16 * MIB)
    read_job = ("bench", "--rw", "read", "--bs", "1M", "--size", "8M", target)
    assert "never-written regions" in ctxkv(*read_job).stderr
    ctxkv("bench", "--rw", "write", "--bs", "1M", target)  # the whole file, once
    assert "never-written" not in ctxkv(*read_job).stderr


def test_io_uring_enter_does_the_data_io(target_file):
    target = target_file(size_bytes=32 * MIB)
    trace = os.path.join(os.path.dirname(target), "strace.out")
    subprocess.run(
        [
            "strace",
            "-f",
            "-o",
            trace,
            "-e",
            "trace=openat,close,read,write,pread64,pwrite64,preadv,"
            "pwritev,preadv2,pwritev2,io_uring_enter",
            *CTXKV,
            "bench",
            "--rw",
            "read",
            "--bs",
            "1M",
            "--iodepth",
            "4",
            "--size",
            "16M",
            target,
        ],
        check=True,
        capture_output=True,
    )
    with open(trace) as file:
        lines = file.read().splitlines()
    # With -f, a call interrupted by another thread's is split into "<unfinished ...>" and
    # "<... resumed>" lines, so the fd may be on the line after the openat.
    [opened] = [
        i
        for i, line in enumerate(lines)
        if "openat(" in line and target in line and "O_DIRECT" in line
    ]
    fd = next(
        match.group(1)
        for line in lines[opened:]
        if (match := re.search(r"(?:O_CLOEXEC\)|openat resumed>.*\)) += (\d+)$", line))
    )
    closed = next(
        i for i, line in enumerate(lines) if i > opened and re.search(rf"close\({fd}\b", line)
    )
    while_open = lines[opened + 1 : closed]
    on_target = [line for line in while_open if re.search(rf"\b(p?read|p?write)\w*\({fd},", line)]
    assert on_target == [], on_target[:5]
    enters = [line for line in lines if "io_uring_enter(" in line]
    # 16 reads of 1 MiB at depth 4: a handful of batched enters, not one per byte moved.
    assert 4 <= len(enters) <= 64, len(enters)


def test_missing_target_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nope.img")
    completed = ctxkv("bench", "--size", "4M", missing, check=False)
    assert completed.returncode == 1
    assert missing in completed.stderr and "Traceback" not in completed.stderr


def test_mounted_device_is_refused(loop_device, mount_fs, tool):
    device = loop_device(size_bytes=64 * MIB)
    tool("mkfs.ext4", "-q", "-F", device)
    mount_point = mount_fs(device)
    completed = ctxkv("bench", "--rw", "write", "--size", "4M", device, check=False)
    assert completed.returncode == 1
    assert mount_point in completed.stderr and "Traceback" not in completed.stderr


def test_bad_job_is_a_clear_error(target_file):
    target = target_file(size_bytes=4 * MIB)
    completed = ctxkv("bench", "--size", "64M", target, check=False)
    assert completed.returncode == 1 and "holds 4194304" in completed.stderr
    completed = ctxkv("bench", "--iodepth", "0", target, check=False)
    assert completed.returncode == 1 and "iodepth must be in 1..4096" in completed.stderr
