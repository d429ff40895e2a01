"""A fault-injection TEST device: beneath a Store, for tests only.

It sits where a Store makes its rings (Store.open(..., ring_factory=device.ring_factory)),
so every byte still moves through real io_uring to real files or loop devices, but the
device watches each I/O on the way:

- it remembers every write made since the last flush of its member, with the bytes it
  replaced (read back through the same ring just before the write);
- at a chosen flush (crash_at_flush) or I/O (crash_at_io) the power fails: that I/O and
  every later one fail with EIO, and after the store is closed, power_loss() decides the
  fate of each unflushed write at sector granularity (SQLite's crash VFS, LevelDB's
  fault-injection env): kept, dropped, torn (some sectors new, the rest old) or garbage
  (some sectors random bytes) and writes that outcome to the target;
- it fails the reads or writes that fail_io(op, member, offset, nbytes) picks with EIO
  (a failed write leaves its range torn, as a real one may);
- one seed drives every choice, so a seed replays one failure exactly.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.io.buffers import BufferPool, aligned_array
from engine.io.ring import OP_MASK, RESULT_DTYPE, UNREGISTERED_BUFFER, Op, Ring
from engine.nvme.device import Device

FATES = ("keep", "drop", "tear", "garbage")
# Which I/Os fail_io fails: (op "read"|"write"|"flush", member, offset, nbytes) -> bool.
FailIo = Callable[[str, int, int, int], bool]


@dataclass
class PendingWrite:
    offset: int
    before: bytes
    after: bytes


@dataclass
class FaultInjectionTestDevice:
    seed: int
    crash_at_flush: int | None = None
    crash_at_io: int | None = None
    fail_io: FailIo | None = None
    sector_bytes: int = 512
    fates: tuple[str, ...] = FATES
    flushes: int = 0  # flush points passed (a crash at flush k fails the k-th, from 0)
    ios: int = 0
    injected_errors: int = 0
    crashed: bool = False
    pending: dict[str, list[PendingWrite]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.lock = threading.Lock()

    def ring_factory(self, devices: list[Device], pool: BufferPool | None) -> Ring:
        return FaultInjectingRing(self, devices, pool)

    def power_loss(self) -> None:
        """Decides each unflushed write's fate and leaves the targets that way. Call it
        once the store is closed (its close fails: the power is out) and before reopening."""
        assert self.crashed, "power_loss() follows a crash"
        for path, writes in self.pending.items():
            self._settle(path, writes)
        self.pending.clear()

    def _settle(self, path: str, writes: list[PendingWrite]) -> None:
        sector = self.sector_bytes
        final: dict[int, bytes] = {}
        for write in writes:
            fate = self.rng.choice(self.fates)
            for start in range(0, len(write.after), sector):
                offset = write.offset + start
                # A sector first touched by this write held `before` at the last flush.
                final.setdefault(offset, write.before[start : start + sector])
                if fate == "keep" or (fate == "tear" and self.rng.random() < 0.5):
                    final[offset] = write.after[start : start + sector]
                elif fate == "garbage" and self.rng.random() < 0.5:
                    final[offset] = self.rng.randbytes(sector)
        fd = os.open(path, os.O_WRONLY)
        try:
            for offset, data in final.items():
                os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- the I/O path ------------------------------------------------------------------

    def run_one(self, ring: FaultInjectingRing, io: np.ndarray, result: np.ndarray) -> None:
        """Runs one I/O (a 1-row IO_DTYPE array) through ring's real io_uring, or fails it."""
        op = Op(int(io["opcode"][0]) & OP_MASK)
        member = int(io["file_index"][0])
        offset, nbytes = int(io["offset"][0]), int(io["nbytes"][0])
        path = ring.devices[member].path
        name = {Op.READ: "read", Op.WRITE: "write", Op.FSYNC: "flush"}[op]
        self.ios += 1
        if op == Op.FSYNC:
            crash_now = self.crash_at_flush == self.flushes
            self.flushes += 1
        else:
            crash_now = self.crash_at_io == self.ios - 1
        if self.crashed or crash_now:
            self.crashed = True
            result["result"] = -errno.EIO
            return
        failing = self.fail_io is not None and self.fail_io(name, member, offset, nbytes)
        if failing:
            self.injected_errors += 1
        if op == Op.READ:
            if failing:
                result["result"] = -errno.EIO
            else:
                result[:] = ring.run_real(io)
            return
        if op == Op.FSYNC:
            if failing:
                result["result"] = -errno.EIO  # the unflushed writes stay unflushed
                return
            result[:] = ring.run_real(io)
            if result["result"][0] == 0:
                self.pending.pop(path, None)
            return
        before = ring.read_real(member, offset, nbytes)
        after = ctypes.string_at(int(io["addr"][0]), nbytes)
        if failing:
            # A write that fails may still have reached some sectors, or scrambled them.
            torn = bytearray(before)
            for start in range(0, nbytes, self.sector_bytes):
                choice = self.rng.choice(("old", "new", "garbage"))
                if choice == "new":
                    torn[start : start + self.sector_bytes] = after[
                        start : start + self.sector_bytes
                    ]
                elif choice == "garbage":
                    torn[start : start + self.sector_bytes] = self.rng.randbytes(self.sector_bytes)
            ring.write_real(member, offset, bytes(torn))
            self.pending.setdefault(path, []).append(PendingWrite(offset, before, bytes(torn)))
            result["result"] = -errno.EIO
            return
        result[:] = ring.run_real(io)
        self.pending.setdefault(path, []).append(PendingWrite(offset, before, after))


