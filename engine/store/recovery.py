"""Opening a store's metadata: superblocks (two copies, either may be damaged) and the
newest valid checkpoint. Journal replay itself is engine.journal.replay."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import CtxkvError
from engine.io.buffers import aligned_array
from engine.io.ring import UNREGISTERED_BUFFER, Op, Ring
from engine.nvme.device import Device
from engine.store.layout import (
    BLOCK_BYTES,
    CHECKPOINT_ENTRY_DTYPE,
    CheckpointHeader,
    LayoutError,
    Superblock,
    crc32c,
)

RunIos = Callable[[np.ndarray], np.ndarray]


class StoreOpenError(CtxkvError, ValueError):
    """The targets are not (all) members of one intact store."""


@dataclass(frozen=True)
class Damage:
    where: str  # "member 1 superblock B", "checkpoint slot 0", ...
    offset: int
    member: int
    problem: str

    def __str__(self) -> str:
        return f"{self.where} (member {self.member}, offset {self.offset}): {self.problem}"


def read_blocks(run_ios: RunIos, member: int, offsets: Sequence[int]) -> list[bytes]:
    buffer = aligned_array(len(offsets) * BLOCK_BYTES)
    ios = Ring.batch(len(offsets))
    for i, offset in enumerate(offsets):
        ios[i] = (
            offset,
            buffer.ctypes.data + i * BLOCK_BYTES,
            BLOCK_BYTES,
            UNREGISTERED_BUFFER,
            member,
            Op.READ,
        )
    run_ios(ios)
    return [buffer[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES].tobytes() for i in range(len(offsets))]


def read_superblocks(
    devices: Sequence[Device], run_ios: RunIos
) -> tuple[list[Superblock], list[Damage]]:
    """One good superblock per member, and the damaged copies found on the way.

    Copy A is at offset 0; copy B's offset is in copy A or, if A is damaged, at the last
    block of the target (where format puts it)."""
    chosen: list[Superblock] = []
    damage: list[Damage] = []
    for member, device in enumerate(devices):
        capacity = device.geometry.capacity_bytes
        default_b = (capacity // BLOCK_BYTES) * BLOCK_BYTES - BLOCK_BYTES
        block_a, block_b = read_blocks(run_ios, member, [0, default_b])
        copies = {}
        for name, offset, block in (("A", 0, block_a), ("B", default_b, block_b)):
            try:
                copies[name] = Superblock.unpack(block, f"{device.path} superblock {name}")
            except LayoutError as error:
                damage.append(Damage(f"superblock {name}", offset, member, str(error)))
        if not copies:
            raise StoreOpenError(
                f"{device.path} holds no valid ctxkv superblock (both copies damaged or never "
                f"formatted): {'; '.join(d.problem for d in damage if d.member == member)}"
            )
        if len(copies) == 2 and copies["A"] != copies["B"]:
            # Both valid yet different: an interrupted reformat. Trust neither silently.
            raise StoreOpenError(
                f"{device.path}: superblock copies A and B are both valid but differ"
            )
        superblock = copies.get("A") or copies["B"]
        if superblock.superblock_b_offset != default_b:
            raise StoreOpenError(
                f"{device.path}: superblock B expected at {superblock.superblock_b_offset} but the "
                f"target's last block is {default_b}: the target changed size since format"
            )
        chosen.append(superblock)
    check_membership(devices, chosen)
    return chosen, damage


def check_membership(devices: Sequence[Device], superblocks: Sequence[Superblock]) -> None:
    first = superblocks[0]
    if first.member_count != len(devices):
        raise StoreOpenError(
            f"the store {first.store_uuid} has {first.member_count} members, "
            f"{len(devices)} targets given"
        )
    for position, (device, superblock) in enumerate(zip(devices, superblocks, strict=True)):
        if superblock.store_uuid != first.store_uuid:
            raise StoreOpenError(
                f"{device.path} belongs to store {superblock.store_uuid}, not {first.store_uuid} "
                f"(a foreign member)"
            )
        if superblock.member_index != position:
            raise StoreOpenError(
                f"{device.path} is member {superblock.member_index} of store {first.store_uuid}, "
                f"but was given in position {position}: give targets in member order"
            )


@dataclass(frozen=True)
class Checkpoint:
    slot: int
    header: CheckpointHeader
    entries: np.ndarray


def read_checkpoint(run_ios: RunIos, superblock: Superblock, slot: int) -> Checkpoint | None:
    """Checkpoint slot `slot` of member 0; None if never written (zeros), LayoutError if
    it is not valid."""
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
    return Checkpoint(slot, header, entries)


def newest_checkpoint(run_ios: RunIos, superblock: Superblock) -> tuple[Checkpoint, list[Damage]]:
    """The valid checkpoint with the highest generation, and the damaged slots seen."""
    valid, damage = [], []
    for slot in (0, 1):
        try:
            checkpoint = read_checkpoint(run_ios, superblock, slot)
        except LayoutError as error:
            offset = superblock.checkpoint_offsets[slot]
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
