"""The NVMe passthrough I/O path: a namespace's generic char device (/dev/ngXnY) taking
NVMe Read, Write, Flush and Dataset Management commands straight from io_uring
(IORING_OP_URING_CMD), with no block layer in between.

A Device opened on an NVMe namespace keeps its block device open exclusively (the claim
that keeps a filesystem or another ctxkv off it, and the geometry) and, on this path, also
opens the char device; the Ring then sends that device's I/O as NVMe commands.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import itertools
import os
import stat
from dataclasses import dataclass

from engine._native import ffi, lib
from engine._nvme import ffi as nvme_ffi
from engine._nvme import lib as nvme_lib
from engine.errors import DeviceIOError, UnsupportedTargetError
from engine.nvme.discovery import block_name_of, generic_name_of

AUTO, BLOCK, PASSTHRU = "auto", "block", "passthru"
IO_PATHS = (AUTO, BLOCK, PASSTHRU)

# <linux/nvme_ioctl.h>: _IO('N', 0x40), the namespace id of an NVMe device node.
NVME_IOCTL_ID = 0x4E40
# IORING_URING_CMD_FIXED: registered buffers for passthrough commands.
FIXED_BUFFERS_KERNEL = (6, 1)
# Dataset Management takes a 32-bit block count per range.
MAX_DEALLOCATE_BLOCKS = (1 << 32) - 1


@dataclass(frozen=True)
class Passthru:
    """The char device a namespace's I/O goes to on the passthrough path."""

    path: str  # /dev/ng0n1
    fd: int
    nsid: int
    lba_shift: int  # log2 of the logical block size
    # Commands on registered buffers carry IORING_URING_CMD_FIXED (Linux 6.1+).
    fixed_buffers: bool

    def deallocate(self, offset: int, nbytes: int, *, device_path: str) -> None:
        """Dataset Management, deallocate: the range reads back as zeros afterwards."""
        slba, blocks = offset >> self.lba_shift, nbytes >> self.lba_shift
        while blocks:
            count = min(blocks, MAX_DEALLOCATE_BLOCKS)
            result = nvme_lib.ctxkv_nvme_deallocate(self.fd, self.nsid, slba, count)
            if result != 0:
                # A positive result is the NVMe status the controller answered.
                error_number = -result if result < 0 else errno.EIO
                raise DeviceIOError(
                    error_number, path=device_path, op="deallocate", offset=offset, nbytes=nbytes
                )
            slba += count
            blocks -= count


def split_target(path: str, io_path: str) -> tuple[str, bool]:
    """(the block device to claim, whether to use passthrough) for a target path.

    /dev/ngXnY means passthrough on /dev/nvmeXnY; /dev/nvmeXnY means passthrough when
    io_path is passthru, or auto and the kernel can; anything else is never passthrough.
    """
    if io_path not in IO_PATHS:
        raise ValueError(f"io path must be one of {', '.join(IO_PATHS)}, got {io_path!r}")
    name = os.path.basename(path)
    block_name = block_name_of(name)
    if block_name is not None and _is_char_device(path):
        if io_path == BLOCK:
            raise UnsupportedTargetError(
                f"{path} is an NVMe generic char device, which takes only passthrough "
                f"commands; use /dev/{block_name} for --io-path block"
            )
        return os.path.join(os.path.dirname(path), block_name), True
    if io_path == BLOCK:
        return path, False
    generic_name = generic_name_of(name)
    candidate = os.path.join(os.path.dirname(path), generic_name) if generic_name else None
    if candidate is None or not _is_char_device(candidate):
        if io_path == PASSTHRU:
            raise UnsupportedTargetError(
                f"{path} has no NVMe generic char device (/dev/ngXnY) for --io-path passthru; "
                "passthrough needs an NVMe namespace and Linux 5.19 or later"
            )
        return path, False
    if io_path == AUTO and not kernel_supports_passthru():
        return path, False
    return path, True