class FaultInjectingRing(Ring):
    """A real Ring whose run() goes one I/O at a time through its FaultInjectionTestDevice."""

    def __init__(
        self, fault: FaultInjectionTestDevice, devices: list[Device], pool: BufferPool | None
    ):
        super().__init__(devices, pool, entries=64, single_issuer=False)
        self.fault = fault

    def run(
        self,
        ios: np.ndarray,
        *,
        depth: int = 32,
        deadline_ns: int = 0,
        progress: object = None,
        results: np.ndarray | None = None,
        raise_errors: bool = True,
    ) -> np.ndarray:
        assert progress is None and deadline_ns == 0, "the test device runs whole batches"
        self._check_usable()
        self.validate(ios)
        if results is None:
            results = np.zeros(len(ios), dtype=RESULT_DTYPE)
        with self.fault.lock:
            for i in range(len(ios)):
                self.fault.run_one(self, ios[i : i + 1], results[i : i + 1])
        done = results[: len(ios)]
        if raise_errors:
            self.raise_first_error(ios, done)
        return done

    def stream(self, ios: np.ndarray, *, depth: int = 32) -> OneAtATimeStream:
        return OneAtATimeStream(self, ios)

    def run_real(self, io: np.ndarray) -> np.ndarray:
        return super().run(io, depth=1, raise_errors=False)

    def read_real(self, member: int, offset: int, nbytes: int) -> bytes:
        buffer = aligned_array(nbytes)
        ios = Ring.batch(1)
        ios[0] = (offset, buffer.ctypes.data, nbytes, UNREGISTERED_BUFFER, member, Op.READ)
        super().run(ios, depth=1)
        return buffer.tobytes()

    def write_real(self, member: int, offset: int, data: bytes) -> None:
        buffer = aligned_array(len(data))
        buffer[:] = np.frombuffer(data, np.uint8)
        ios = Ring.batch(1)
        ios[0] = (offset, buffer.ctypes.data, len(data), UNREGISTERED_BUFFER, member, Op.WRITE)
        super().run(ios, depth=1)


class OneAtATimeStream:
    """RingStream's contract over FaultInjectingRing.run: each advance runs the rows
    handed over since the last one, one I/O at a time through the test device."""

    def __init__(self, ring: FaultInjectingRing, ios: np.ndarray):
        self.ring = ring
        self.ios = ios
        self.results = np.zeros(len(ios), dtype=RESULT_DTYPE)
        self.ready = 0

    def advance(self, ready: int, wanted: int) -> int:
        assert self.ready <= ready <= len(self.ios) and wanted <= ready
        if ready > self.ready:
            rows = slice(self.ready, ready)
            self.ring.run(self.ios[rows], results=self.results[rows], raise_errors=False)
            self.ready = ready
        return ready

    def finish(self) -> None:
        pass
