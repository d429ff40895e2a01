"""Tests of engine.nvme.device against real loop devices, mounts and files."""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.errors import (
    AlignmentError,
    CtxkvError,
    DeviceBusyError,
    DeviceNotFoundError,
    OutOfRangeError,
    ReadOnlyDeviceError,
    UnsupportedTargetError,
)
from engine.nvme.device import Device, Geometry, holders_of

MIB = 1024 * 1024
BLOCK_BYTES = 4096
NOBODY_ID = 65534


def sysfs_queue(device: str) -> Path:
    """The request-queue directory of a block device, found independently of the engine."""
    rdev = os.stat(device).st_rdev
    directory = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}").resolve()
    if (directory / "partition").exists():
        directory = directory.parent
    return directory / "queue"


def queue_int(device: str, name: str) -> int:
    return int((sysfs_queue(device) / name).read_text())


def write_block(fd: int, offset: int, byte: int) -> None:
    # An anonymous mapping is page-aligned, which every O_DIRECT target accepts.
    with mmap.mmap(-1, BLOCK_BYTES) as buffer:
        buffer.write(bytes([byte]) * BLOCK_BYTES)
        assert os.pwritev(fd, [buffer], offset) == BLOCK_BYTES


def read_block(fd: int, offset: int) -> bytes:
    with mmap.mmap(-1, BLOCK_BYTES) as buffer:
        assert os.preadv(fd, [buffer], offset) == BLOCK_BYTES
        return bytes(buffer)


def loop_image(device: str) -> str:
    name = os.path.basename(device)
    return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()


