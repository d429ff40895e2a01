"""The log-structured allocator: each member's slots are written in circular order.

The head of a member's log moves forward one slot per allocation. A free slot is taken;
a live one is evicted (FIFO), unless its value was read since the head last passed (it
keeps its place once: CLOCK's second chance) or is pinned (always kept), in which case
the head steps over it. Nothing is ever copied, so device bytes written per byte put stay
at 1 plus the headers and the journal.

The allocator only keeps per-slot facts (state, owner digest, sequence, part); whether a
value is pinned or referenced lives in the index, which the caller consults through the
`keep` callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.errors import CtxkvError

FREE, LIVE, WRITING, QUARANTINED = 0, 1, 2, 3
STATE_NAMES = {FREE: "free", LIVE: "live", WRITING: "writing", QUARANTINED: "quarantined"}


class StoreFullError(CtxkvError, RuntimeError):
    """No slot can be evicted: everything is pinned or being written."""


@dataclass(frozen=True)
class Eviction:
    member: int
    slot: int
    digest: bytes
    sequence: int


class MemberLog:
    """The slots of one member and its log head."""

    def __init__(self, member: int, slot_count: int, head: int = 0):
        assert slot_count > 0 and 0 <= head < slot_count, (slot_count, head)
        self.member = member
        self.slot_count = slot_count
        self.head = head
        self.state = np.zeros(slot_count, dtype=np.uint8)
        # V16, not S16: numpy strips trailing NUL bytes from S fields, and digests have them.
        self.digest = np.zeros(slot_count, dtype="V16")
        self.sequence = np.zeros(slot_count, dtype=np.uint64)
        self.part_index = np.zeros(slot_count, dtype=np.uint16)

    def occupy(self, slot: int, digest: bytes, sequence: int, part_index: int) -> None:
        self.state[slot] = LIVE
        self.digest[slot] = np.void(digest)
        self.sequence[slot] = sequence
        self.part_index[slot] = part_index

    def release(self, slot: int) -> None:
        if self.state[slot] != QUARANTINED:
            self.state[slot] = FREE
        self.digest[slot] = np.void(bytes(16))

    def live_slots(self) -> np.ndarray:
        return np.flatnonzero(self.state == LIVE)

    def allocate(self, keep: Callable[[bytes], bool]) -> tuple[int, Eviction | None]:
        """The next slot to write, marked WRITING, and the live value it displaces.

        keep(digest) says whether a live value may stay (pinned, or referenced, in which
        case keep also clears the reference). Bounded: two laps at most, the first may
        only clear references.
        """
        for _ in range(2 * self.slot_count):
            slot = self.head
            self.head = (self.head + 1) % self.slot_count
            state = self.state[slot]
            if state == FREE:
                self.state[slot] = WRITING
                return slot, None
            if state == LIVE:
                digest = self.digest[slot].tobytes()
                if keep(digest):
                    continue
                eviction = Eviction(self.member, slot, digest, int(self.sequence[slot]))
                self.state[slot] = WRITING
                return slot, eviction
        raise StoreFullError(
            f"member {self.member}: all {self.slot_count} slots are pinned or being written"
        )
