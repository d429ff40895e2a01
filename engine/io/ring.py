"""A Python face on the native io_uring core.

A Ring owns one io_uring with the pool's buffers and the devices' files registered.
Callers describe I/O as a numpy array of IO_DTYPE (one row per logical I/O, built with
vectorised numpy, never a Python loop per SQE) and hand the whole array to run(), which
validates it, runs it in C with the GIL released, and raises on the first failure.
A stream() is a run fed as it goes: the caller hands over rows as it fills them in and
takes results as they finish, while the device keeps depth I/Os in flight.
"""

from __future__ import annotations

import enum
import errno
import threading
from collections.abc import Sequence

import numpy as np

from engine._native import ffi, lib
from engine.closing import Closeable
from engine.errors import (
    AlignmentError,
    CtxkvError,
    DeviceIOError,
    OutOfRangeError,
    ReadOnlyDeviceError,
    ShortTransferError,
    native_error,
)
from engine.io.buffers import BufferPool, Lease, memlock_error
from engine.nvme.device import Device

IO_DTYPE = np.dtype(
    [
        ("offset", "<u8"),
        ("addr", "<u8"),
        ("nbytes", "<u4"),
        ("buf_index", "<u2"),
        ("file_index", "u1"),
        ("opcode", "u1"),
    ]
)
RESULT_DTYPE = np.dtype(
    [
        ("result", "<i8"),
        ("submit_ns", "<u8"),
        ("complete_ns", "<u8"),
        ("chunks_pending", "<u4"),
        ("payload_crc32c", "<u4"),
    ]
)
assert IO_DTYPE.itemsize == ffi.sizeof("struct ctxkv_io") == 24
assert RESULT_DTYPE.itemsize == ffi.sizeof("struct ctxkv_io_result") == 32

UNREGISTERED_BUFFER = lib.CTXKV_UNREGISTERED_BUFFER
MAX_IO_BYTES = (1 << 32) - 4096  # nbytes is a u32 in struct ctxkv_io


class Op(enum.IntEnum):
    READ = lib.CTXKV_OP_READ
    WRITE = lib.CTXKV_OP_WRITE
    FSYNC = lib.CTXKV_OP_FSYNC


OP_MASK = lib.CTXKV_OP_MASK
# OR into a READ's opcode: the buffer receives an extent, and result["payload_crc32c"]
# is its payload's CRC32C, computed in C as soon as that read lands.
EXTENT_CRC = lib.CTXKV_OP_FLAG_EXTENT_CRC


SETUP_FLAG_NAMES = {
    1 << 8: "COOP_TASKRUN",
    1 << 12: "SINGLE_ISSUER",
    1 << 13: "DEFER_TASKRUN",
    1 << 4: "CLAMP",
    1 << 10: "SQE128",
    1 << 11: "CQE32",
}


class Progress:
    """Counters a run updates as it goes; another thread may read them or cancel the run."""

    def __init__(self) -> None:
        self._struct = ffi.new("struct ctxkv_progress *")

    @property
    def ops_done(self) -> int:
        return self._struct.ops_done

    @property
    def bytes_done(self) -> int:
        return self._struct.bytes_done

    @property
    def cancelled(self) -> bool:
        return bool(self._struct.cancel)

    def cancel(self) -> None:
        self._struct.cancel = 1


