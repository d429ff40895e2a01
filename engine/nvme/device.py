"""Opens a block device or a regular file for O_DIRECT I/O and learns its geometry.

Everything above this layer addresses the target by byte offset. This layer answers which
offsets and lengths the kernel will take, how big the target is, and whether someone else
(a mounted filesystem, device-mapper, swap, another exclusive opener) is using it, so that
ctxkv never writes raw blocks under a live user.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import os
import re
import stat
import struct
import time
import warnings
from dataclasses import dataclass

from engine.closing import Closeable
from engine.errors import (
    AlignmentError,
    DeviceBusyError,
    DeviceIOError,
    DeviceNotFoundError,
    OutOfRangeError,
    ReadOnlyDeviceError,
    UnsupportedTargetError,
)
from engine.nvme.passthru import (
    AUTO,
    Passthru,
    max_command_bytes,
    open_passthru,
    split_target,
)

# <linux/fs.h> block device ioctls.
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# <linux/fcntl.h>, <linux/stat.h>
AT_EMPTY_PATH = 0x1000
STATX_DIOALIGN = 0x2000

SYSFS_DEV_BLOCK = "/sys/dev/block"
SYSFS_BLOCK = "/sys/block"
PROC_MOUNTINFO = "/proc/self/mountinfo"
PROC_SWAPS = "/proc/swaps"

# Used when a file lives on something with no block queue in sysfs (tmpfs, overlayfs, NFS):
# 4 KiB satisfies every O_DIRECT implementation we know, and 1 MiB is below every
# max_sectors_kb we have seen, so neither guess can make an I/O fail.
FALLBACK_BLOCK_BYTES = 4096
FALLBACK_MAX_TRANSFER_BYTES = 1024 * 1024

KINDS = ("block", "file")

# How long an O_EXCL open waits for a claim the kernel has not let go of yet.
EXCLUSIVE_RETRY_S = 1.0


class _StatxTimestamp(ctypes.Structure):
    _fields_ = (
        ("tv_sec", ctypes.c_int64),
        ("tv_nsec", ctypes.c_uint32),
        ("__reserved", ctypes.c_int32),
    )


class _Statx(ctypes.Structure):
    """struct statx from <linux/stat.h>; only the mask and the DIO fields are read."""

    _fields_ = (
        ("stx_mask", ctypes.c_uint32),
        ("stx_blksize", ctypes.c_uint32),
        ("stx_attributes", ctypes.c_uint64),
        ("stx_nlink", ctypes.c_uint32),
        ("stx_uid", ctypes.c_uint32),
        ("stx_gid", ctypes.c_uint32),
        ("stx_mode", ctypes.c_uint16),
        ("__spare0", ctypes.c_uint16),
        ("stx_ino", ctypes.c_uint64),
        ("stx_size", ctypes.c_uint64),
        ("stx_blocks", ctypes.c_uint64),
        ("stx_attributes_mask", ctypes.c_uint64),
        ("stx_atime", _StatxTimestamp),
        ("stx_btime", _StatxTimestamp),
        ("stx_ctime", _StatxTimestamp),
        ("stx_mtime", _StatxTimestamp),
        ("stx_rdev_major", ctypes.c_uint32),
        ("stx_rdev_minor", ctypes.c_uint32),
        ("stx_dev_major", ctypes.c_uint32),
        ("stx_dev_minor", ctypes.c_uint32),
        ("stx_mnt_id", ctypes.c_uint64),
        ("stx_dio_mem_align", ctypes.c_uint32),
        ("stx_dio_offset_align", ctypes.c_uint32),
        ("__spare3", ctypes.c_uint64 * 12),
    )


# The kernel writes this struct: a layout slip would read garbage alignments silently.
assert ctypes.sizeof(_StatxTimestamp) == 16
assert ctypes.sizeof(_Statx) == 0x100
assert _Statx.stx_mnt_id.offset == 0x90
assert _Statx.stx_dio_mem_align.offset == 0x98
assert _Statx.stx_dio_offset_align.offset == 0x9C

# dlopen(NULL) finds whichever libc the interpreter runs on. ctypes drops the GIL for the
# duration of each call, which matters for a discard that can take seconds.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int
_statx = getattr(_libc, "statx", None)  # glibc >= 2.28
if _statx is not None:
    _statx.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_Statx),
    )
    _statx.restype = ctypes.c_int


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class Geometry:
    """What the kernel accepts for O_DIRECT I/O on one target, learned once at open."""

    kind: str  # "block" or "file"
    logical_block_bytes: int  # O_DIRECT offset and length alignment
    physical_block_bytes: int
    capacity_bytes: int  # block: BLKGETSIZE64; file: st_size at open
    max_transfer_bytes: int  # largest single I/O the queue takes without splitting
    discard_supported: bool

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        assert _is_power_of_two(self.logical_block_bytes), self.logical_block_bytes
        assert _is_power_of_two(self.physical_block_bytes), self.physical_block_bytes
        assert self.physical_block_bytes >= self.logical_block_bytes, self
        assert self.capacity_bytes >= 0, self.capacity_bytes
        if self.kind == "block":
            # The kernel sizes a block device in whole logical blocks.
            assert self.capacity_bytes % self.logical_block_bytes == 0, self
        assert self.max_transfer_bytes >= self.logical_block_bytes, self
        assert self.max_transfer_bytes % self.logical_block_bytes == 0, self
        assert isinstance(self.discard_supported, bool), self.discard_supported


class Device(Closeable):
    """An open block device or regular file, with every I/O done O_DIRECT.

    `exclusive` applies to block devices only (O_EXCL claims the device in the kernel, as a
    mount does); regular files are not locked.
    """

    path: str
    fd: int
    geometry: Geometry
    writable: bool
    exclusive: bool
    # Set on the NVMe passthrough path: the namespace's char device, which the ring sends
    # this device's I/O to; fd stays the block device's, holding the exclusive claim.
    passthru: Passthru | None

    def __init__(
        self,
        path: str,
        fd: int,
        geometry: Geometry,
        *,
        writable: bool,
        exclusive: bool,
        passthru: Passthru | None = None,
    ) -> None:
        assert os.path.isabs(path), path
        assert fd >= 0, fd
        self.path = path
        self.fd = fd
        self.geometry = geometry
        self.writable = writable
        self.exclusive = exclusive
        self.passthru = passthru

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        writable: bool = True,
        exclusive: bool = True,
        io_path: str = AUTO,
    ) -> Device:
        """io_path: block, passthru (NVMe namespaces only), or auto: passthrough for an
        NVMe namespace when the kernel can, the block layer otherwise. A /dev/ngXnY path
        opens its namespace's /dev/nvmeXnY for passthrough."""
        # abspath, not realpath: a /dev/disk/by-id name is what the operator configured and
        # recognises in messages, and it survives renumbering across boots.
        path_abs, use_passthru = split_target(os.path.abspath(os.fspath(path)), io_path)
        try:
            status = os.stat(path_abs)
        except (FileNotFoundError, NotADirectoryError):
            raise _not_found(path_abs) from None
        except PermissionError as error:
            raise PermissionError(
                error.errno, f"cannot look up {path_abs}: permission denied"
            ) from None

        if stat.S_ISBLK(status.st_mode):
            kind = "block"
        elif stat.S_ISREG(status.st_mode):
            kind = "file"
        else:
            # Refused before open(): opening a fifo or a tape blocks or has side effects.
            raise UnsupportedTargetError(
                f"{path_abs} is {_describe_mode(status.st_mode)}, "
                "not a block device or a regular file"
            )

        if kind == "block":
            # Checked even without O_EXCL: raw writes under a mounted filesystem corrupt it,
            # and the O_EXCL EBUSY alone would not say who holds the device.
            uses = _uses_of(status.st_rdev)
            if uses:
                raise _busy(path_abs, uses)

        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_DIRECT | os.O_CLOEXEC
        if kind == "block" and exclusive:
            flags |= os.O_EXCL
        try:
            fd = _open_exclusive_patiently(path_abs, flags)
        except OSError as error:
            raise _open_error(error, path_abs, kind, status, writable=writable) from None

        try:
            opened = os.fstat(fd)
            # The path may have been replaced between stat() and open().
            if (opened.st_dev, opened.st_ino, opened.st_rdev) != (
                status.st_dev,
                status.st_ino,
                status.st_rdev,
            ):
                raise UnsupportedTargetError(f"{path_abs} changed while it was being opened")
            if kind == "block":
                geometry = _block_geometry(fd, opened)
            else:
                geometry = _file_geometry(fd, opened, path_abs)
            passthru = None
            if use_passthru:
                # Last: nothing after it can fail and leave its fd open.
                geometry = dataclasses.replace(
                    geometry,
                    max_transfer_bytes=max_command_bytes(
                        path_abs, geometry.max_transfer_bytes, geometry.logical_block_bytes
                    ),
                )
                passthru = open_passthru(path_abs, geometry.logical_block_bytes, writable=writable)
        except BaseException:
            os.close(fd)
            raise
        return cls(
            path_abs, fd, geometry, writable=writable, exclusive=exclusive, passthru=passthru
        )

    @property
    def io_path(self) -> str:
        """How I/O reaches the target: passthru, block or file."""
        return "passthru" if self.passthru is not None else self.geometry.kind

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def check_io(self, offset: int, nbytes: int) -> None:
        """Raises unless [offset, offset + nbytes) is an O_DIRECT-legal range of the target."""
        assert isinstance(offset, int), offset
        assert isinstance(nbytes, int), nbytes
        logical_block_bytes = self.geometry.logical_block_bytes
        capacity_bytes = self.geometry.capacity_bytes
        if offset < 0:
            raise OutOfRangeError(f"{self.path}: offset {offset} is negative")
        if nbytes <= 0:
            raise AlignmentError(
                f"{self.path}: length {nbytes} bytes is not a positive multiple of the "
                f"{logical_block_bytes}-byte logical block"
            )
        if offset % logical_block_bytes != 0:
            raise AlignmentError(
                f"{self.path}: offset {offset} is not a multiple of the "
                f"{logical_block_bytes}-byte logical block"
            )
        if nbytes % logical_block_bytes != 0:
            raise AlignmentError(
                f"{self.path}: length {nbytes} bytes is not a multiple of the "
                f"{logical_block_bytes}-byte logical block"
            )
        if offset + nbytes > capacity_bytes:
            raise OutOfRangeError(
                f"{self.path}: {nbytes} bytes at offset {offset} end at {offset + nbytes}, "
                f"past the capacity of {capacity_bytes} bytes"
            )

    def discard(self, offset: int, nbytes: int) -> None:
        """Tells the target the range is unused; it reads back as zeros afterwards."""
        self._check_open()
        if not self.writable:
            raise ReadOnlyDeviceError(
                f"{self.path} was opened read-only; discard of {nbytes} bytes at offset "
                f"{offset} needs writable=True"
            )
        self.check_io(offset, nbytes)
        if self.passthru is not None and self.geometry.discard_supported:
            self.passthru.deallocate(offset, nbytes, device_path=self.path)
            return
        if self.geometry.kind == "block":
            if not self.geometry.discard_supported:
                raise UnsupportedTargetError(
                    f"{self.path} does not support discard (queue/discard_max_bytes is 0)"
                )
            byte_range = (ctypes.c_uint64 * 2)(offset, nbytes)
            result = _libc.ioctl(self.fd, BLKDISCARD, ctypes.addressof(byte_range))
            what = "BLKDISCARD"
        else:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            result = _libc.fallocate(self.fd, mode, offset, nbytes)
            what = "fallocate(PUNCH_HOLE)"
        if result == 0:
            return
        assert result == -1, result
        error_number = ctypes.get_errno()
        if error_number in (errno.EOPNOTSUPP, errno.ENOTTY):
            raise UnsupportedTargetError(
                f"{self.path} does not support discard: {what} failed with "
                f"{os.strerror(error_number)}"
            )
        raise DeviceIOError(
            error_number, path=self.path, op="discard", offset=offset, nbytes=nbytes
        )

    def close(self) -> None:
        if self.fd < 0:
            return
        fd = self.fd
        # Marked closed first: a stale number must never reach a later, unrelated file.
        self.fd = -1
        if self.passthru is not None:
            os.close(self.passthru.fd)
        os.close(fd)

    def _check_open(self) -> None:
        if self.fd < 0:
            raise ValueError(f"{self.path} is closed")

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("rw" if self.writable else "ro")
        return (
            f"Device(path={self.path!r}, kind={self.geometry.kind}, io_path={self.io_path}, "
            f"capacity_bytes={self.geometry.capacity_bytes}, "
            f"logical_block_bytes={self.geometry.logical_block_bytes}, {state})"
        )


