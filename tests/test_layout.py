"""Golden bytes of every on-disk struct (docs/format.md). If one of these fails, the
format changed: bump FORMAT_VERSION and the document, then re-pin."""

import hashlib
import uuid

import pytest

from engine.store.layout import (
    BLOCK_BYTES,
    RECORD_DELETE,
    RECORD_EVICT,
    RECORD_PIN,
    RECORD_PUT,
    CheckpointHeader,
    ExtentHeader,
    LayoutError,
    Record,
    Superblock,
    pack_journal_block,
    store_tag,
    unpack_journal_block,
)

U = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
SUPERBLOCK = Superblock(U, 1, 2, 4 << 20, 100, 1 << 20, 0, 0, (0, 0), 0, 512 << 20,
                        1_700_000_000_000_000_000, (512 << 20) - 4096)  # fmt: skip
EXTENT = ExtentHeader(U, 42, 5000, 5000, 0xDEADBEEF, 0, 1, bytes(range(16)), b"ctxkv-key")
RECORDS = [
    Record(RECORD_PUT, bytes(range(16)), 42, 5000, ((0, 3), (1, 9))),
    Record(RECORD_DELETE, bytes(16), 43),
]
CHECKPOINT = CheckpointHeader(3, 100, 44, 2, 0x12345678, (5, 6))

GOLDEN = {
    "superblock": (
        "4354584b5653555001000000816b003200112233445566778899aabbccddeeff01000000020000000000400000000000",
        "7426ad956fd5870e",
    ),
    "extent": (
        "4354584b5645585401000000d542e3c200112233445566778899aabbccddeeff2a000000000000008813000000000000",
        "d90577f4140c4712",
    ),
    "journal": (
        "4354584b564a4e4c26f40412020050000700000000000000001122334455667705000000000000000100300000010203",
        "6a51aec6ff5fc17e",
    ),
    "checkpoint": (
        "4354584b56434b5001000000081f7ecc030000000000000064000000000000002c000000000000000200000000000000",
        "f4cc6af3c9382ec5",
    ),
}


def packed() -> dict[str, bytes]:
    return {
        "superblock": SUPERBLOCK.pack(),
        "extent": EXTENT.pack(),
        "journal": pack_journal_block(7, store_tag(U), [r.pack() for r in RECORDS], 5),
        "checkpoint": CHECKPOINT.pack(),
    }


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_bytes(name):
    block = packed()[name]
    head, digest = GOLDEN[name]
    assert len(block) == BLOCK_BYTES
    assert block[:48].hex() == head
    assert hashlib.sha256(block).hexdigest()[:16] == digest


def test_round_trips():
    blocks = packed()
    assert Superblock.unpack(blocks["superblock"]) == SUPERBLOCK
    assert ExtentHeader.unpack(blocks["extent"]) == EXTENT
    assert CheckpointHeader.unpack(blocks["checkpoint"]) == CHECKPOINT
    assert unpack_journal_block(blocks["journal"], 7, store_tag(U)) == RECORDS
    evict = Record(RECORD_EVICT, b"e" * 16, 9, parts=((3, 77),))
    pin = Record(RECORD_PIN, b"p" * 16, 10)
    block = pack_journal_block(1, store_tag(U), [evict.pack(), pin.pack()], 1)
    assert unpack_journal_block(block, 1, store_tag(U)) == [evict, pin]


@pytest.mark.parametrize("name", ["superblock", "extent", "checkpoint"])
def test_any_flipped_bit_is_detected(name):
    kind = {"superblock": Superblock, "extent": ExtentHeader, "checkpoint": CheckpointHeader}[name]
    block = bytearray(packed()[name])
    for offset in (0, 13, 40, 100, 4095):
        damaged = bytearray(block)
        damaged[offset] ^= 0x01
        with pytest.raises(LayoutError):
            kind.unpack(bytes(damaged))


def test_journal_block_stops_replay_when_torn_stale_or_foreign():
    block = packed()["journal"]
    assert unpack_journal_block(block, 8, store_tag(U)) is None  # stale: wrong sequence
    assert unpack_journal_block(block, 7, b"\0" * 8) is None  # another store's block
    torn = bytearray(block)
    torn[48:] = bytes(BLOCK_BYTES - 48)  # the sector with the records never landed
    assert unpack_journal_block(bytes(torn), 7, store_tag(U)) is None
    assert unpack_journal_block(bytes(BLOCK_BYTES), 7, store_tag(U)) is None