class Ring(Closeable):
    """One io_uring, used by the thread that made it (SINGLE_ISSUER lets the kernel skip
    locking and run completions on our thread only when we wait for them)."""

    def __init__(
        self,
        devices: Sequence[Device],
        pool: BufferPool | None = None,
        *,
        entries: int = 256,
        single_issuer: bool = True,
    ):
        if not 0 < len(devices) <= 256:
            raise ValueError(f"a ring takes 1..256 devices, got {len(devices)}")
        self.devices = list(devices)
        self.pool = pool
        self._owner_thread = threading.get_ident() if single_issuer else None
        ring_out = ffi.new("struct ctxkv_ring **")
        mode = lib.CTXKV_RING_SINGLE_ISSUER if single_issuer else 0
        if any(device.passthru is not None for device in self.devices):
            mode |= lib.CTXKV_RING_NVME_PASSTHRU
        result = lib.ctxkv_ring_new(entries, mode, ring_out)
        if result < 0:
            raise native_error(result, f"io_uring_setup with {entries} entries")
        self._ring = ring_out[0]
        try:
            self._register(pool)
        except BaseException:
            lib.ctxkv_ring_free(self._ring)
            self._ring = ffi.NULL
            raise
        self._problem = ffi.new("uint32_t *")  # validate's out-parameter, made once
        self._stream: RingStream | None = None  # the C side allows one run at a time

    def _register(self, pool: BufferPool | None) -> None:
        # A passthrough device's I/O goes to its NVMe char device, as NVMe commands.
        fds = ffi.new(
            "int32_t[]",
            [
                device.fd if device.passthru is None else device.passthru.fd
                for device in self.devices
            ],
        )
        chunk_bytes = ffi.new(
            "uint32_t[]", [device.geometry.max_transfer_bytes for device in self.devices]
        )
        result = lib.ctxkv_ring_register_files(self._ring, fds, chunk_bytes, len(self.devices))
        if result < 0:
            raise native_error(result, "io_uring_register_files")
        for file_index, device in enumerate(self.devices):
            geometry = device.geometry
            result = lib.ctxkv_ring_set_limits(
                self._ring, file_index, geometry.logical_block_bytes, geometry.capacity_bytes,
                1 if device.writable else 0,
            )  # fmt: skip
            assert result == 0, result
            if device.passthru is not None:
                passthru = device.passthru
                flags = lib.CTXKV_PASSTHRU_FIXED_BUFFERS if passthru.fixed_buffers else 0
                result = lib.ctxkv_ring_set_passthru(
                    self._ring, file_index, passthru.nsid, passthru.lba_shift, flags
                )
                if result < 0:
                    raise native_error(result, f"NVMe passthrough on {passthru.path}")
        if pool is None:
            return
        iovecs = pool.iovecs()
        addrs = ffi.new("uint64_t[]", [address for address, _ in iovecs])
        lengths = ffi.new("uint64_t[]", [nbytes for _, nbytes in iovecs])
        result = lib.ctxkv_ring_register_buffers(self._ring, addrs, lengths, len(iovecs))
        if result == -errno.ENOMEM:
            raise memlock_error(pool.arena_bytes, "register the buffer pool with io_uring")
        if result < 0:
            raise native_error(result, "io_uring_register_buffers")

    @property
    def setup_flags(self) -> int:
        return lib.ctxkv_ring_setup_flags(self._ring)

    @property
    def setup_flag_names(self) -> list[str]:
        return [name for bit, name in SETUP_FLAG_NAMES.items() if self.setup_flags & bit]

    @property
    def cq_entries(self) -> int:
        return lib.ctxkv_ring_cq_entries(self._ring)

    @staticmethod
    def batch(count: int) -> np.ndarray:
        """An empty I/O description array to fill in."""
        return np.zeros(count, dtype=IO_DTYPE)

    def run(
        self,
        ios: np.ndarray,
        *,
        depth: int = 32,
        deadline_ns: int = 0,
        progress: Progress | None = None,
        results: np.ndarray | None = None,
        raise_errors: bool = True,
    ) -> np.ndarray:
        """Runs ios with at most depth in flight; returns the results of those that ran.

        A deadline (CLOCK_MONOTONIC ns, see monotonic_ns) or progress.cancel() stops it
        early: then only a prefix of ios ran. Raises DeviceIOError or ShortTransferError
        for the first failed I/O unless raise_errors is False.
        """
        self._check_idle(ios, depth)
        self.validate(ios)
        if results is None:
            results = np.empty(len(ios), dtype=RESULT_DTYPE)
        assert results.dtype == RESULT_DTYPE and len(results) >= len(ios)
        ran = lib.ctxkv_ring_run(
            self._ring,
            ffi.cast("struct ctxkv_io *", ffi.from_buffer(ios)),
            len(ios),
            depth,
            deadline_ns,
            ffi.cast("struct ctxkv_io_result *", ffi.from_buffer(results)),
            progress._struct if progress is not None else ffi.NULL,
        )
        if ran < 0:
            raise native_error(ran, "io_uring_enter")
        assert ran <= len(ios)
        done = results[:ran]
        if raise_errors:
            self.raise_first_error(ios[:ran], done)
        return done

    def stream(self, ios: np.ndarray, *, depth: int = 32) -> RingStream:
        """A run over ios that the caller fills in as it goes (see RingStream). Until it
        is finished nothing else may run on this ring."""
        self._check_idle(ios, depth)
        return RingStream(self, ios, depth)

    def _check_idle(self, ios: np.ndarray, depth: int) -> None:
        self._check_usable()
        if self._stream is not None:
            raise CtxkvError("a stream is open on this ring; finish it first")
        if ios.dtype != IO_DTYPE or ios.ndim != 1 or not ios.flags.c_contiguous:
            raise TypeError("ios must be a contiguous 1-d array of IO_DTYPE (see Ring.batch)")
        if depth <= 0:
            raise ValueError(f"depth must be positive, got {depth}")

    def validate(self, ios: np.ndarray) -> None:
        """Refuses, naming the first bad I/O, what the kernel would fail or what would
        touch memory outside the pool: cheaper to explain here than to decode an EINVAL.
        The checks run in C (a stream validates each value's rows as it goes)."""
        if len(ios) == 0:
            return
        problem = self._problem
        index = lib.ctxkv_ring_check(
            self._ring, ffi.cast("struct ctxkv_io *", ffi.from_buffer(ios)), len(ios), problem
        )
        if index < len(ios):
            raise self._refusal(int(index), ios[index], problem[0])

    def _refusal(self, index: int, io: np.void, problem: int) -> Exception:
        """The error for I/O number index, which ctxkv_ring_check refused for problem."""
        file_index, opcode = int(io["file_index"]), int(io["opcode"])
        offset, nbytes, addr = int(io["offset"]), int(io["nbytes"]), int(io["addr"])
        if problem == lib.CTXKV_IO_BAD_FILE:
            return ValueError(
                f"I/O {index} names file {file_index}, but the ring has {len(self.devices)}"
            )
        if problem == lib.CTXKV_IO_BAD_OPCODE:
            return ValueError(f"I/O {index} has unknown opcode {opcode}")
        if problem == lib.CTXKV_IO_BAD_EXTENT_CRC:
            return ValueError(f"I/O {index}: EXTENT_CRC goes with reads of a whole extent header")
        path = self.devices[file_index].path
        if problem == lib.CTXKV_IO_READ_ONLY:
            return ReadOnlyDeviceError(f"I/O {index} writes to {path}, opened read-only")
        geometry = self.devices[file_index].geometry
        misaligned = {
            lib.CTXKV_IO_MISALIGNED_OFFSET: ("offset", offset),
            lib.CTXKV_IO_MISALIGNED_LENGTH: ("length", nbytes),
            lib.CTXKV_IO_MISALIGNED_ADDRESS: ("buffer address", addr),
        }
        if problem in misaligned:
            what, value = misaligned[problem]
            return AlignmentError(
                f"I/O {index}: {what} {value} is not a multiple of the logical block "
                f"size {geometry.logical_block_bytes} of {path}"
            )
        if problem == lib.CTXKV_IO_EMPTY:
            return AlignmentError(f"I/O {index} has length 0")
        if problem == lib.CTXKV_IO_PAST_END:
            return OutOfRangeError(
                f"I/O {index}: {nbytes} bytes at offset {offset} reach past the end of "
                f"{path} ({geometry.capacity_bytes} bytes)"
            )
        if problem == lib.CTXKV_IO_NO_POOL:
            return ValueError("I/O names a registered buffer, but the ring has no buffer pool")
        assert problem == lib.CTXKV_IO_OUTSIDE_BUFFER, problem
        assert self.pool is not None
        return OutOfRangeError(
            f"I/O of {nbytes} bytes at address {addr:#x} does not lie inside pool buffer "
            f"{int(io['buf_index'])} ({self.pool.buffer_bytes} bytes)"
        )

    def raise_first_error(self, ios: np.ndarray, results: np.ndarray) -> None:
        data = (ios["opcode"] & OP_MASK) != Op.FSYNC
        failed = np.flatnonzero(
            (results["result"] < 0) | (data & (results["result"] != ios["nbytes"]))
        )
        if not len(failed):
            return
        i = failed[0]
        io, result = ios[i], int(results["result"][i])
        device = self.devices[io["file_index"]]
        op = Op(int(io["opcode"]) & OP_MASK).name.lower()
        if result < 0:
            raise DeviceIOError(
                -result, path=device.path, op=op, offset=int(io["offset"]), nbytes=int(io["nbytes"])
            )
        raise ShortTransferError(
            errno.EIO,
            f"{op} of {int(io['nbytes'])} bytes at offset {int(io['offset'])} on {device.path} "
            f"moved only {result} bytes",
        )

    # One-I/O conveniences, for tools and tests rather than hot paths.

    def read(self, file_index: int, offset: int, lease: Lease, nbytes: int | None = None) -> None:
        self._one(Op.READ, file_index, offset, lease, nbytes)

    def write(self, file_index: int, offset: int, lease: Lease, nbytes: int | None = None) -> None:
        self._one(Op.WRITE, file_index, offset, lease, nbytes)

    def fsync(self, file_index: int) -> None:
        ios = self.batch(1)
        ios[0] = (0, 0, 0, UNREGISTERED_BUFFER, file_index, Op.FSYNC)
        self.run(ios, depth=1)

    def _one(self, op: Op, file_index: int, offset: int, lease: Lease, nbytes: int | None) -> None:
        nbytes = lease.nbytes if nbytes is None else nbytes
        ios = self.batch(1)
        ios[0] = (offset, lease.address, nbytes, lease.index, file_index, op)
        self.run(ios, depth=1)

    def _check_usable(self) -> None:
        if self._ring == ffi.NULL:
            raise CtxkvError("the ring is closed")
        if self._owner_thread is not None and threading.get_ident() != self._owner_thread:
            raise CtxkvError(
                "this ring was made with single_issuer=True and belongs to the thread that "
                "made it; make one Ring per thread"
            )

    def close(self) -> None:
        if self._stream is not None:
            self._stream.finish()  # the kernel may still be writing into its buffers
        if self._ring != ffi.NULL:
            lib.ctxkv_ring_free(self._ring)
            self._ring = ffi.NULL