def holders_of(path: str) -> list[str]:
    """Describes who uses the block device at path: mounts, kernel holders, swap.

    Partitions of the device count. Returns [] for a device nobody uses, and for anything
    that is not a block device. Another process's plain open() leaves no trace to report.
    """
    try:
        status = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise _not_found(os.path.abspath(path)) from None
    if not stat.S_ISBLK(status.st_mode):
        return []
    return _uses_of(status.st_rdev)


def _not_found(path: str) -> DeviceNotFoundError:
    error = DeviceNotFoundError(f"no such device or file: {path}")
    # Set after construction so str() stays the plain message, without "[Errno 2]".
    error.errno = errno.ENOENT
    return error


def _busy(path: str, uses: list[str]) -> DeviceBusyError:
    if uses:
        who = "; ".join(uses)
    else:
        who = "another process has it open exclusively (O_EXCL), for example another ctxkv"
    error = DeviceBusyError(f"{path} is in use: {who}; refusing to open it")
    error.errno = errno.EBUSY
    return error


def _open_exclusive_patiently(path: str, flags: int) -> int:
    """os.open, retried for a moment on EBUSY with O_EXCL. The kernel lets go of a block
    device asynchronously after an io_uring that had it registered is torn down, so a
    store reopened at once (close, then open; a scrub that rebuilds, then checks) can
    find its own last claim still held for a few milliseconds."""
    deadline = time.monotonic() + EXCLUSIVE_RETRY_S
    delay_s = 0.001
    while True:
        try:
            return os.open(path, flags)
        except OSError as error:
            if error.errno != errno.EBUSY or not flags & os.O_EXCL or time.monotonic() > deadline:
                raise
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, 0.05)


