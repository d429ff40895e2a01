"""ctxkv: a KV-cache storage engine over raw NVMe namespaces."""

from engine.errors import (
    AlignmentError,
    CtxkvError,
    DeviceBusyError,
    DeviceIOError,
    DeviceNotFoundError,
    MemlockLimitError,
    OutOfRangeError,
    PoolExhaustedError,
    ReadOnlyDeviceError,
    ShortTransferError,
    UnsupportedTargetError,
)

__version__ = "0.1.0"

__all__ = [
    "AlignmentError",
    "CtxkvError",
    "DeviceBusyError",
    "DeviceIOError",
    "DeviceNotFoundError",
    "MemlockLimitError",
    "OutOfRangeError",
    "PoolExhaustedError",
    "ReadOnlyDeviceError",
    "ShortTransferError",
    "UnsupportedTargetError",
]