class RingStream:
    """ios run in order as the caller fills them in. advance(ready, wanted) hands over
    ios[:ready], keeps the ring's depth I/Os in flight, and returns once ios[:wanted] have
    finished (extent checksums included): between calls the device goes on with what is
    queued while the caller works on what has finished. results[i] is final once i is
    below what advance returned. finish() waits for whatever is still in flight, so the
    buffers the rows name must stay leased until it returns."""

    def __init__(self, ring: Ring, ios: np.ndarray, depth: int):
        self.ios = ios
        self.results = np.zeros(len(ios), dtype=RESULT_DTYPE)
        self.ready = 0
        # The cdata objects keep the arrays' memory pinned for C while the run lives.
        self._ios_c = ffi.from_buffer(ios)
        self._results_c = ffi.from_buffer(self.results)
        run_out = ffi.new("struct ctxkv_run **")
        result = lib.ctxkv_run_start(
            ring._ring,
            ffi.cast("struct ctxkv_io *", self._ios_c),
            len(ios),
            depth,
            0,
            ffi.cast("struct ctxkv_io_result *", self._results_c),
            ffi.NULL,
            run_out,
        )
        if result < 0:
            raise native_error(result, "starting a ring run")
        self._run = run_out[0]
        self._ring = ring
        ring._stream = self

    def advance(self, ready: int, wanted: int) -> int:
        """Hands over ios[:ready]; returns how many leading ios have finished, at least
        wanted. Raises for a row that is invalid (before the kernel sees it) or a ring
        that broke; a failed I/O is only reported in its results row."""
        if self._run is None:
            raise CtxkvError("the stream is finished")
        if not self.ready <= ready <= len(self.ios) or not 0 <= wanted <= ready:
            raise ValueError(
                f"advance(ready={ready}, wanted={wanted}) of a stream of {len(self.ios)} "
                f"rows with {self.ready} handed over: need wanted <= ready, ready not shrinking"
            )
        self._ring.validate(self.ios[self.ready : ready])
        self.ready = ready
        finished = lib.ctxkv_run_advance(self._run, ready, wanted)
        if finished < 0:
            raise native_error(finished, "io_uring_enter")
        assert wanted <= finished <= ready, (wanted, finished, ready)
        return finished

    def finish(self) -> None:
        """Waits for every I/O in flight; queues no more. Idempotent."""
        if self._run is None:
            return
        run, self._run = self._run, None
        self._ring._stream = None
        ran = lib.ctxkv_run_finish(run)
        if ran < 0:
            raise native_error(ran, "io_uring_enter")

    def __enter__(self) -> RingStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()


def monotonic_ns() -> int:
    """The clock of deadlines and result timestamps (CLOCK_MONOTONIC)."""
    return lib.ctxkv_monotonic_ns()
