"""Checkpoints: the index as of one journal position, in two alternating slots on
member 0 (docs/format.md), so a torn checkpoint write leaves the previous one whole."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.io.buffers import aligned_array
from engine.io.ring import UNREGISTERED_BUFFER, Op, Ring
from engine.store.layout import (
    BLOCK_BYTES,
    CHECKPOINT_ENTRY_DTYPE,
    CheckpointHeader,
    LayoutError,
    Superblock,
    crc32c,
)
from engine.store.recovery import Damage, RunIos, StoreOpenError, read_blocks


@dataclass(frozen=True)
class Checkpoint:
    slot: int
    header: CheckpointHeader
    entries: np.ndarray


def read_checkpoint(
    run_ios: RunIos, superblocks: Sequence[Superblock], slot: int
) -> Checkpoint | None:
    """Checkpoint slot `slot` of member 0; None if never written (zeros), LayoutError if
    it is not valid for the store these superblocks describe."""
    superblock = superblocks[0]
    offset = superblock.checkpoint_offsets[slot]
    [header_block] = read_blocks(run_ios, 0, [offset])
    if header_block == bytes(BLOCK_BYTES):
        return None
    header = CheckpointHeader.unpack(header_block, f"checkpoint slot {slot}")
    entry_bytes = header.entry_count * CHECKPOINT_ENTRY_DTYPE.itemsize
    if BLOCK_BYTES + entry_bytes > superblock.checkpoint_bytes:
        raise LayoutError(f"checkpoint slot {slot}: {header.entry_count} entries overflow the slot")
    if entry_bytes == 0:
        entries = np.zeros(0, CHECKPOINT_ENTRY_DTYPE)
    else:
        read_bytes = -(-entry_bytes // BLOCK_BYTES) * BLOCK_BYTES
        buffer = aligned_array(read_bytes)
        ios = Ring.batch(1)
        ios[0] = (
            offset + BLOCK_BYTES,
            buffer.ctypes.data,
            read_bytes,
            UNREGISTERED_BUFFER,
            0,
            Op.READ,
        )
        run_ios(ios)
        raw = buffer[:entry_bytes]
        if crc32c(raw.tobytes()) != header.entries_crc32c:
            raise LayoutError(f"checkpoint slot {slot}: entries fail their crc32c")
        entries = raw.view(CHECKPOINT_ENTRY_DTYPE).copy()
    if len(header.log_heads) != superblock.member_count:
        raise LayoutError(
            f"checkpoint slot {slot}: {len(header.log_heads)} log heads for "
            f"{superblock.member_count} members"
        )
    slot_counts = np.array([sb.slot_count for sb in superblocks], dtype=np.uint64)
    if any(head >= count for head, count in zip(header.log_heads, slot_counts, strict=True)):
        raise LayoutError(f"checkpoint slot {slot}: a log head lies past its member's slots")
    problem = entries_problem(entries, slot_counts)
    if problem:
        raise LayoutError(f"checkpoint slot {slot}: {problem}")
    return Checkpoint(slot, header, entries)


def entries_problem(entries: np.ndarray, slot_counts: np.ndarray) -> str | None:
    """What puts an entry outside the store or makes two entries claim one slot."""
    if not len(entries):
        return None
    if not np.frombuffer(entries["digest"].tobytes(), np.uint8).reshape(-1, 16).any(axis=1).all():
        return "an entry has an all-zero key digest"
    member = entries["member"].astype(np.uint64)
    if (member >= len(slot_counts)).any():
        return "an entry names a member the store does not have"
    if (entries["slot"] >= slot_counts[member]).any():
        return "an entry names a slot past its member's extent area"
    if ((entries["part_count"] == 0) | (entries["part_index"] >= entries["part_count"])).any():
        return "an entry has a part index outside its part count"
    slots = member << np.uint64(32) | entries["slot"].astype(np.uint64)
    if len(np.unique(slots)) != len(slots):
        return "two entries claim one slot"
    return None


def newest_checkpoint(
    run_ios: RunIos, superblocks: Sequence[Superblock]
) -> tuple[Checkpoint, list[Damage]]:
    """The valid checkpoint with the highest generation, and the damaged slots seen."""
    valid, damage = [], []
    for slot in (0, 1):
        try:
            checkpoint = read_checkpoint(run_ios, superblocks, slot)
        except LayoutError as error:
            offset = superblocks[0].checkpoint_offsets[slot]
            damage.append(Damage(f"checkpoint slot {slot}", offset, 0, str(error)))
            continue
        if checkpoint is not None:
            valid.append(checkpoint)
    if not valid:
        raise StoreOpenError(
            "no valid checkpoint in either slot: "
            + "; ".join(d.problem for d in damage)
            + " (ctxkv scrub --rebuild-index can rebuild the index from the extents)"
        )
    return max(valid, key=lambda checkpoint: checkpoint.header.generation), damage


def write_checkpoint(
    run_ios: RunIos,
    superblock: Superblock,
    slot: int,
    *,
    generation: int,
    journal_sequence: int,
    next_sequence: int,
    log_heads: tuple[int, ...],
    entries: np.ndarray,
) -> CheckpointHeader:
    """Writes and flushes a checkpoint into slot (0 or 1) of member 0."""
    assert slot in (0, 1) and entries.dtype == CHECKPOINT_ENTRY_DTYPE
    header = CheckpointHeader(
        generation=generation,
        journal_sequence=journal_sequence,
        next_sequence=next_sequence,
        entry_count=len(entries),
        entries_crc32c=crc32c(entries.tobytes()) if len(entries) else 0,
        log_heads=log_heads,
    )
    total = BLOCK_BYTES + -(-entries.nbytes // BLOCK_BYTES) * BLOCK_BYTES
    assert total <= superblock.checkpoint_bytes, (total, superblock.checkpoint_bytes)
    buffer = aligned_array(total)
    buffer[:BLOCK_BYTES] = np.frombuffer(header.pack(), np.uint8)
    buffer[BLOCK_BYTES : BLOCK_BYTES + entries.nbytes] = entries.view(np.uint8)
    offset = superblock.checkpoint_offsets[slot]
    ios = Ring.batch(1)
    ios[0] = (offset, buffer.ctypes.data, total, UNREGISTERED_BUFFER, 0, Op.WRITE)
    run_ios(ios)
    ios[0] = (0, 0, 0, UNREGISTERED_BUFFER, 0, Op.FSYNC)
    run_ios(ios)
    return header