def _open_error(
    error: OSError, path: str, kind: str, status: os.stat_result, *, writable: bool
) -> BaseException:
    mode = "read-write" if writable else "read-only"
    if error.errno == errno.EBUSY and kind == "block":
        return _busy(path, _uses_of(status.st_rdev))
    if error.errno == errno.EINVAL:
        # open() answers EINVAL for O_DIRECT on a filesystem without direct I/O (ramfs, some
        # FUSE); every other flag we pass is valid everywhere.
        fstype = _fstype_of(status.st_dev)
        on = f"the {fstype} filesystem holding {path}" if fstype else f"the filesystem of {path}"
        return UnsupportedTargetError(
            f"O_DIRECT is not supported on {on}; put the target on a disk filesystem "
            "(ext4, xfs) or a block device"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return PermissionError(error.errno, f"cannot open {path} {mode}: permission denied")
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return _not_found(path)
    return type(error)(error.errno, f"cannot open {path} {mode}: {os.strerror(error.errno)}")


def _describe_mode(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return f"a file of mode {stat.filemode(mode)}"


def _ioctl_uint(fd: int, request: int, fmt: str) -> int:
    buffer = bytes(struct.calcsize(fmt))
    (value,) = struct.unpack(fmt, fcntl.ioctl(fd, request, buffer))
    return value


def _block_geometry(fd: int, status: os.stat_result) -> Geometry:
    logical_block_bytes = _ioctl_uint(fd, BLKSSZGET, "=i")
    physical_block_bytes = _ioctl_uint(fd, BLKPBSZGET, "=I")
    capacity_bytes = _ioctl_uint(fd, BLKGETSIZE64, "=Q")
    queue = _sysfs_queue_dir(status.st_rdev)
    max_sectors_kb = _read_sysfs_int(queue, "max_sectors_kb")
    discard_max_bytes = _read_sysfs_int(queue, "discard_max_bytes")
    if max_sectors_kb is None:
        # No sysfs (a container without /sys): the guess only costs extra splitting.
        max_transfer_bytes = FALLBACK_MAX_TRANSFER_BYTES
    else:
        max_transfer_bytes = max_sectors_kb * 1024
    return Geometry(
        kind="block",
        logical_block_bytes=logical_block_bytes,
        physical_block_bytes=max(physical_block_bytes, logical_block_bytes),
        capacity_bytes=capacity_bytes,
        max_transfer_bytes=_round_transfer(max_transfer_bytes, logical_block_bytes),
        discard_supported=discard_max_bytes is not None and discard_max_bytes > 0,
    )


def _file_geometry(fd: int, status: os.stat_result, path: str) -> Geometry:
    queue = _sysfs_queue_dir(status.st_dev)
    queue_logical_bytes = _read_sysfs_int(queue, "logical_block_size")
    queue_physical_bytes = _read_sysfs_int(queue, "physical_block_size")
    max_sectors_kb = _read_sysfs_int(queue, "max_sectors_kb")

    dio = _statx_dio_alignment(fd)
    if dio is not None:
        _dio_mem_align_bytes, logical_block_bytes = dio
        if logical_block_bytes == 0:
            # The filesystem reports DIO alignment and says it has none: no direct I/O.
            raise UnsupportedTargetError(
                f"O_DIRECT is not supported on the filesystem of {path} "
                "(statx reports no direct I/O alignment)"
            )
    elif queue_logical_bytes is not None:
        logical_block_bytes = queue_logical_bytes
    else:
        logical_block_bytes = FALLBACK_BLOCK_BYTES

    physical_block_bytes = queue_physical_bytes or logical_block_bytes
    if max_sectors_kb is None:
        max_transfer_bytes = FALLBACK_MAX_TRANSFER_BYTES
    else:
        max_transfer_bytes = max_sectors_kb * 1024
    return Geometry(
        kind="file",
        logical_block_bytes=logical_block_bytes,
        physical_block_bytes=max(physical_block_bytes, logical_block_bytes),
        capacity_bytes=status.st_size,
        max_transfer_bytes=_round_transfer(max_transfer_bytes, logical_block_bytes),
        # Punching holes is tried at discard time; filesystems without it answer EOPNOTSUPP.
        discard_supported=True,
    )


def _round_transfer(max_transfer_bytes: int, logical_block_bytes: int) -> int:
    # max_sectors_kb counts KiB, so with blocks above 1 KiB it need not be a whole number of
    # blocks; an I/O is only legal in whole blocks, so round down, but never below one.
    return max(logical_block_bytes, max_transfer_bytes // logical_block_bytes * logical_block_bytes)


def _statx_dio_alignment(fd: int) -> tuple[int, int] | None:
    """(memory alignment, offset alignment) for O_DIRECT on fd, or None if not reported."""
    if _statx is None:
        return None
    buffer = _Statx()
    result = _statx(fd, b"", AT_EMPTY_PATH, STATX_DIOALIGN, ctypes.byref(buffer))
    if result != 0:
        # ENOSYS under old seccomp filters; the caller falls back to the block queue.
        return None
    if buffer.stx_mask & STATX_DIOALIGN == 0:
        return None
    return buffer.stx_dio_mem_align, buffer.stx_dio_offset_align


def _sysfs_dir(dev: int) -> str | None:
    directory = os.path.join(SYSFS_DEV_BLOCK, f"{os.major(dev)}:{os.minor(dev)}")
    if not os.path.isdir(directory):
        return None
    return os.path.realpath(directory)


def _sysfs_queue_dir(dev: int) -> str | None:
    directory = _sysfs_dir(dev)
    if directory is None:
        return None
    queue = os.path.join(directory, "queue")
    if not os.path.isdir(queue):
        # A partition shares the request queue of its whole disk, one level up.
        queue = os.path.join(os.path.dirname(directory), "queue")
    return queue if os.path.isdir(queue) else None


def _read_sysfs_text(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return None


def _read_sysfs_int(directory: str | None, name: str) -> int | None:
    if directory is None:
        return None
    text = _read_sysfs_text(os.path.join(directory, name))
    if text is None or not text.isdigit():
        return None
    return int(text)


def _parse_dev(text: str) -> int | None:
    major, _, minor = text.partition(":")
    if not (major.isdigit() and minor.isdigit()):
        return None
    return os.makedev(int(major), int(minor))


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # mountinfo and /proc/swaps write space, tab, newline and backslash as \ooo.
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


@dataclass(frozen=True)
class _Mount:
    dev: int
    mount_point: str
    fstype: str
    source: str


def _mounts() -> list[_Mount]:
    text = _read_sysfs_text(PROC_MOUNTINFO)
    if text is None:
        return []
    mounts = []
    for line in text.splitlines():
        # id parent major:minor root mount_point options [optional...] - fstype source super
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue
        dev = _parse_dev(fields[2])
        if dev is None or separator + 2 >= len(fields):
            continue
        mounts.append(
            _Mount(
                dev=dev,
                mount_point=_unescape(fields[4]),
                fstype=fields[separator + 1],
                source=_unescape(fields[separator + 2]),
            )
        )
    return mounts


def _fstype_of(dev: int) -> str | None:
    for mount in _mounts():
        if mount.dev == dev:
            return mount.fstype
    return None


def _rdev_of(path: str) -> int | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_rdev if stat.S_ISBLK(status.st_mode) else None


def _uses_of(rdev: int) -> list[str]:
    """Descriptions of every user the kernel shows for the device rdev and its partitions."""
    directory = _sysfs_dir(rdev)
    # Maps each device number of the disk and of its partitions to how messages name it.
    prefixes = {rdev: ""}
    holder_dirs = []
    if directory is not None:
        holder_dirs.append(("", os.path.join(directory, "holders")))
        for entry in sorted(os.listdir(directory)):
            partition = os.path.join(directory, entry)
            if not os.path.isfile(os.path.join(partition, "partition")):
                continue
            partition_dev = _parse_dev(_read_sysfs_text(os.path.join(partition, "dev")) or "")
            if partition_dev is None:
                continue
            prefixes[partition_dev] = f"partition {entry} "
            holder_dirs.append((f"partition {entry} ", os.path.join(partition, "holders")))

    uses = []
    for mount in _mounts():
        dev = mount.dev
        # btrfs and others mount with an anonymous 0:N device number; only the source path
        # then names the disk.
        if os.major(dev) == 0 and mount.source.startswith("/dev/"):
            dev = _rdev_of(mount.source) or dev
        if dev in prefixes:
            uses.append(f"{prefixes[dev]}mounted at {mount.mount_point} ({mount.fstype})")

    for prefix, holders in holder_dirs:
        try:
            names = sorted(os.listdir(holders))
        except OSError:
            continue
        for name in names:
            dm_name = _read_sysfs_text(os.path.join(SYSFS_BLOCK, name, "dm", "name"))
            suffix = f" ({dm_name})" if dm_name else ""
            uses.append(f"{prefix}held by {name}{suffix}")

    swaps = _read_sysfs_text(PROC_SWAPS)
    for line in (swaps or "").splitlines()[1:]:
        fields = line.split()
        if not fields:
            continue
        swap_dev = _rdev_of(_unescape(fields[0]))
        if swap_dev in prefixes:
            uses.append(f"{prefixes[swap_dev]}used as swap")

    # A bind mount can repeat a line; keep the first of each.
    return list(dict.fromkeys(uses))
