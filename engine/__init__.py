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
from engine.store.store import RELAXED, STRICT, Store, ValueLease

__version__ = "0.1.0"

__all__ = [
    "RELAXED",
    "STRICT",
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
    "Store",
    "UnsupportedTargetError",
    "ValueLease",
]
