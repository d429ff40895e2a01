"""The buffer pool: every byte ctxkv moves lives here.

One arena is mapped, locked and sized at start-up, then cut into equal buffers. Each
buffer is registered with io_uring once (by every Ring that uses the pool), and the
arena is one contiguous region that an RDMA/NIXL front end can register too, so bytes
go device <-> pool <-> network with no copy in user space.
"""

from __future__ import annotations

import resource
import threading

import numpy as np

from engine._native import ffi, lib
from engine.closing import Closeable, Releasable
from engine.errors import CtxkvError, MemlockLimitError, PoolExhaustedError

PAGE_BYTES = 4096
ARENA_GRANULE_BYTES = 2 << 20  # one hugepage: the arena is a whole number of them
MAX_BUFFER_BYTES = 1 << 30  # io_uring refuses to register a larger fixed buffer

BACKING_NAMES = {lib.CTXKV_ARENA_HUGETLB: "hugetlb", lib.CTXKV_ARENA_THP: "thp"}


def memlock_error(nbytes: int, what: str) -> MemlockLimitError:
    """The error for a pin that hit RLIMIT_MEMLOCK, with the limit and the ways out."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
    return MemlockLimitError(
        f"cannot {what} ({nbytes} bytes): the locked-memory limit RLIMIT_MEMLOCK is {limit}. "
        f"Raise it (`ulimit -l unlimited` in the shell, LimitMEMLOCK=infinity in a systemd "
        f"unit, or a memlock line in /etc/security/limits.conf), run with CAP_IPC_LOCK, "
        f"or make the buffer pool smaller."
    )


class Lease(Releasable):
    """One pool buffer, lent until release(). Use it as a context manager."""

    __slots__ = ("_pool", "_released", "address", "index", "nbytes")

    def __init__(self, pool: BufferPool, index: int):
        self._pool = pool
        self._released = False
        self.index = index  # io_uring fixed-buffer index, same in every Ring of the pool
        self.address = pool.buffer_address(index)
        self.nbytes = pool.buffer_bytes

    @property
    def memoryview(self) -> memoryview:
        self._check_live()
        return memoryview(ffi.buffer(ffi.cast("char *", self.address), self.nbytes))

    @property
    def array(self) -> np.ndarray:
        """A writable uint8 numpy view of the buffer (no copy)."""
        return np.frombuffer(self.memoryview, dtype=np.uint8)

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._give_back(self.index)

    def _check_live(self) -> None:
        if self._released:
            raise CtxkvError(f"buffer {self.index} was released; its memory belongs to others")

    def __repr__(self) -> str:
        state = "released" if self._released else "live"
        return (
            f"Lease(index={self.index}, address={self.address:#x}, nbytes={self.nbytes}, {state})"
        )


class BufferPool(Closeable):
    """A fixed set of equal, page-aligned, locked buffers carved from one arena."""

    def __init__(self, buffer_bytes: int = 4 << 20, count: int = 64, *, hugepages: bool = True):
        if buffer_bytes <= 0 or buffer_bytes % PAGE_BYTES:
            raise ValueError(
                f"buffer_bytes must be a positive multiple of {PAGE_BYTES}, got {buffer_bytes}"
            )
        if buffer_bytes > MAX_BUFFER_BYTES:
            raise ValueError(
                f"buffer_bytes must be at most {MAX_BUFFER_BYTES} (1 GiB), got {buffer_bytes}"
            )
        if not 0 < count < lib.CTXKV_UNREGISTERED_BUFFER:
            raise ValueError(
                f"count must be in 1..{lib.CTXKV_UNREGISTERED_BUFFER - 1}, got {count}"
            )
        self.buffer_bytes = buffer_bytes
        self.count = count
        used_bytes = buffer_bytes * count
        arena_bytes = -(-used_bytes // ARENA_GRANULE_BYTES) * ARENA_GRANULE_BYTES
        self._arena = ffi.new("struct ctxkv_arena *")
        result = lib.ctxkv_arena_map(arena_bytes, 1 if hugepages else 0, self._arena)
        if result < 0:
            if self._arena.failed_step == lib.CTXKV_ARENA_STEP_MLOCK:
                raise memlock_error(arena_bytes, "lock the buffer pool in memory")
            raise MemoryError(f"cannot map a {arena_bytes}-byte buffer pool: errno {-result}")
        assert self._arena.addr % PAGE_BYTES == 0
        self.backing = BACKING_NAMES[self._arena.backing]
        self._free = list(range(count - 1, -1, -1))  # pop() hands out index 0 first
        self._available = threading.Condition()
        self._closed = False

    @property
    def arena_address(self) -> int:
        return self._arena.addr

    @property
    def arena_bytes(self) -> int:
        return self._arena.nbytes

    @property
    def leased(self) -> int:
        with self._available:
            return self.count - len(self._free)

    def buffer_address(self, index: int) -> int:
        assert 0 <= index < self.count, index
        return self._arena.addr + index * self.buffer_bytes

    def iovecs(self) -> list[tuple[int, int]]:
        """(address, nbytes) of every buffer, in fixed-buffer index order, for io_uring."""
        return [(self.buffer_address(i), self.buffer_bytes) for i in range(self.count)]

    def regions(self) -> list[tuple[int, int]]:
        """(address, nbytes) of the memory to register with an RDMA/NIXL agent: the arena."""
        return [(self._arena.addr, self._arena.nbytes)]

    def lease(self, timeout: float | None = 0.0) -> Lease:
        """A free buffer. Waits up to timeout seconds (None: forever) for one to come back."""
        [lease] = self.lease_many(1, timeout)
        return lease

    def lease_many(self, count: int, timeout: float | None = 0.0) -> list[Lease]:
        """count buffers taken at once, never some now and some later: a caller that held
        part of what it needs while waiting for the rest could deadlock with another."""
        if not 0 < count <= self.count:
            raise ValueError(f"cannot lease {count} buffers from a pool of {self.count}")
        with self._available:
            if self._closed:
                raise CtxkvError("the buffer pool is closed")
            if not self._available.wait_for(lambda: len(self._free) >= count, timeout=timeout):
                raise PoolExhaustedError(
                    f"{count} of {self.count} buffers of {self.buffer_bytes} bytes wanted, "
                    f"{len(self._free)} free; release some or size the pool larger"
                )
            return [Lease(self, self._free.pop()) for _ in range(count)]

    def _give_back(self, index: int) -> None:
        with self._available:
            assert index not in self._free, f"buffer {index} released twice"
            self._free.append(index)
            self._available.notify_all()  # waiters may want several buffers each

    def close(self) -> None:
        with self._available:
            if self._closed:
                return
            if len(self._free) != self.count:
                raise CtxkvError(
                    f"cannot close the buffer pool: {self.count - len(self._free)} buffers are "
                    f"still leased, and unmapping them would leave their views dangling"
                )
            self._closed = True
            result = lib.ctxkv_arena_unmap(self._arena)
            assert result == 0, result

    def __repr__(self) -> str:
        return (
            f"BufferPool(buffer_bytes={self.buffer_bytes}, count={self.count}, "
            f"backing={self.backing!r}, leased={self.leased})"
        )


def aligned_array(nbytes: int) -> np.ndarray:
    """A zeroed, page-aligned uint8 array outside the pool, for metadata I/O (superblocks,
    journal blocks, checkpoints) that must never wait for a pool buffer."""
    assert nbytes > 0 and nbytes % PAGE_BYTES == 0, nbytes
    raw = np.zeros(nbytes + PAGE_BYTES, dtype=np.uint8)
    start = (-raw.ctypes.data) % PAGE_BYTES
    array = raw[start : start + nbytes]
    assert array.ctypes.data % PAGE_BYTES == 0
    return array
