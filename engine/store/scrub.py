"""Scrub: check every copy of every structure of a store and every live extent, and
report each problem with its location. Optionally rebuild the index from the extent
headers alone, for a store whose checkpoints are lost (docs/format.md: headers make the
extent area self-describing)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from engine.index import key_digest
from engine.io.buffers import aligned_array
from engine.io.ring import UNREGISTERED_BUFFER, Op, Ring
from engine.journal.journal import highest_sequence
from engine.nvme.device import Device
from engine.store.checkpoint import read_checkpoint, write_checkpoint
from engine.store.layout import (
    BLOCK_BYTES,
    CHECKPOINT_ENTRY_DTYPE,
    EXTENT_HEADER_BYTES,
    ExtentHeader,
    LayoutError,
    Superblock,
    store_tag,
)
from engine.store.recovery import read_superblocks
from engine.store.store import Store

# Called with (what, done, total) as a long step goes on.
ScrubProgress = Callable[[str, int, int], None]
HEADER_BATCH = 256


@dataclass
class ScrubReport:
    members: list[str]
    problems: list[dict] = field(default_factory=list)
    values_checked: int = 0
    extents_checked: int = 0
    journal_records_replayed: int = 0
    rebuilt_values: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def scrub(
    targets: Sequence[str | os.PathLike],
    *,
    rebuild_index: bool = False,
    on_progress: ScrubProgress | None = None,
) -> ScrubReport:
    report = ScrubReport(members=[os.fspath(t) for t in targets])
    if rebuild_index:
        report.rebuilt_values = rebuild_index_from_extents(targets, on_progress)
    try:
        store = Store.open(targets)
    except (OSError, ValueError) as error:
        report.problems.append({"where": "store", "problem": str(error)})
        return report
    with store:
        for damage in store.damage:
            report.problems.append(asdict(damage))
        report.journal_records_replayed = store.replayed_records
        values, extents, problems = store.verify_all(on_progress)
        report.values_checked, report.extents_checked = values, extents
        report.problems.extend(problems)
    return report


def rebuild_index_from_extents(
    targets: Sequence[str | os.PathLike], on_progress: ScrubProgress | None = None
) -> int:
    """Writes a checkpoint made from a scan of every extent header; returns the number of
    values found. Deleted values whose extents were not reused come back: a scan cannot
    see deletions."""
    with contextlib.ExitStack() as stack:
        devices = [stack.enter_context(Device.open(target)) for target in targets]
        ring = stack.enter_context(Ring(devices))

        def run(ios: np.ndarray) -> np.ndarray:
            return ring.run(ios, depth=64)

        superblocks, _damage = read_superblocks(devices, run)
        first = superblocks[0]
        entries = scan_headers(run, superblocks, on_progress)
        values = choose_newest_complete(entries)
        heads = []
        for member, superblock in enumerate(superblocks):
            mine = values[values["member"] == member]
            newest = mine["slot"][np.argmax(mine["sequence"])] if len(mine) else -1
            heads.append(int(newest + 1) % superblock.slot_count)
        generations, newest_slot = [0], None
        for slot in (0, 1):
            with contextlib.suppress(LayoutError):
                checkpoint = read_checkpoint(run, superblocks, slot)
                if checkpoint is not None:
                    generations.append(checkpoint.header.generation)
                    if checkpoint.header.generation == max(generations):
                        newest_slot = slot
        block_count = first.journal_bytes // BLOCK_BYTES
        last_written = highest_sequence(
            run, offset=first.journal_offset, nbytes=first.journal_bytes,
            tag=store_tag(first.store_uuid),
        )  # fmt: skip
        write_checkpoint(
            run,
            first,
            0 if newest_slot is None else 1 - newest_slot,
            generation=max(generations) + 1,
            journal_sequence=last_written + block_count + 1,
            next_sequence=int(values["sequence"].max()) + 1 if len(values) else 1,
            log_heads=tuple(heads),
            entries=values,
        )
        return len(np.unique(values["digest"])) if len(values) else 0


def scan_headers(
    run: Callable[[np.ndarray], np.ndarray],
    superblocks: Sequence[Superblock],
    on_progress: ScrubProgress | None,
) -> np.ndarray:
    """A checkpoint entry for every slot whose header is valid and of this store."""
    found = []
    buffer = aligned_array(HEADER_BATCH * EXTENT_HEADER_BYTES)
    total = sum(sb.slot_count for sb in superblocks)
    done = 0
    for member, superblock in enumerate(superblocks):
        for start in range(0, superblock.slot_count, HEADER_BATCH):
            slots = range(start, min(start + HEADER_BATCH, superblock.slot_count))
            ios = Ring.batch(len(slots))
            for i, slot in enumerate(slots):
                offset = superblock.extent_area_offset + slot * superblock.slot_bytes
                address = buffer.ctypes.data + i * EXTENT_HEADER_BYTES
                ios[i] = (
                    offset,
                    address,
                    EXTENT_HEADER_BYTES,
                    UNREGISTERED_BUFFER,
                    member,
                    Op.READ,
                )
            run(ios)
            for i, slot in enumerate(slots):
                block = buffer[i * EXTENT_HEADER_BYTES : (i + 1) * EXTENT_HEADER_BYTES].tobytes()
                if block[:8] != ExtentHeader.MAGIC:
                    continue
                try:
                    header = ExtentHeader.unpack(block)
                except LayoutError:
                    continue
                if (
                    header.store_uuid != superblock.store_uuid
                    or key_digest(header.key) != header.key_digest
                ):
                    continue
                found.append((header.key_digest, header.sequence, header.value_bytes, slot, member,
                              header.part_index, header.part_count, 0, 0))  # fmt: skip
            done += len(slots)
            if on_progress:
                on_progress("scanning extent headers", done, total)
    return np.array(found, dtype=CHECKPOINT_ENTRY_DTYPE)


def choose_newest_complete(entries: np.ndarray) -> np.ndarray:
    """Per key, the parts of its newest put that has every part on disk."""
    chosen = []
    by_put: dict[tuple[bytes, int], list] = {}
    for entry in entries:
        by_put.setdefault((entry["digest"].tobytes(), int(entry["sequence"])), []).append(entry)
    newest: dict[bytes, int] = {}
    for (digest, sequence), parts in by_put.items():
        count = int(parts[0]["part_count"])
        indexes = sorted(int(p["part_index"]) for p in parts)
        sizes = {int(p["value_bytes"]) for p in parts}
        if indexes == list(range(count)) and len(sizes) == 1 and sequence > newest.get(digest, -1):
            newest[digest] = sequence
    for digest, sequence in newest.items():
        chosen.extend(sorted(by_put[(digest, sequence)], key=lambda p: int(p["part_index"])))
    return (
        np.array(chosen, dtype=CHECKPOINT_ENTRY_DTYPE)
        if chosen
        else np.zeros(0, CHECKPOINT_ENTRY_DTYPE)
    )