def add_partition(tool: Callable[..., str], device: str, start_bytes: int, size_bytes: int) -> str:
    # The kernel here parses no partition tables, so the partition is declared by BLKPG
    # (addpart), in 512-byte units whatever the sector size.
    tool("addpart", device, "1", str(start_bytes // 512), str(size_bytes // 512))
    partition = f"{device}p1"
    assert stat.S_ISBLK(os.stat(partition).st_mode), partition
    return partition


@pytest.fixture
def swap_on(
    loop_device: Callable[..., str], tool: Callable[..., str]
) -> Iterator[Callable[[str], None]]:
    """Factory: swap_on(device) makes and enables swap there; swapoff at teardown."""
    enabled: list[str] = []

    def enable(device: str) -> None:
        tool("mkswap", device)
        tool("swapon", device)
        enabled.append(device)

    yield enable

    for device in reversed(enabled):
        tool("swapoff", device)


# Geometry


def test_geometry_of_loop_device_with_4096_byte_sectors(loop_device):
    device = loop_device(size_bytes=64 * MIB, sector_bytes=4096)
    with Device.open(device) as target:
        geometry = target.geometry
        assert geometry.kind == "block"
        assert geometry.logical_block_bytes == 4096
        assert geometry.physical_block_bytes == 4096
        assert geometry.capacity_bytes == 64 * MIB
        assert geometry.max_transfer_bytes == queue_int(device, "max_sectors_kb") * 1024
        assert geometry.discard_supported is True
        assert target.path == device
        assert target.writable is True


def test_geometry_of_loop_device_with_512_byte_sectors(loop_device):
    device = loop_device(size_bytes=8 * MIB, sector_bytes=512)
    with Device.open(device) as target:
        assert target.geometry.logical_block_bytes == 512
        assert target.geometry.capacity_bytes == 8 * MIB
        assert target.geometry.max_transfer_bytes == queue_int(device, "max_sectors_kb") * 1024


def test_geometry_of_partition_reads_the_parent_queue(loop_device, tool):
    device = loop_device(size_bytes=64 * MIB, sector_bytes=4096)
    partition = add_partition(tool, device, start_bytes=1 * MIB, size_bytes=32 * MIB)
    with Device.open(partition) as target:
        assert target.geometry.capacity_bytes == 32 * MIB
        assert target.geometry.logical_block_bytes == 4096
        assert target.geometry.max_transfer_bytes == queue_int(device, "max_sectors_kb") * 1024
        assert target.geometry.discard_supported is True


def test_geometry_of_file(target_file):
    path = target_file(size_bytes=3 * MIB)
    with Device.open(path) as target:
        geometry = target.geometry
        assert geometry.kind == "file"
        assert geometry.capacity_bytes == 3 * MIB
        logical = geometry.logical_block_bytes
        assert logical & (logical - 1) == 0 and 0 < logical <= 4096
        assert geometry.physical_block_bytes >= logical
        assert geometry.max_transfer_bytes % logical == 0
        assert geometry.discard_supported is True
        # tmp_path is on ext4 on a disk: its DIO alignment is the disk's logical block, and
        # its largest transfer is the disk's.
        disk = os.stat(path).st_dev
        queue = Path(f"/sys/dev/block/{os.major(disk)}:{os.minor(disk)}").resolve()
        if not (queue / "queue").exists():
            queue = queue.parent
        assert logical == int((queue / "queue" / "logical_block_size").read_text())
        max_sectors_kb = int((queue / "queue" / "max_sectors_kb").read_text())
        assert geometry.max_transfer_bytes == max_sectors_kb * 1024


def test_file_on_a_4096_byte_sector_filesystem_needs_4096_byte_alignment(
    loop_device, mount_fs, tool
):
    # The root disk has 512-byte sectors: this catches a file geometry that ignores the
    # filesystem's real DIO alignment.
    device = loop_device(size_bytes=64 * MIB, sector_bytes=4096)
    tool("mkfs.ext4", "-q", "-F", device)
    mount_point = mount_fs(device)
    path = os.path.join(mount_point, "target.img")
    with open(path, "xb") as file:
        file.truncate(MIB)
    with Device.open(path) as target:
        assert target.geometry.logical_block_bytes == 4096
        assert target.geometry.capacity_bytes == MIB


def test_geometry_rejects_broken_invariants():
    good = dict(
        kind="block",
        logical_block_bytes=4096,
        physical_block_bytes=4096,
        capacity_bytes=64 * MIB,
        max_transfer_bytes=1280 * 1024,
        discard_supported=True,
    )
    Geometry(**good)
    for change in (
        {"kind": "tape"},
        {"logical_block_bytes": 3000},
        {"physical_block_bytes": 512},
        {"capacity_bytes": -4096},
        {"capacity_bytes": 4096 + 512},
        {"max_transfer_bytes": 4096 + 512},
    ):
        with pytest.raises(AssertionError):
            Geometry(**{**good, **change})


# Refusals


def test_missing_path_names_the_path(tmp_path):
    missing = str(tmp_path / "no-such-device")
    with pytest.raises(DeviceNotFoundError) as caught:
        Device.open(missing)
    assert missing in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert isinstance(caught.value, CtxkvError)


def test_relative_path_becomes_absolute(target_file, monkeypatch):
    path = target_file(size_bytes=MIB)
    monkeypatch.chdir(os.path.dirname(path))
    with Device.open(os.path.basename(path)) as target:
        assert target.path == path


@pytest.mark.parametrize("what", ["directory", "character device", "fifo"])
def test_neither_block_device_nor_file_is_refused(tmp_path, what):
    if what == "directory":
        path = str(tmp_path)
    elif what == "character device":
        path = "/dev/null"
    else:
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    with pytest.raises(UnsupportedTargetError) as caught:
        Device.open(path)
    assert path in str(caught.value)
    assert what in str(caught.value)


def test_filesystem_without_o_direct_is_refused(mount_fs):
    # ramfs has no direct I/O at all (tmpfs has it since Linux 6.6).
    mount_point = mount_fs("ramfs", fstype="ramfs")
    path = os.path.join(mount_point, "target.img")
    with open(path, "xb") as file:
        file.truncate(MIB)
    with pytest.raises(UnsupportedTargetError) as caught:
        Device.open(path)
    assert "O_DIRECT" in str(caught.value)
    assert path in str(caught.value)
    assert "ramfs" in str(caught.value)


def _open_as_nobody(path: str) -> str:
    """Device.open(path) in a child that dropped root; returns 'ExceptionType|message'."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report and leave without running any pytest machinery
        outcome = "no error"
        try:
            os.setgid(NOBODY_ID)
            os.setuid(NOBODY_ID)
            Device.open(path).close()
        except BaseException as error:
            outcome = f"{type(error).__name__}|{error}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return outcome


def test_permission_denied_names_the_path(tmp_path):
    # tmp_path's parents are private to root, so a reachable, unreadable file needs its own
    # world-searchable directory.
    directory = tempfile.mkdtemp(prefix="ctxkv-perm-")
    try:
        os.chmod(directory, 0o755)
        unreadable = os.path.join(directory, "target.img")
        with open(unreadable, "xb") as file:
            file.truncate(MIB)
        os.chmod(unreadable, 0o600)
        unreachable = str(tmp_path / "target.img")
        Path(unreachable).touch()
        for path in (unreadable, unreachable):
            kind, _, message = _open_as_nobody(path).partition("|")
            assert kind == "PermissionError", (path, kind, message)
            assert path in message
    finally:
        for entry in os.listdir(directory):
            os.unlink(os.path.join(directory, entry))
        os.rmdir(directory)


# Devices in use


@pytest.mark.parametrize("exclusive", [True, False])
def test_mounted_device_is_refused(loop_device, mount_fs, tool, exclusive):
    device = loop_device()
    tool("mkfs.ext4", "-q", "-F", device)
    mount_point = mount_fs(device)
    assert holders_of(device) == [f"mounted at {mount_point} (ext4)"]
    with pytest.raises(DeviceBusyError) as caught:
        Device.open(device, exclusive=exclusive)
    message = str(caught.value)
    assert device in message
    assert mount_point in message
    assert "ext4" in message


def test_mounted_partition_makes_the_whole_device_busy(loop_device, mount_fs, tool):
    device = loop_device()
    partition = add_partition(tool, device, start_bytes=1 * MIB, size_bytes=32 * MIB)
    tool("mkfs.ext4", "-q", "-F", partition)
    mount_point = mount_fs(partition)
    name = os.path.basename(partition)
    assert holders_of(device) == [f"partition {name} mounted at {mount_point} (ext4)"]
    with pytest.raises(DeviceBusyError) as caught:
        Device.open(device, exclusive=False)
    assert f"partition {name} mounted at {mount_point}" in str(caught.value)


def test_swap_device_is_refused(loop_device, swap_on):
    device = loop_device(size_bytes=16 * MIB)
    swap_on(device)
    assert holders_of(device) == ["used as swap"]
    with pytest.raises(DeviceBusyError) as caught:
        Device.open(device, exclusive=False)
    assert "used as swap" in str(caught.value)


def test_idle_device_has_no_holders(loop_device, target_file):
    assert holders_of(loop_device()) == []
    assert holders_of(target_file(size_bytes=MIB)) == []


def test_second_exclusive_open_is_refused_until_the_first_closes(loop_device):
    device = loop_device()
    first = Device.open(device, exclusive=True)
    try:
        with pytest.raises(DeviceBusyError) as caught:
            Device.open(device, exclusive=True)
        assert device in str(caught.value)
        assert "exclusively" in str(caught.value)
    finally:
        first.close()
    with Device.open(device, exclusive=True) as again:
        assert not again.closed


def test_non_exclusive_opens_take_no_claim(loop_device):
    device = loop_device()
    with (
        Device.open(device, exclusive=False),
        Device.open(device, exclusive=False),
        Device.open(device, exclusive=True) as claimed,
    ):
        assert claimed.exclusive


# check_io


@pytest.mark.parametrize(
    ("offset", "nbytes", "error", "named"),
    [
        (512, BLOCK_BYTES, AlignmentError, ["512", "4096"]),
        (BLOCK_BYTES, 1000, AlignmentError, ["1000", "4096"]),
        (0, 0, AlignmentError, ["0 bytes", "4096"]),
        (0, -BLOCK_BYTES, AlignmentError, ["-4096"]),
        (-BLOCK_BYTES, BLOCK_BYTES, OutOfRangeError, ["-4096"]),
        (MIB, BLOCK_BYTES, OutOfRangeError, [str(MIB), str(MIB + BLOCK_BYTES)]),
        (MIB - BLOCK_BYTES, 2 * BLOCK_BYTES, OutOfRangeError, [str(MIB - BLOCK_BYTES)]),
    ],
)
def test_check_io_refuses(loop_device, offset, nbytes, error, named):
    device = loop_device(size_bytes=MIB)
    with Device.open(device) as target:
        with pytest.raises(error) as caught:
            target.check_io(offset, nbytes)
        message = str(caught.value)
        assert device in message
        for value in named:
            assert value in message


def test_check_io_accepts_the_whole_range(loop_device):
    with Device.open(loop_device(size_bytes=MIB)) as target:
        target.check_io(0, MIB)
        target.check_io(MIB - BLOCK_BYTES, BLOCK_BYTES)


# discard


def test_discard_on_loop_device_reads_back_zeros(loop_device):
    device = loop_device()
    image = loop_image(device)
    offset = 3 * BLOCK_BYTES
    with Device.open(device) as target:
        for block in range(2, 5):
            write_block(target.fd, block * BLOCK_BYTES, 0xA5)
        assert read_block(target.fd, offset) == b"\xa5" * BLOCK_BYTES
        allocated_before = os.stat(image).st_blocks

        target.discard(offset, BLOCK_BYTES)

        assert read_block(target.fd, offset) == bytes(BLOCK_BYTES)
        # Only the discarded block went: its neighbours keep their data.
        assert read_block(target.fd, offset - BLOCK_BYTES) == b"\xa5" * BLOCK_BYTES
        assert read_block(target.fd, offset + BLOCK_BYTES) == b"\xa5" * BLOCK_BYTES
        # The loop driver punched the image: the space really went back.
        assert os.stat(image).st_blocks <= allocated_before - BLOCK_BYTES // 512


def test_discard_on_file_punches_a_hole(target_file):
    path = target_file(size_bytes=MIB)
    offset = 2 * BLOCK_BYTES
    with Device.open(path) as target:
        write_block(target.fd, offset, 0x5A)
        assert read_block(target.fd, offset) == b"\x5a" * BLOCK_BYTES
        allocated_before = os.stat(path).st_blocks
        assert allocated_before >= BLOCK_BYTES // 512

        target.discard(offset, BLOCK_BYTES)

        assert read_block(target.fd, offset) == bytes(BLOCK_BYTES)
        assert os.stat(path).st_blocks == allocated_before - BLOCK_BYTES // 512
        assert os.stat(path).st_size == MIB  # KEEP_SIZE


def test_discard_checks_the_range_first(loop_device, target_file):
    for path in (loop_device(size_bytes=MIB), target_file(size_bytes=MIB)):
        with Device.open(path) as target:
            write_block(target.fd, 0, 0x11)
            with pytest.raises(AlignmentError):
                target.discard(0, BLOCK_BYTES + 1)
            with pytest.raises(OutOfRangeError):
                target.discard(MIB - BLOCK_BYTES, 2 * BLOCK_BYTES)
            assert read_block(target.fd, 0) == b"\x11" * BLOCK_BYTES


@pytest.mark.parametrize("kind", ["block", "file"])
def test_read_only_open(loop_device, target_file, kind):
    path = loop_device(size_bytes=MIB) if kind == "block" else target_file(size_bytes=MIB)
    with Device.open(path, writable=False) as target:
        assert target.writable is False
        flags = fcntl.fcntl(target.fd, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDONLY
        assert flags & os.O_DIRECT
        with pytest.raises(ReadOnlyDeviceError) as caught:
            target.discard(0, BLOCK_BYTES)
        assert path in str(caught.value)
        assert "read-only" in str(caught.value)


@pytest.mark.parametrize("kind", ["block", "file"])
def test_writable_open_flags(loop_device, target_file, kind):
    path = loop_device(size_bytes=MIB) if kind == "block" else target_file(size_bytes=MIB)
    with Device.open(path) as target:
        flags = fcntl.fcntl(target.fd, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDWR
        assert flags & os.O_DIRECT
        assert fcntl.fcntl(target.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


# Lifetime


def test_close_is_idempotent(target_file):
    target = Device.open(target_file(size_bytes=MIB))
    fd = target.fd
    assert not target.closed
    target.close()
    assert target.closed
    assert target.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    target.close()
    assert target.closed
    with pytest.raises(ValueError, match="closed"):
        target.discard(0, BLOCK_BYTES)


def test_context_manager_closes_even_on_error(loop_device):
    device = loop_device(size_bytes=MIB)
    with pytest.raises(RuntimeError), Device.open(device) as target:
        raise RuntimeError("inside")
    assert target.closed
    # The exclusive claim went with the fd.
    with Device.open(device, exclusive=True):
        pass


def test_repr_names_path_kind_and_capacity(loop_device):
    device = loop_device(size_bytes=MIB)
    with Device.open(device) as target:
        text = repr(target)
    assert device in text
    assert "block" in text
    assert str(MIB) in text
    assert "closed" in repr(target)


def test_block_geometry_matches_kernel_ioctls(loop_device):
    # An independent read of the same ioctls guards the struct formats used by the engine.
    device = loop_device(size_bytes=16 * MIB, sector_bytes=4096)
    fd = os.open(device, os.O_RDONLY)
    try:
        size = struct.unpack("=Q", fcntl.ioctl(fd, 0x80081272, bytes(8)))[0]
    finally:
        os.close(fd)
    with Device.open(device, writable=False) as target:
        assert target.geometry.capacity_bytes == size == 16 * MIB
