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

from engine.alloc.log import FREE, LIVE, QUARANTINED, WRITING, Eviction, MemberLog
from engine.index import HashIndex, digest_array
from engine.store.layout import (
    CHECKPOINT_ENTRY_DTYPE,
    ENTRY_FLAG_PINNED,
    RECORD_DELETE,
    RECORD_EVICT,
    RECORD_PIN,
    RECORD_PUT,
    RECORD_UNPIN,
    LayoutError,
    Record,
)

SLOT_BITS = 48
VALUE_BYTES_BITS = 40
MAX_VALUE_PARTS = 255
FLAG_PINNED = 1 << 48
FLAG_REFERENCED = 1 << 49

Part = tuple[int, int]  # (member, slot)


def digest_words_of(digests: np.ndarray) -> np.ndarray:
    """(n, 2) (hi, lo) index words of an array of V16 digests, as engine.index's
    digest_array makes them from bytes, without a Python loop."""
    words = np.frombuffer(digests.tobytes(), dtype="<u8").reshape(-1, 2)
    return np.ascontiguousarray(words[:, ::-1])


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
    def __init__(
        self, slot_counts: Sequence[int], log_heads: Sequence[int], *, discard_freed: bool = False
    ):
        self.logs = [
            MemberLog(member, count, head)
            for member, (count, head) in enumerate(zip(slot_counts, log_heads, strict=True))
        ]
        self.index = HashIndex(max_keys=sum(slot_counts))
        self.multi_parts: dict[bytes, tuple[Part, ...]] = {}
        self.evictions = 0
        # Slots freed by deletes and overwrites, held busy (WRITING) until the store has
        # discarded them, so no put can be given a slot whose discard is still to come.
        self.to_discard: list[Part] | None = [] if discard_freed else None

    def close(self) -> None:
        self.index.close()

    # ---- reading -----------------------------------------------------------------------

    def locate(self, digest: bytes, *, mark_referenced: bool = False) -> Located | None:
        found = self.index.get(digest, or_meta=FLAG_REFERENCED if mark_referenced else 0)
        return None if found is None else self._located(digest, *found)

    def locate_many(
        self, digests: Sequence[bytes], *, mark_referenced: bool = False
    ) -> list[Located | None]:
        """locate() for many digests in one probe of the index."""
        if not digests:
            return []
        found, locations, metas = self.index.lookup_many(
            digest_array(digests), or_meta=FLAG_REFERENCED if mark_referenced else 0
        )
        rows = zip(digests, found.tolist(), locations.tolist(), metas.tolist(), strict=True)
        return [self._located(d, where, meta) if hit else None for d, hit, where, meta in rows]

    def _located(self, digest: bytes, location: int, meta: int) -> Located:
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
        first_member, first_slot = parts[0]
        old_multi_parts = self.multi_parts.pop(digest, None)
        # One index call swaps the value in and hands back the old one (replay runs this
        # for every PUT record, so a separate lookup first would cost a third of it).
        old = self.index.put(
            digest, encode_location(first_member, first_slot), encode_meta(value_bytes, len(parts))
        )
        if old is not None:
            old_location, old_meta = old
            multi = meta_part_count(old_meta) > 1
            self._release(digest, old_multi_parts if multi else (decode_location(old_location),))
            if old_meta & FLAG_PINNED:  # a pin belongs to the key, not to one value of it
                self.index.update_meta_many(digest_array([digest]), 0, FLAG_PINNED)
        for part_index, (member, slot) in enumerate(parts):
            self.logs[member].occupy(slot, digest, sequence, part_index)
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
        if record.key_digest == bytes(16):
            raise LayoutError(
                f"journal record of sequence {record.sequence} has an all-zero key digest"
            )
        for member, slot in record.parts:
            if member >= len(self.logs) or slot >= self.logs[member].slot_count:
                raise LayoutError(
                    f"journal record of sequence {record.sequence} names member {member} "
                    f"slot {slot}, outside the store"
                )
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
                if self.to_discard is not None:
                    log.state[slot] = WRITING
                    self.to_discard.append((member, slot))

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
            digests = digest_words_of(entries["digest"])
            found, _locations, metas = self.index.lookup_many(digests)
            assert found.all(), "a live slot whose value is not in the index"
            entries["value_bytes"] = metas & ((1 << VALUE_BYTES_BITS) - 1)
            entries["part_count"] = (metas >> VALUE_BYTES_BITS) & 0xFF
            entries["flags"] = np.where(metas & FLAG_PINNED, ENTRY_FLAG_PINNED, 0)
        return entries

    def load_checkpoint_entries(self, entries: np.ndarray) -> None:
        """Rebuilds the state from checkpoint entries (the state must be empty; read_checkpoint
        has checked that each entry lies inside the store and claims its own slot), with
        numpy over all entries at once: a checkpoint holds one entry per live slot, and
        a store has millions."""
        assert len(self.index) == 0
        if len(entries) == 0:
            return
        words = digest_words_of(entries["digest"])
        order = np.lexsort((entries["part_index"], words[:, 1], words[:, 0]))
        entries, words = entries[order], words[order]
        starts = np.flatnonzero(np.any(words[1:] != words[:-1], axis=1)) + 1
        group_start = np.concatenate(([0], starts))
        group_size = np.diff(np.concatenate((group_start, [len(entries)])))
        position = np.arange(len(entries)) - np.repeat(group_start, group_size)
        first = entries[group_start]
        consistent = (
            (entries["part_index"] == position)
            & (entries["part_count"] == np.repeat(first["part_count"], group_size))
            & (entries["sequence"] == np.repeat(first["sequence"], group_size))
            & (first["part_count"] == group_size).repeat(group_size)
        )
        if not consistent.all():
            bad = entries[np.flatnonzero(~consistent)[0]]
            raise ValueError(
                f"checkpoint: value {bad['digest'].tobytes().hex()} has inconsistent parts"
            )
        slots = entries["member"].astype(np.uint64) << SLOT_BITS | entries["slot"]
        pinned = np.where(first["flags"] & ENTRY_FLAG_PINNED, FLAG_PINNED, 0).astype(np.uint64)
        metas = (
            first["value_bytes"]
            | first["part_count"].astype(np.uint64) << VALUE_BYTES_BITS
            | pinned
        )
        self.index.upsert_many(words[group_start], slots[group_start], metas)
        for log in self.logs:
            mine = entries["member"] == log.member
            slot_numbers = entries["slot"][mine]
            log.state[slot_numbers] = LIVE
            log.digest[slot_numbers] = entries["digest"][mine]
            log.sequence[slot_numbers] = entries["sequence"][mine]
            log.part_index[slot_numbers] = entries["part_index"][mine]
        for start, size in zip(
            group_start[group_size > 1], group_size[group_size > 1], strict=True
        ):
            group = entries[start : start + size]
            parts = tuple(zip(group["member"].tolist(), group["slot"].tolist(), strict=True))
            self.multi_parts[group[0]["digest"].tobytes()] = parts

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
