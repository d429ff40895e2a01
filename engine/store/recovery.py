"""Opening a store: its members' superblocks (two copies each, either may be damaged),
checked to be one store in member order. Checkpoints are engine.store.checkpoint,
journal replay engine.journal.replay."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import CtxkvError
from engine.io.buffers import aligned_array
from engine.io.ring import UNREGISTERED_BUFFER, Op, Ring
from engine.nvme.device import Device
from engine.store.layout import BLOCK_BYTES, LayoutError, Superblock

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
