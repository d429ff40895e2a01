"""Exceptions raised by ctxkv.

Every error names the device or path it concerns and the value that was wrong, so a
user can act on the message alone. Errors that come from the kernel keep their errno
and subclass OSError; errors in the caller's request subclass ValueError.
"""

from __future__ import annotations

import errno as errno_codes
import os


class CtxkvError(Exception):
    """Base of every error ctxkv raises on purpose."""


class DeviceNotFoundError(CtxkvError, FileNotFoundError):
    """The target path does not exist."""


class DeviceBusyError(CtxkvError, OSError):
    """The block device is mounted or held open exclusively by someone else."""


class UnsupportedTargetError(CtxkvError, ValueError):
    """The path is neither a block device nor a regular file, or cannot do O_DIRECT."""


class AlignmentError(CtxkvError, ValueError):
    """An offset, length or buffer address breaks the device's O_DIRECT alignment."""


class OutOfRangeError(CtxkvError, ValueError):
    """An I/O reaches past the end of the device or of a buffer."""


class ShortTransferError(CtxkvError, OSError):
    """The kernel moved fewer bytes than asked (for example, a file shrank under us)."""


class DeviceIOError(CtxkvError, OSError):
    """The kernel failed an I/O; errno, path, offset and length say which one."""

    def __init__(self, error_number: int, *, path: str, op: str, offset: int, nbytes: int):
        self.path = path
        self.op = op
        self.offset = offset
        self.nbytes = nbytes
        message = (
            f"{op} of {nbytes} bytes at offset {offset} on {path} failed: "
            f"{os.strerror(error_number)} ({errno_codes.errorcode.get(error_number, error_number)})"
        )
        super().__init__(error_number, message)

    def __str__(self) -> str:
        return self.strerror or ""


class MemlockLimitError(CtxkvError, MemoryError):
    """Pinning the buffer pool exceeded RLIMIT_MEMLOCK."""


class PoolExhaustedError(CtxkvError, RuntimeError):
    """Every buffer of the pool is leased out."""


class ReadOnlyDeviceError(CtxkvError, ValueError):
    """A write or discard was asked of a device opened with writable=False."""


def native_error(result: int, what: str) -> OSError:
    """Turns a negative errno returned by native code into an OSError that says what failed."""
    assert result < 0, result
    error_number = -result
    return OSError(error_number, f"{what}: {os.strerror(error_number)}")


class LeaseError(CtxkvError, LookupError):
    """A NIXL lease id that is not live (docs/protocol.md, "NIXL"): never granted,
    already ended (released, committed, expired, dropped), another connection's, or of
    the wrong kind for the call. The message says which."""
