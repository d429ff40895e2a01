"""The log-structured allocator: each member's slots are written in circular order.

The head of a member's log moves forward one slot per allocation. A free slot is taken;
a live one is evicted (FIFO), unless its value was read since the head last passed (it
keeps its place once: CLOCK's second chance) or is pinned (always kept), in which case
the head steps over it. Nothing is ever copied, so device bytes written per byte put stay
at 1 plus the headers and the journal.

The allocator only keeps per-slot facts (state, owner digest, sequence, part); whether a
value is pinned or referenced lives in the index, which the caller consults through the
`keep` callback.

With tenant quotas (engine/tenants/quotas.py) a put allocates under a Claim: the head
also steps over the values the claim may not take (another tenant's within its quota),
and each slot's owner tenant is the tag at the end of its digest (engine/tenants/keys.py),
so the logs count every tenant's slots as they change hands, with no per-slot memory.
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
class Claim:
    """Which slots a put may take. own_only (its tenant is at its quota): only the
    tenant's own live values, oldest first. Otherwise: free slots, and live values whose
    tag is not protected (no tenant's, or a tenant's over its quota)."""

    tag: int | None
    own_only: bool
    protected: tuple[int, ...]  # tags of the tenants within their quotas

    def allows(self, state: int, tag: int) -> bool:
        """Whether one slot may be taken: candidates() for a single slot."""
        if state == LIVE:
            return tag == self.tag if self.own_only else tag not in self.protected
        return state == FREE and not self.own_only

    def candidates(self, states: np.ndarray, tags: np.ndarray) -> np.ndarray:
        live = states == LIVE
        if self.own_only:
            return live & (tags == self.tag)
        # A comparison per protected tag: tenants are few, and np.isin costs more.
        for tag in self.protected:
            live &= tags != tag
        return live | (states == FREE)


# The claimed scan tests the head's slot alone first (usually it is taken), then slots a
# chunk per numpy call, each chunk larger: stepping over a long run of other tenants'
# values costs a few calls, not a Python iteration per slot.
FIRST_SCAN_SLOTS = 16
MAX_SCAN_SLOTS = 65536


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
        # The digests' tenant tags: a view of their last 4 bytes, not a copy.
        self.tags = self.digest.view("<u4").reshape(-1, 4)[:, 3]
        # Live and being-written slots per tenant tag, shared by all members' logs; None
        # (no quotas) costs the untenanted store one test per change.
        self.usage: dict[int, int] | None = None

    def occupy(self, slot: int, digest: bytes, sequence: int, part_index: int) -> None:
        if self.usage is not None:
            self._count(slot, -1)
        self.state[slot] = LIVE
        self.digest[slot] = np.void(digest)
        self.sequence[slot] = sequence
        self.part_index[slot] = part_index
        if self.usage is not None:
            self._count(slot, 1)

    def release(self, slot: int) -> None:
        if self.usage is not None:
            self._count(slot, -1)
        if self.state[slot] != QUARANTINED:
            self.state[slot] = FREE
        self.digest[slot] = np.void(bytes(16))

    def _count(self, slot: int, sign: int) -> None:
        if self.state[slot] in (LIVE, WRITING):
            tag = int(self.tags[slot])
            if tag in self.usage:
                self.usage[tag] += sign

    def slots_by_tag(self) -> dict[int, int]:
        """Live and being-written slots per tag, counted afresh."""
        busy = (self.state == LIVE) | (self.state == WRITING)
        tags, counts = np.unique(self.tags[busy], return_counts=True)
        return dict(zip(tags.tolist(), counts.tolist(), strict=True))

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

    def allocate_claimed(
        self, keep: Callable[[bytes], bool], claim: Claim, digest: bytes
    ) -> tuple[int, Eviction | None]:
        """allocate() for a put of digest under claim: the head steps over every slot the
        claim may not take, as over a pinned one. The slot is marked with digest at once,
        so its tenant's usage counts it while it is being written."""
        head = self.head
        if claim.allows(int(self.state[head]), int(self.tags[head])):
            taken = self._take(head, keep, digest)
            if taken is not None:
                return taken
        for _ in range(2):
            for begin, end in ((head + 1, self.slot_count), (0, head + 1)):
                chunk, scan_slots = begin, FIRST_SCAN_SLOTS
                while chunk < end:
                    stop = min(chunk + scan_slots, end)
                    found = claim.candidates(self.state[chunk:stop], self.tags[chunk:stop])
                    for offset in np.flatnonzero(found).tolist():
                        taken = self._take(chunk + offset, keep, digest)
                        if taken is not None:
                            return taken
                    chunk, scan_slots = stop, min(2 * scan_slots, MAX_SCAN_SLOTS)
        raise StoreFullError(
            f"member {self.member}: every slot this put may take is pinned or being written"
        )

    def _take(
        self, slot: int, keep: Callable[[bytes], bool], digest: bytes
    ) -> tuple[int, Eviction | None] | None:
        """Takes a slot the claim allows for digest, unless keep() keeps its value."""
        eviction = None
        if self.state[slot] == LIVE:
            owner = self.digest[slot].tobytes()
            if keep(owner):
                return None
            eviction = Eviction(self.member, slot, owner, int(self.sequence[slot]))
        self.head = (slot + 1) % self.slot_count
        if self.usage is not None:
            self._count(slot, -1)
        self.state[slot] = WRITING
        self.digest[slot] = np.void(digest)
        if self.usage is not None:
            self._count(slot, 1)
        return slot, eviction
