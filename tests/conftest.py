"""Shared fixtures: loop devices, mounts and O_DIRECT-capable files.

Every fixture removes exactly what it made, by name, even when the test failed, and never
touches a loop device or mount it did not create: other test runs may share the machine.
A missing tool or missing root fails the test loudly; skipping would hide a broken CI image.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MIB = 1024 * 1024

# Which package provides each external tool, so a failure says what to install.
TOOL_PACKAGES = {
    "losetup": "util-linux",
    "addpart": "util-linux",
    "delpart": "util-linux",
    "mount": "mount (util-linux)",
    "umount": "mount (util-linux)",
    "mkswap": "util-linux",
    "swapon": "util-linux",
    "swapoff": "util-linux",
    "mkfs.ext4": "e2fsprogs",
}


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (loop devices, mounts); run pytest as root")


def run_tool(*argv: str) -> str:
    """Runs an external tool and returns its stdout; fails the test with its stderr."""
    tool = argv[0]
    if shutil.which(tool) is None:
        package = TOOL_PACKAGES.get(tool, "the package that provides it")
        pytest.fail(f"{tool} not found on PATH: install {package}")
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited with {result.returncode}: {result.stderr.strip()}")
    return result.stdout


@pytest.fixture
def tool() -> Callable[..., str]:
    """run_tool as a fixture: tool("mkfs.ext4", "-q", "-F", device)."""
    return run_tool


def _loop_backing_file(device: str) -> str | None:
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as file:
            backing = file.read().strip()
    except FileNotFoundError:
        return None  # not attached
    return backing.removesuffix(" (deleted)")


def _loop_partition_numbers(device: str) -> list[str]:
    name = os.path.basename(device)
    numbers = []
    for entry in Path(f"/sys/block/{name}").iterdir():
        partition_file = entry / "partition"
        if partition_file.is_file():
            numbers.append(partition_file.read_text().strip())
    return numbers


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: loop_device(size_bytes=64 MiB, sector_bytes=4096) -> "/dev/loopN".

    The image is sparse, under tmp_path, attached with direct I/O so reads and writes reach
    the image file without a second page cache.
    """
    require_root()
    made: list[tuple[str, str]] = []  # (device, image)

    def make(size_bytes: int = 64 * MIB, sector_bytes: int = 4096) -> str:
        assert size_bytes > 0 and size_bytes % sector_bytes == 0, (size_bytes, sector_bytes)
        image = tmp_path / f"loop-{len(made)}.img"
        with open(image, "xb") as file:
            file.truncate(size_bytes)
        device = run_tool(
            "losetup",
            "--direct-io=on",
            "--sector-size",
            str(sector_bytes),
            "-f",
            "--show",
            str(image),
        ).strip()
        assert device.startswith("/dev/loop"), device
        made.append((device, os.path.realpath(image)))
        assert _loop_backing_file(device) == os.path.realpath(image), device
        return device

    yield make

    failures = []
    for device, image in reversed(made):
        # A test may have detached its device already and the number been reused since.
        if _loop_backing_file(device) != image:
            continue
        try:
            # Partitions added by hand outlive the detach on a loop device without partscan.
            for number in _loop_partition_numbers(device):
                run_tool("delpart", device, number)
            run_tool("losetup", "-d", device)
        except (Exception, pytest.fail.Exception) as error:
            failures.append(f"{device}: {error}")
    if failures:
        pytest.fail("could not clean up loop devices: " + "; ".join(failures))


@pytest.fixture
def mount_fs(loop_device: Callable[..., str], tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: mount_fs(source, fstype=None, options=None) -> mount point under tmp_path.

    Depends on loop_device so that its teardown (unmount) runs before the loop devices are
    detached, whatever order a test names the fixtures in.
    """
    require_root()
    mounted: list[str] = []

    def mount(source: str, *, fstype: str | None = None, options: str | None = None) -> str:
        mount_point = tmp_path / f"mnt-{len(mounted)}"
        mount_point.mkdir()
        argv = ["mount"]
        if fstype is not None:
            argv += ["-t", fstype]
        if options is not None:
            argv += ["-o", options]
        run_tool(*argv, source, str(mount_point))
        mounted.append(str(mount_point))
        return str(mount_point)

    yield mount

    failures = []
    for mount_point in reversed(mounted):
        if not os.path.ismount(mount_point):
            continue
        result = subprocess.run(["umount", mount_point], capture_output=True, text=True)
        if result.returncode != 0:
            # Still busy (a file left open by the failed test): detach it lazily so the loop
            # device can go, and report the test's leak.
            subprocess.run(["umount", "-l", mount_point], capture_output=True, check=False)
            failures.append(f"{mount_point}: {result.stderr.strip()}")
    if failures:
        pytest.fail("could not unmount cleanly: " + "; ".join(failures))


@pytest.fixture
def target_file(tmp_path: Path) -> Callable[..., str]:
    """Factory: target_file(size_bytes=64 MiB) -> path of a sparse file under tmp_path."""
    made: list[Path] = []

    def make(size_bytes: int = 64 * MIB) -> str:
        assert size_bytes >= 0, size_bytes
        path = tmp_path / f"target-{len(made)}.img"
        with open(path, "xb") as file:
            file.truncate(size_bytes)
        made.append(path)
        # tmp_path must allow O_DIRECT or every test using it would fail for a reason
        # unrelated to what it tests.
        try:
            os.close(os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC))
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            pytest.fail(
                f"{tmp_path} is on a filesystem without O_DIRECT; "
                "run pytest with --basetemp on a disk filesystem"
            )
        return str(path)

    return make
