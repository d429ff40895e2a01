"""ctxkv scrub names every damaged structure with its location and exits non-zero;
--rebuild-index recovers a store whose checkpoints are both gone."""

import json
import subprocess
import sys

import pytest

from engine.index import key_digest
from engine.store.layout import EXTENT_HEADER_BYTES
from engine.store.store import Store

MIB = 1 << 20
EXTENT = 64 << 10
CTXKV = [sys.executable, "-m", "engine.cli.main"]


def ctxkv(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CTXKV, *arguments], capture_output=True, text=True, check=False)


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x5A]))


@pytest.fixture
def store_with_values(loop_device):
    device = loop_device(size_bytes=64 * MIB)
    with Store.format([device], extent_size=EXTENT) as store:
        for i in range(20):
            store.put(f"key-{i}".encode(), bytes([i]) * (1000 + i * 5000))
        locations = {
            i: store._slot_offset(store._state.locate(key_digest(f"key-{i}".encode())).parts[0])
            for i in range(20)
        }
        checkpoint_offsets = store._superblocks[0].checkpoint_offsets
    return device, locations, checkpoint_offsets


def test_clean_store_scrubs_ok(store_with_values):
    device, _, _ = store_with_values
    completed = ctxkv("scrub", "--json", device)
    report = json.loads(completed.stdout)
    assert completed.returncode == 0 and report["ok"]
    assert report["values_checked"] == 20 and report["extents_checked"] >= 20


def test_flipped_extent_byte_is_named_and_never_served(store_with_values):
    device, locations, _ = store_with_values
    flip_byte(device, locations[7] + EXTENT_HEADER_BYTES + 10)
    completed = ctxkv("scrub", "--json", device)
    assert completed.returncode == 1
    [problem] = json.loads(completed.stdout)["problems"]
    assert problem["offset"] == locations[7]
    assert problem["key_digest"] == key_digest(b"key-7").hex()
    assert "crc32c" in problem["problem"]
    with Store.open([device]) as store:
        assert store.get(b"key-7") is None
        assert store.get(b"key-8") == bytes([8]) * (1000 + 8 * 5000)


def test_damaged_superblock_copy_is_reported_and_the_store_opens(store_with_values):
    device, _, _ = store_with_values
    flip_byte(device, 100)  # inside superblock A
    completed = ctxkv("scrub", device)
    assert completed.returncode == 1
    assert "DAMAGE superblock A" in completed.stdout
    with Store.open([device]) as store:
        assert store.get(b"key-3") == bytes([3]) * 16000


def test_both_checkpoints_lost_then_rebuild_index(store_with_values, tool):
    device, _, checkpoint_offsets = store_with_values
    for offset in checkpoint_offsets:
        flip_byte(device, offset + 20)
    completed = ctxkv("scrub", device)
    assert completed.returncode == 1 and "no valid checkpoint" in completed.stdout
    completed = ctxkv("scrub", "--rebuild-index", device)
    assert "rebuilt the index from extent headers: 20 values" in completed.stdout
    # The checkpoint slot it did not rewrite is still damaged, and scrub says so.
    assert completed.returncode == 1 and "checkpoint slot" in completed.stdout
    with Store.open([device]) as store:
        for i in range(20):
            assert store.get(f"key-{i}".encode()) == bytes([i]) * (1000 + i * 5000)
