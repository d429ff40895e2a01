"""The store's in-memory state: the index, each member's slots, and the parts of values
that span several extents. Live operations and journal replay change it through the same
apply_* methods, so a recovered store is the store that was running.

Index words (engine.index stores them opaquely):
  location = member << 48 | slot                     (part 0 of the value)
  meta     = value_bytes | part_count << 40 | flags << 48
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.alloc.log import FREE, LIVE, QUARANTINED, Eviction, MemberLog
from engine.index import HashIndex, digest_array
from engine.store.layout import (
    CHECKPOINT_ENTRY_DTYPE,
    ENTRY_FLAG_PINNED,
    RECORD_DELETE,
    RECORD_EVICT,
    RECORD_PIN,
    RECORD_PUT,
    RECORD_UNPIN,
    Record,
)

SLOT_BITS = 48
VALUE_BYTES_BITS = 40
MAX_VALUE_PARTS = 255
FLAG_PINNED = 1 << 48
FLAG_REFERENCED = 1 << 49

Part = tuple[int, int]  # (member, slot)


def encode_location(member: int, slot: int) -> int:
    return member << SLOT_BITS | slot


def decode_location(location: int) -> Part:
    return location >> SLOT_BITS, location & ((1 << SLOT_BITS) - 1)


def encode_meta(value_bytes: int, part_count: int, flags: int = 0) -> int:
    assert 0 <= value_bytes < 1 << VALUE_BYTES_BITS and 0 < part_count <= MAX_VALUE_PARTS
    return value_bytes | part_count << VALUE_BYTES_BITS | flags


def meta_value_bytes(meta: int) -> int:
    return meta & ((1 << VALUE_BYTES_BITS) - 1)


def meta_part_count(meta: int) -> int:
    return (meta >> VALUE_BYTES_BITS) & 0xFF


@dataclass(frozen=True)
class Located:
    """Where a value lives and what the index says of it."""

    value_bytes: int
    parts: tuple[Part, ...]
    pinned: bool


class StoreState:
    def __init__(self, slot_counts: Sequence[int], log_heads: Sequence[int]):
        self.logs = [
            MemberLog(member, count, head)
            for member, (count, head) in enumerate(zip(slot_counts, log_heads, strict=True))
        ]
        self.index = HashIndex(max_keys=sum(slot_counts))
        self.multi_parts: dict[bytes, tuple[Part, ...]] = {}
        self.evictions = 0

    def close(self) -> None:
        self.index.close()

    # ---- reading -----------------------------------------------------------------------

    def locate(self, digest: bytes, *, mark_referenced: bool = False) -> Located | None:
        found = self.index.get(digest, or_meta=FLAG_REFERENCED if mark_referenced else 0)
        if found is None:
            return None
        location, meta = found
        part_count = meta_part_count(meta)
        parts = self.multi_parts[digest] if part_count > 1 else (decode_location(location),)
        assert len(parts) == part_count, (digest.hex(), parts, part_count)
        return Located(meta_value_bytes(meta), parts, bool(meta & FLAG_PINNED))

    def keep_on_lap(self, digest: bytes) -> bool:
        """The allocator's question when its head reaches a live value: does it stay?"""
        found = self.index.get(digest)
        if found is None:
            return False  # a slot whose value is gone: reuse it
        _location, meta = found
        if meta & FLAG_PINNED:
            return True
        if meta & FLAG_REFERENCED:
            self.index.update_meta_many(
                digest_array([digest]), clear_mask=FLAG_REFERENCED, set_mask=0
            )
            return True
        return False

    # ---- changing (live operations and replay) -----------------------------------------

    def apply_put(
        self, digest: bytes, sequence: int, value_bytes: int, parts: Sequence[Part]
    ) -> None:
        for member, slot in parts:
            log = self.logs[member]
            if log.state[slot] == LIVE:
                # Replay of a put whose EVICT record preceded it in a torn batch, or an
                # eviction not journaled before a crash: the old owner is gone either way.
                owner = log.digest[slot].tobytes()
                if owner != digest:
                    self._drop(owner, expected=(member, slot))
        flags = 0
        old = self.locate(digest)
        if old is not None:
            flags = FLAG_PINNED if old.pinned else 0
            self._release(digest, old.parts)
        for part_index, (member, slot) in enumerate(parts):
            self.logs[member].occupy(slot, digest, sequence, part_index)
        first_member, first_slot = parts[0]
        self.index.put(
            digest,
            encode_location(first_member, first_slot),
            encode_meta(value_bytes, len(parts), flags),
        )
        if len(parts) > 1:
            self.multi_parts[digest] = tuple(parts)

    def apply_delete(self, digest: bytes) -> bool:
        return self._drop(digest)

    def apply_evict(self, eviction: Eviction) -> None:
        """Drops the value that owned the evicted slot (if it still does)."""
        if self._drop(eviction.digest, expected=(eviction.member, eviction.slot)):
            self.evictions += 1

    def apply_pin(self, digest: bytes, pinned: bool) -> bool:
        clear, set_ = (0, FLAG_PINNED) if pinned else (FLAG_PINNED, 0)
        return self.index.update_meta_many(digest_array([digest]), clear, set_) > 0

    def apply_record(self, record: Record) -> None:
        if record.kind == RECORD_PUT:
            self.apply_put(record.key_digest, record.sequence, record.value_bytes, record.parts)
        elif record.kind == RECORD_DELETE:
            self.apply_delete(record.key_digest)
        elif record.kind == RECORD_EVICT:
            ((member, slot),) = record.parts
            self.apply_evict(Eviction(member, slot, record.key_digest, record.sequence))
        elif record.kind in (RECORD_PIN, RECORD_UNPIN):
            self.apply_pin(record.key_digest, record.kind == RECORD_PIN)
        else:
            raise AssertionError(f"unknown record kind {record.kind}")

    def quarantine(self, digest: bytes, bad: Part) -> None:
        """A part failed verification: it is never read again, its value is gone."""
        member, slot = bad
        self._drop(digest, expected=bad)
        self.logs[member].state[slot] = QUARANTINED

    def _drop(self, digest: bytes, expected: Part | None = None) -> bool:
        located = self.locate(digest)
        if located is None or (expected is not None and expected not in located.parts):
            return False
        removed = self.index.remove(digest)
        assert removed is not None
        self._release(digest, located.parts)
        return True

    def _release(self, digest: bytes, parts: Sequence[Part]) -> None:
        self.multi_parts.pop(digest, None)
        for member, slot in parts:
            log = self.logs[member]
            if log.digest[slot].tobytes() == digest and log.state[slot] == LIVE:
                log.release(slot)

    # ---- checkpoints -------------------------------------------------------------------

    def checkpoint_entries(self) -> np.ndarray:
        """One entry per live slot (docs/format.md, checkpoint entries)."""
        chunks = []
        for log in self.logs:
            slots = log.live_slots()
            entries = np.zeros(len(slots), dtype=CHECKPOINT_ENTRY_DTYPE)
            entries["digest"] = log.digest[slots]
            entries["sequence"] = log.sequence[slots]
            entries["slot"] = slots
            entries["member"] = log.member
            entries["part_index"] = log.part_index[slots]
            chunks.append(entries)
        entries = np.concatenate(chunks) if chunks else np.zeros(0, CHECKPOINT_ENTRY_DTYPE)
        if len(entries):
            # (hi, lo) words, as engine.index.digest_array makes them, without a Python loop.
            words = np.frombuffer(entries["digest"].tobytes(), dtype="<u8").reshape(-1, 2)
            digests = np.ascontiguousarray(words[:, ::-1])
            found, _locations, metas = self.index.lookup_many(digests)
            assert found.all(), "a live slot whose value is not in the index"
            entries["value_bytes"] = metas & ((1 << VALUE_BYTES_BITS) - 1)
            entries["part_count"] = (metas >> VALUE_BYTES_BITS) & 0xFF
            entries["flags"] = np.where(metas & FLAG_PINNED, ENTRY_FLAG_PINNED, 0)
        return entries

    def load_checkpoint_entries(self, entries: np.ndarray) -> None:
        """Rebuilds the state from checkpoint entries (the state must be empty)."""
        assert len(self.index) == 0
        order = np.lexsort((entries["part_index"], entries["sequence"]))
        by_value: dict[bytes, list] = {}
        for entry in entries[order]:
            by_value.setdefault(entry["digest"].tobytes(), []).append(entry)
        for digest, parts in by_value.items():
            first = parts[0]
            part_indexes = [int(p["part_index"]) for p in parts]
            if part_indexes != list(range(int(first["part_count"]))):
                raise ValueError(f"checkpoint: value {digest.hex()} has parts {part_indexes}")
            self.apply_put(
                digest,
                int(first["sequence"]),
                int(first["value_bytes"]),
                [(int(p["member"]), int(p["slot"])) for p in parts],
            )
            if int(first["flags"]) & ENTRY_FLAG_PINNED:
                self.apply_pin(digest, True)

    def counts(self) -> dict[str, int]:
        states = np.concatenate([log.state for log in self.logs])
        return {
            "keys": len(self.index),
            "slots": len(states),
            "slots_live": int((states == LIVE).sum()),
            "slots_free": int((states == FREE).sum()),
            "slots_quarantined": int((states == QUARANTINED).sum()),
            "evictions": self.evictions,
        }