def generic_path_of(path: str) -> str:
    """/dev/ng0n1 for /dev/nvme0n1 (and for /dev/ng0n1); refuses anything else."""
    name = os.path.basename(path)
    if block_name_of(name) is not None:
        return path
    generic_name = generic_name_of(name)
    if generic_name is None:
        raise UnsupportedTargetError(f"{path} is not an NVMe namespace (/dev/nvmeXnY or ngXnY)")
    return os.path.join(os.path.dirname(path), generic_name)


def open_passthru(block_path: str, lba_bytes: int, *, writable: bool) -> Passthru:
    """Opens the char device of the namespace whose block device is block_path."""
    path = generic_path_of(block_path)
    if not kernel_supports_passthru():
        raise UnsupportedTargetError(
            f"this kernel cannot run NVMe passthrough on {path}: io_uring rejects "
            "SQE128/CQE32 rings (Linux 5.19 or later is needed)"
        )
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        nsid = fcntl.ioctl(fd, NVME_IOCTL_ID)
        if nsid <= 0:
            raise UnsupportedTargetError(f"{path} answered NVME_IOCTL_ID with {nsid}")
        check_lba_format(fd, nsid, path, lba_bytes)
    except BaseException:
        os.close(fd)
        raise
    return Passthru(
        path=path,
        fd=fd,
        nsid=nsid,
        lba_shift=lba_bytes.bit_length() - 1,
        fixed_buffers=kernel_version() >= FIXED_BUFFERS_KERNEL,
    )


def max_command_bytes(block_path: str, max_transfer_bytes: int, lba_bytes: int) -> int:
    """The most one passthrough I/O may carry. The block layer splits a request that has
    too many memory segments; a passthrough command is never split, so besides the
    queue's transfer limit it must fit max_segments pages of a buffer that is not
    physically contiguous (a 4 KiB-page numpy array, say)."""
    name = os.path.basename(block_path)
    try:
        with open(f"/sys/block/{name}/queue/max_segments") as file:
            max_segments = int(file.read().strip())
    except (OSError, ValueError):
        return max_transfer_bytes
    page_bytes = os.sysconf("SC_PAGE_SIZE")
    limit = min(max_transfer_bytes, max_segments * page_bytes)
    return max(lba_bytes, limit // lba_bytes * lba_bytes)


def check_lba_format(fd: int, nsid: int, path: str, lba_bytes: int) -> None:
    """Refuses a namespace whose LBA format carries metadata: passthrough commands here
    send no metadata buffer, which such a namespace needs on every read and write."""
    data_out, metadata_out = nvme_ffi.new("uint32_t *"), nvme_ffi.new("uint32_t *")
    result = nvme_lib.ctxkv_nvme_lba_format(fd, nsid, data_out, metadata_out)
    if result != 0:
        error_number = -result if result < 0 else errno.EIO
        raise OSError(error_number, f"Identify Namespace {nsid} on {path} failed ({result})")
    if metadata_out[0]:
        raise UnsupportedTargetError(
            f"{path} is formatted with {metadata_out[0]} metadata bytes per block, which "
            "ctxkv's passthrough commands do not carry; use --io-path block, or format the "
            "namespace to an LBA format without metadata (nvme format --lbaf)"
        )
    if data_out[0] != lba_bytes:
        raise UnsupportedTargetError(
            f"{path}: Identify says {data_out[0]}-byte blocks, the block layer {lba_bytes}"
        )


def kernel_version() -> tuple[int, int]:
    """(major, minor) of the running kernel: 6.12.117+deb12-amd64 -> (6, 12)."""
    major, _, rest = os.uname().release.partition(".")
    minor = "".join(itertools.takewhile(str.isdigit, rest))
    return int(major or 0), int(minor or 0)


@functools.cache
def kernel_supports_passthru() -> bool:
    """Whether io_uring here makes SQE128|CQE32 rings (Linux 5.19+), which NVMe
    passthrough commands need."""
    ring_out = ffi.new("struct ctxkv_ring **")
    result = lib.ctxkv_ring_new(2, lib.CTXKV_RING_NVME_PASSTHRU, ring_out)
    if result < 0:
        return False
    lib.ctxkv_ring_free(ring_out[0])
    return True


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False
