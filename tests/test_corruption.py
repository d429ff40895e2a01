"""Bit flips in every on-disk structure: each is detected, named with its location by
`ctxkv scrub`, never served as data, and the store falls back where a second copy or an
older checkpoint exists (issue 5, acceptance 3)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
from fault_device import FaultInjectionTestDevice
from test_scrub import flip_byte

from engine.index import key_digest
from engine.store.layout import BLOCK_BYTES, EXTENT_HEADER_BYTES
from engine.store.recovery import StoreOpenError
from engine.store.store import Store

MIB = 1 << 20
EXTENT = 64 << 10
CTXKV = [sys.executable, "-m", "engine.cli.main"]


def value(i: int) -> bytes:
    return bytes([i % 251]) * (1000 + i * 3000)


def scrub(target: str) -> tuple[int, dict]:
    completed = subprocess.run(
        [*CTXKV, "scrub", "--json", target], capture_output=True, text=True, check=False
    )
    return completed.returncode, json.loads(completed.stdout)


class Crashed:
    """A store left as a crash leaves it: puts journaled, no checkpoint at close."""

    def __init__(self, tmp_path, keys: int = 12, checkpoint_after: tuple[int, ...] = ()):
        self.target = str(tmp_path / "store.img")
        with open(self.target, "wb") as file:
            file.truncate(64 * MIB)
        Store.format([self.target], extent_size=EXTENT).close()
        device = FaultInjectionTestDevice(seed=0)
        store = Store.open([self.target], ring_factory=device.ring_factory)
        superblock = store._superblocks[0]
        self.journal_offset, self.journal_blocks = (
            superblock.journal_offset,
            (superblock.journal_bytes // BLOCK_BYTES),
        )
        self.checkpoint_offsets = superblock.checkpoint_offsets
        self.block_of: dict[int, int] = {}  # key index -> journal block sequence of its PUT
        self.extent_of: dict[int, int] = {}
        for i in range(keys):
            self.block_of[i] = store._journal.next_sequence
            store.put(f"key-{i}".encode(), value(i))
            part = store._state.locate(key_digest(f"key-{i}".encode())).parts[0]
            self.extent_of[i] = store._slot_offset(part)
            if i in checkpoint_after:
                store.checkpoint()
        self.newest_checkpoint_slot = store._checkpoint_slot
        device.crashed = True  # every put is durable; close can write nothing more
        with contextlib.suppress(OSError):
            store.close()
        device.power_loss()

    def journal_block_offset(self, sequence: int) -> int:
        return self.journal_offset + ((sequence - 1) % self.journal_blocks) * BLOCK_BYTES

    def check_values(self, store: Store, missing: set[int] = frozenset()) -> None:
        for i in self.block_of:
            got = store.get(f"key-{i}".encode())
            assert got == (None if i in missing else value(i)), i


@pytest.mark.parametrize("copy", ["A", "B"])
def test_either_superblock_copy_damaged(tmp_path, copy):
    crashed = Crashed(tmp_path)
    offset = 100 if copy == "A" else (64 * MIB - BLOCK_BYTES + 100)
    flip_byte(crashed.target, offset)
    code, report = scrub(crashed.target)
    assert code == 1
    [problem] = report["problems"]
    assert problem["where"] == f"superblock {copy}" and problem["offset"] == offset - 100
    with Store.open([crashed.target]) as store:
        assert [d.where for d in store.damage] == [f"superblock {copy}"]
        crashed.check_values(store)


def test_both_superblock_copies_damaged_is_refused_precisely(tmp_path):
    crashed = Crashed(tmp_path, keys=1)
    flip_byte(crashed.target, 100)
    flip_byte(crashed.target, 64 * MIB - BLOCK_BYTES + 100)
    with pytest.raises(StoreOpenError, match=r"no valid ctxkv superblock \(both copies"):
        Store.open([crashed.target])
    code, report = scrub(crashed.target)
    assert code == 1 and "no valid ctxkv superblock" in report["problems"][0]["problem"]


def test_damaged_journal_block_is_named_and_the_rest_replays(tmp_path):
    crashed = Crashed(tmp_path)
    damaged_key = 5
    sequence = crashed.block_of[damaged_key]
    offset = crashed.journal_block_offset(sequence)
    flip_byte(crashed.target, offset + 60)  # inside the PUT record of key-5
    code, report = scrub(crashed.target)
    assert code == 1
    [problem] = report["problems"]
    assert problem["where"] == f"journal block {sequence}" and problem["offset"] == offset
    # scrub opened the store, which replayed past the block and checkpointed: the loss is
    # reported once, by whichever open meets the block first, and the store goes on.
    with Store.open([crashed.target]) as store:
        assert store.damage == []
        # Only the puts recorded in that block are gone; later blocks still replayed.
        crashed.check_values(store, missing={damaged_key})


def test_damaged_journal_block_is_reported_by_the_open_that_meets_it(tmp_path):
    crashed = Crashed(tmp_path)
    sequence = crashed.block_of[8]
    offset = crashed.journal_block_offset(sequence)
    flip_byte(crashed.target, offset + 60)
    with Store.open([crashed.target]) as store:
        [damage] = store.damage
        assert damage.where == f"journal block {sequence}" and damage.offset == offset
        assert store.stats()["damage"] == [str(damage)]
        crashed.check_values(store, missing={8})


def test_a_torn_journal_tail_is_not_damage(tmp_path):
    crashed = Crashed(tmp_path)
    last = crashed.block_of[11]
    flip_byte(crashed.target, crashed.journal_block_offset(last) + 60)
    with Store.open([crashed.target]) as store:
        assert store.damage == []  # nothing after it: a put that never returned
        crashed.check_values(store, missing={11})


@pytest.mark.parametrize("which", ["newest", "older"])
def test_damaged_checkpoint_slot_falls_back_or_is_ignored(tmp_path, which):
    crashed = Crashed(tmp_path, checkpoint_after=(3, 7))
    newest = crashed.newest_checkpoint_slot
    slot = newest if which == "newest" else 1 - newest
    offset = crashed.checkpoint_offsets[slot]
    flip_byte(crashed.target, offset + 20)
    with Store.open([crashed.target]) as store:
        assert [d.where for d in store.damage] == [f"checkpoint slot {slot}"]
        crashed.check_values(store)  # the older checkpoint plus a longer replay: all there
    code, report = scrub(crashed.target)
    # The open above wrote a fresh checkpoint over the damaged slot: scrub finds it whole.
    assert code == 0, report


def test_flipped_extent_is_never_served_and_scrub_names_it(tmp_path):
    crashed = Crashed(tmp_path)
    offset = crashed.extent_of[4]
    flip_byte(crashed.target, offset + EXTENT_HEADER_BYTES + 7)
    code, report = scrub(crashed.target)
    assert code == 1
    [problem] = report["problems"]
    assert problem["offset"] == offset and problem["key_digest"] == key_digest(b"key-4").hex()
    with Store.open([crashed.target]) as store:
        crashed.check_values(store, missing={4})
        assert store.stats()["corrupt_reads"] == 1


def test_flipped_extent_header_is_never_served(tmp_path):
    crashed = Crashed(tmp_path)
    flip_byte(crashed.target, crashed.extent_of[2] + 30)  # in the header, not the payload
    with Store.open([crashed.target]) as store:
        crashed.check_values(store, missing={2})
