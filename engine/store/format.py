"""Planning a store's layout over its members and writing a fresh one (docs/format.md)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import numpy as np

from engine.errors import CtxkvError
from engine.io.buffers import aligned_array
from engine.io.ring import UNREGISTERED_BUFFER, Op, Ring
from engine.nvme.device import Device
from engine.store.layout import (
    BLOCK_BYTES,
    CHECKPOINT_ENTRY_DTYPE,
    EXTENT_HEADER_BYTES,
    MAX_EXTENT_BYTES,
    MAX_MEMBERS,
    MIN_EXTENT_BYTES,
    CheckpointHeader,
    Superblock,
)
from engine.store.signatures import blkid_signatures, ctxkv_signature

MiB = 1 << 20
METADATA_START = 1 * MiB
MIN_JOURNAL_BYTES = 4 * MiB
MAX_JOURNAL_BYTES = 256 * MiB


class TargetInUseError(CtxkvError, ValueError):
    """The target holds a filesystem, partition table or store, and --force was not given."""


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_layout(
    capacities: Sequence[int],
    extent_bytes: int,
    *,
    journal_bytes: int | None = None,
    store_uuid: uuid.UUID | None = None,
) -> list[Superblock]:
    """The superblock of every member for a store over targets of these sizes."""
    if not MIN_EXTENT_BYTES <= extent_bytes <= MAX_EXTENT_BYTES or extent_bytes & (
        extent_bytes - 1
    ):
        raise ValueError(
            f"extent size must be a power of two from {MIN_EXTENT_BYTES} (64 KiB) to "
            f"{MAX_EXTENT_BYTES} (64 MiB), got {extent_bytes}"
        )
    if not 0 < len(capacities) <= MAX_MEMBERS:
        raise ValueError(f"a store has 1..{MAX_MEMBERS} members, got {len(capacities)}")
    slot_bytes = extent_bytes + EXTENT_HEADER_BYTES
    if journal_bytes is None:
        journal_bytes = min(max(capacities[0] // 256, MIN_JOURNAL_BYTES), MAX_JOURNAL_BYTES)
    journal_bytes = round_up(journal_bytes, BLOCK_BYTES)
    # Big enough for every slot of every member to be live at once.
    slots_upper_bound = sum(capacity // slot_bytes for capacity in capacities)
    checkpoint_bytes = round_up(
        BLOCK_BYTES + slots_upper_bound * CHECKPOINT_ENTRY_DTYPE.itemsize, MiB
    )
    store_uuid = store_uuid or uuid.uuid4()
    now_ns = time.time_ns()
    superblocks = []
    for index, capacity in enumerate(capacities):
        superblock_b = (capacity // BLOCK_BYTES) * BLOCK_BYTES - BLOCK_BYTES
        if index == 0:
            journal_offset = METADATA_START
            checkpoints = (
                journal_offset + journal_bytes,
                journal_offset + journal_bytes + checkpoint_bytes,
            )
            extent_area = round_up(checkpoints[1] + checkpoint_bytes, MiB)
        else:
            journal_offset, checkpoints, extent_area = 0, (0, 0), METADATA_START
        slot_count = (superblock_b - extent_area) // slot_bytes if superblock_b > extent_area else 0
        if slot_count < 1:
            raise ValueError(
                f"member {index} ({capacity} bytes) is too small: after metadata it has no room "
                f"for one {slot_bytes}-byte slot"
            )
        superblocks.append(
            Superblock(
                store_uuid=store_uuid,
                member_index=index,
                member_count=len(capacities),
                extent_bytes=extent_bytes,
                slot_count=slot_count,
                extent_area_offset=extent_area,
                journal_offset=journal_offset,
                journal_bytes=journal_bytes if index == 0 else 0,
                checkpoint_offsets=checkpoints,
                checkpoint_bytes=checkpoint_bytes if index == 0 else 0,
                capacity_bytes=capacity,
                format_time_ns=now_ns,
                superblock_b_offset=superblock_b,
            )
        )
    return superblocks


def existing_contents(device: Device) -> list[str]:
    """What the target holds that format would destroy."""
    found = blkid_signatures(device.path)
    block = aligned_array(BLOCK_BYTES)
    with Ring([device]) as ring:
        ios = Ring.batch(1)
        ios[0] = (0, block.ctypes.data, BLOCK_BYTES, UNREGISTERED_BUFFER, 0, Op.READ)
        ring.run(ios)
    store = ctxkv_signature(block.tobytes())
    if store:
        found.append(store)
    return found


def write_fresh_store(devices: Sequence[Device], superblocks: Sequence[Superblock]) -> None:
    """Writes both superblocks of every member, an empty checkpoint in slot 0 and a zeroed
    slot 1 (so no checkpoint of an earlier store can win), then flushes."""
    first = superblocks[0]
    empty = CheckpointHeader(
        generation=1,
        journal_sequence=1,
        next_sequence=1,
        entry_count=0,
        entries_crc32c=0,
        log_heads=tuple(0 for _ in superblocks),
    )
    buffer = aligned_array(2 * BLOCK_BYTES)
    buffer[:BLOCK_BYTES] = np.frombuffer(empty.pack(), np.uint8)
    # buffer[BLOCK_BYTES : 2 * BLOCK_BYTES] stays zero for checkpoint slot 1.
    with Ring(list(devices)) as ring:
        writes = []
        for member, superblock in enumerate(superblocks):
            packed = aligned_array(BLOCK_BYTES)
            packed[:] = np.frombuffer(superblock.pack(), np.uint8)
            # writes keeps every array alive until the run has completed
            writes.append((0, packed, member))
            writes.append((superblock.superblock_b_offset, packed, member))
        ios = Ring.batch(len(writes) + 2)
        for i, (offset, array, member) in enumerate(writes):
            ios[i] = (offset, array.ctypes.data, BLOCK_BYTES, UNREGISTERED_BUFFER, member, Op.WRITE)
        ios[len(writes)] = (first.checkpoint_offsets[0], buffer.ctypes.data, BLOCK_BYTES,
                            UNREGISTERED_BUFFER, 0, Op.WRITE)  # fmt: skip
        ios[len(writes) + 1] = (first.checkpoint_offsets[1], buffer.ctypes.data + BLOCK_BYTES,
                                BLOCK_BYTES, UNREGISTERED_BUFFER, 0, Op.WRITE)  # fmt: skip
        ring.run(ios, depth=len(ios))
        flushes = Ring.batch(len(devices))
        for member in range(len(devices)):
            flushes[member] = (0, 0, 0, UNREGISTERED_BUFFER, member, Op.FSYNC)
        ring.run(flushes, depth=len(devices))
