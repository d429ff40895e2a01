"""The journal: group-committed records in a ring of 4096-byte blocks on member 0.

Callers hand commit() their records and an `apply` step. Whoever finds no commit in
flight becomes the leader: it takes every record queued so far, writes them as fresh
blocks (a block holding acknowledged records is never rewritten), flushes, then runs the
batch's apply steps in order and wakes the followers. So N concurrent puts cost one
journal write and one flush, and the in-memory state always equals the journal up to
`next_sequence` whenever no leader is in flight, which is what a checkpoint needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from engine.errors import CtxkvError
from engine.io.buffers import aligned_array
from engine.io.ring import UNREGISTERED_BUFFER, Op, Ring
from engine.store.layout import (
    BLOCK_BYTES,
    JOURNAL_PAYLOAD_BYTES,
    JournalBlock,
    Record,
    pack_journal_block,
)

# One journal write moves at most this many blocks; a larger batch takes several.
WRITE_CHUNK_BLOCKS = 64
REPLAY_CHUNK_BLOCKS = 256

RunIos = Callable[[np.ndarray], np.ndarray]


class JournalFailedError(CtxkvError, OSError):
    """A journal write failed and could not be voided; nothing more can be acknowledged
    until reopen."""


def group_into_blocks(records: list[Record]) -> list[list[bytes]]:
    """Packed records, grouped greedily into blocks; a record never spans two blocks."""
    groups: list[list[bytes]] = [[]]
    used = 0
    for record in records:
        packed = record.pack()
        assert len(packed) <= JOURNAL_PAYLOAD_BYTES
        if used + len(packed) > JOURNAL_PAYLOAD_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(packed)
        used += len(packed)
    return groups if groups[0] else []


@dataclass
class _Waiter:
    records: list[Record]
    apply: Callable[[], None]
    done: bool = False
    error: BaseException | None = None


class Journal:
    def __init__(
        self,
        run_ios: RunIos,
        *,
        offset: int,
        nbytes: int,
        tag: bytes,
        next_sequence: int,
        first_live_sequence: int,
        make_room: Callable[[], None],
        flush: bool = True,
    ):
        """flush=False leaves blocks in the device's volatile cache (relaxed durability:
        the store flushes on a timer instead)."""
        assert offset % BLOCK_BYTES == 0 and nbytes % BLOCK_BYTES == 0 and nbytes > 0
        assert first_live_sequence <= next_sequence
        self._run_ios = run_ios
        self.offset = offset
        self.block_count = nbytes // BLOCK_BYTES
        self.tag = tag
        self.next_sequence = next_sequence
        self.first_live_sequence = first_live_sequence
        # Blocks before this are on stable media; each block written says so, which is
        # how replay tells a damaged block from a torn tail.
        self.durable_through = next_sequence
        self._make_room = make_room
        self._flush = flush
        self._buffer = aligned_array(WRITE_CHUNK_BLOCKS * BLOCK_BYTES)
        self._condition = threading.Condition()
        self._queue: list[_Waiter] = []
        self._leader_active = False
        self._failure: BaseException | None = None
        self.blocks_written = 0
        self.commits = 0

    @property
    def live_blocks(self) -> int:
        return self.next_sequence - self.first_live_sequence

    def flushed(self, next_sequence_before: int) -> None:
        """The store flushed member 0: blocks written before the flush began are durable.
        next_sequence_before is next_sequence as read before the flush was issued."""
        with self._condition:
            self.durable_through = max(self.durable_through, next_sequence_before)

    def position(self, sequence: int) -> int:
        """Byte offset of the block with this sequence number."""
        return self.offset + ((sequence - 1) % self.block_count) * BLOCK_BYTES

    def commit(self, records: list[Record], apply: Callable[[], None]) -> None:
        """Returns once records are durable and apply() has run; raises if they are not."""
        waiter = _Waiter(records, apply)
        with self._condition:
            self._check_healthy()
            self._queue.append(waiter)
            while not waiter.done:
                if self._leader_active:
                    self._condition.wait()
                    continue
                self._leader_active = True
                batch, self._queue = self._queue, []
                self._condition.release()
                try:
                    self._lead(batch)
                finally:
                    self._condition.acquire()
                    self._leader_active = False
                    self._condition.notify_all()
        if waiter.error is not None:
            # Not kept on the waiter: its traceback holds this frame, and the cycle would
            # keep every caller's frame alive until the collector ran.
            error, waiter.error = waiter.error, None
            try:
                raise error
            finally:
                del error

    def _lead(self, batch: list[_Waiter]) -> None:
        records = [record for waiter in batch for record in waiter.records]
        groups = group_into_blocks(records)
        first_sequence = self.next_sequence
        try:
            if self.live_blocks + len(groups) > self.block_count // 2:
                self._make_room()
            first_sequence = self.next_sequence
            assert self.live_blocks + len(groups) <= self.block_count, "journal overrun"
            blocks = [
                pack_journal_block(first_sequence + i, self.tag, group, self.durable_through)
                for i, group in enumerate(groups)
            ]
        except BaseException as error:
            self._fail(batch, error)  # nothing was written: the journal stays usable
            return
        try:
            self._write(blocks, first_sequence, flush=self._flush)
        except BaseException as error:
            self._void(len(blocks), first_sequence, batch, error)
            return
        self.next_sequence += len(blocks)
        if self._flush:
            self.durable_through = self.next_sequence
        self.blocks_written += len(blocks)
        self.commits += 1
        for waiter in batch:
            waiter.apply()
            waiter.done = True

    def _void(
        self, block_count: int, first_sequence: int, batch: list[_Waiter], error: BaseException
    ) -> None:
        """A journal write failed, yet some of its blocks may be on the device, valid:
        replay would apply records of puts that fail now. Overwrite those positions with
        empty blocks and flush; the batch fails and later commits go on after them. Only
        if that fails too does the journal stop (JournalFailedError until reopen)."""
        voids = [
            pack_journal_block(first_sequence + i, self.tag, [], self.durable_through)
            for i in range(block_count)
        ]
        try:
            self._write(voids, first_sequence, flush=True)
        except BaseException as second:
            failure = JournalFailedError(
                f"journal write failed ({error}) and so did voiding its blocks ({second}): "
                f"reopen the store"
            )
            failure.__cause__ = second
            with self._condition:
                self._failure = failure
            self._fail(batch, failure)
            return
        self.next_sequence += block_count
        self.durable_through = self.next_sequence
        self.blocks_written += block_count
        self._fail(batch, error)

    @staticmethod
    def _fail(batch: list[_Waiter], error: BaseException) -> None:
        for waiter in batch:
            waiter.error, waiter.done = error, True

    def _write(self, blocks: list[bytes], first_sequence: int, *, flush: bool) -> None:
        for start in range(0, len(blocks), WRITE_CHUNK_BLOCKS):
            chunk = blocks[start : start + WRITE_CHUNK_BLOCKS]
            ios = []
            for i, block in enumerate(chunk):
                self._buffer[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES] = np.frombuffer(
                    block, np.uint8
                )
            # Contiguous runs of positions; a run breaks where the ring wraps.
            run_start = 0
            for i in range(1, len(chunk) + 1):
                sequence = first_sequence + start + i
                if (
                    i == len(chunk)
                    or self.position(sequence) != self.position(sequence - 1) + BLOCK_BYTES
                ):
                    ios.append(
                        (
                            self.position(first_sequence + start + run_start),
                            self._buffer.ctypes.data + run_start * BLOCK_BYTES,
                            (i - run_start) * BLOCK_BYTES,
                            UNREGISTERED_BUFFER,
                            0,
                            Op.WRITE,
                        )
                    )
                    run_start = i
            batch = Ring.batch(len(ios))
            batch[:] = ios
            self._run_ios(batch)
        if flush:
            fsync = Ring.batch(1)
            fsync[0] = (0, 0, 0, UNREGISTERED_BUFFER, 0, Op.FSYNC)
            self._run_ios(fsync)

    def _check_healthy(self) -> None:
        if self._failure is not None:
            raise self._failure


def replay(
    run_ios: RunIos, *, offset: int, nbytes: int, tag: bytes, start_sequence: int
) -> Iterator[tuple[int, list[Record] | None]]:
    """(sequence, records) of every valid block from start_sequence on, in order, for at
    most one lap. At the first block that is not valid for its sequence it looks ahead:
    a later block written once this one was durable (its durable_through is past it)
    proves this one was damaged after the fact, and replay yields (sequence, None) and
    goes on; otherwise it is the torn or stale tail, and replay stops."""
    reader = _BlockReader(run_ios, offset, nbytes // BLOCK_BYTES, tag)
    end = start_sequence + reader.block_count
    sequence = start_sequence
    while sequence < end:
        block = reader.block(sequence)
        if block is not None and block.block_sequence == sequence:
            yield sequence, block.records
        elif reader.written_after_durable(sequence, end):
            yield sequence, None
        else:
            return
        sequence += 1


def highest_sequence(run_ios: RunIos, *, offset: int, nbytes: int, tag: bytes) -> int:
    """The largest block_sequence of any intact block of this store's journal (0 if none),
    wherever it lies: what a replay that stopped early can be measured against."""
    reader = _BlockReader(run_ios, offset, nbytes // BLOCK_BYTES, tag)
    blocks = (reader.block(position + 1) for position in range(reader.block_count))
    return max((block.block_sequence for block in blocks if block is not None), default=0)


class _BlockReader:
    """Reads journal blocks by sequence number, REPLAY_CHUNK_BLOCKS at a time."""

    def __init__(self, run_ios: RunIos, offset: int, block_count: int, tag: bytes):
        self.run_ios, self.offset, self.block_count, self.tag = run_ios, offset, block_count, tag
        self.buffer = aligned_array(REPLAY_CHUNK_BLOCKS * BLOCK_BYTES)
        self.first_position, self.positions = 0, 0

    def block(self, sequence: int) -> JournalBlock | None:
        position = (sequence - 1) % self.block_count
        if not self.first_position <= position < self.first_position + self.positions:
            self.first_position = position
            self.positions = min(REPLAY_CHUNK_BLOCKS, self.block_count - position)
            ios = Ring.batch(1)
            ios[0] = (self.offset + position * BLOCK_BYTES, self.buffer.ctypes.data,
                      self.positions * BLOCK_BYTES, UNREGISTERED_BUFFER, 0, Op.READ)  # fmt: skip
            self.run_ios(ios)
        start = (position - self.first_position) * BLOCK_BYTES
        return JournalBlock.unpack(self.buffer[start : start + BLOCK_BYTES].tobytes(), self.tag)

    def never_written(self, sequence: int) -> bool:
        """Whether the block read last (for sequence) is all zeros."""
        start = ((sequence - 1) % self.block_count - self.first_position) * BLOCK_BYTES
        return not self.buffer[start : start + BLOCK_BYTES].any()

    def written_after_durable(self, bad_sequence: int, end: int) -> bool:
        """Whether a block after bad_sequence was written when bad_sequence was already
        durable. Looks ahead through the blocks of the batch that may have been torn and
        stops at the first block of an older lap or never written."""
        for sequence in range(bad_sequence + 1, end):
            block = self.block(sequence)
            if block is None:
                if self.never_written(sequence):
                    return False
                continue  # torn or garbage: a batch in flight may have holes
            if block.block_sequence != sequence:
                return False  # an older lap: nothing was written past the tail
            if block.durable_through > bad_sequence:
                return True
        return False
