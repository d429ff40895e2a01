"""The on-disk structs of docs/format.md, packed and unpacked.

Each struct's size is asserted here, next to its definition, and its bytes are pinned
by tests/test_layout.py. Change one and bump FORMAT_VERSION (and docs/format.md).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from engine._native import lib
from engine.errors import CtxkvError

FORMAT_VERSION = 1
BLOCK_BYTES = 4096
EXTENT_HEADER_BYTES = BLOCK_BYTES
MIN_EXTENT_BYTES = 64 << 10
MAX_EXTENT_BYTES = 64 << 20
DEFAULT_EXTENT_BYTES = 4 << 20
MAX_KEY_BYTES = 1024
MAX_MEMBERS = 256
CRC_OFFSET = 12  # every checksummed 4096-byte struct keeps its crc32c at bytes 12..16


class LayoutError(CtxkvError, ValueError):
    """Bytes that do not hold the struct they should: wrong magic, version or checksum."""


def crc32c(data: bytes | bytearray | memoryview) -> int:
    return lib.ctxkv_crc32c(0, bytes(data), len(data))


def seal_block(block: bytearray) -> bytes:
    """Writes the crc32c of a 4096-byte struct into its crc field."""
    assert len(block) == BLOCK_BYTES
    block[CRC_OFFSET : CRC_OFFSET + 4] = b"\0\0\0\0"
    struct.pack_into("<I", block, CRC_OFFSET, crc32c(block))
    return bytes(block)


def check_block(block: bytes | memoryview, magic: bytes, what: str) -> None:
    """Raises LayoutError unless block starts with magic and its crc32c matches."""
    if len(block) != BLOCK_BYTES:
        raise LayoutError(f"{what}: expected {BLOCK_BYTES} bytes, got {len(block)}")
    if bytes(block[:8]) != magic:
        raise LayoutError(f"{what}: bad magic {bytes(block[:8])!r}, expected {magic!r}")
    (stored,) = struct.unpack_from("<I", block, CRC_OFFSET)
    zeroed = bytearray(block)
    zeroed[CRC_OFFSET : CRC_OFFSET + 4] = b"\0\0\0\0"
    computed = crc32c(zeroed)
    if stored != computed:
        raise LayoutError(
            f"{what}: crc32c {stored:#010x} does not match contents ({computed:#010x})"
        )


@dataclass(frozen=True)
class Superblock:
    MAGIC: ClassVar[bytes] = b"CTXKVSUP"
    # magic, version, crc, uuid, member index/count, then twelve u64 fields.
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<8sII16sII12Q")

    store_uuid: uuid.UUID
    member_index: int
    member_count: int
    extent_bytes: int
    slot_count: int
    extent_area_offset: int
    journal_offset: int
    journal_bytes: int
    checkpoint_offsets: tuple[int, int]
    checkpoint_bytes: int
    capacity_bytes: int
    format_time_ns: int
    superblock_b_offset: int

    @property
    def slot_bytes(self) -> int:
        return self.extent_bytes + EXTENT_HEADER_BYTES

    def pack(self) -> bytes:
        block = bytearray(BLOCK_BYTES)
        self.STRUCT.pack_into(
            block, 0, self.MAGIC, FORMAT_VERSION, 0, self.store_uuid.bytes,
            self.member_index, self.member_count, self.extent_bytes, self.slot_bytes,
            self.slot_count, self.extent_area_offset, self.journal_offset, self.journal_bytes,
            self.checkpoint_offsets[0], self.checkpoint_offsets[1], self.checkpoint_bytes,
            self.capacity_bytes, self.format_time_ns, self.superblock_b_offset,
        )  # fmt: skip
        return seal_block(block)

    @classmethod
    def unpack(cls, block: bytes | memoryview, where: str = "superblock") -> Superblock:
        check_block(block, cls.MAGIC, where)
        (_magic, version, _crc, store_uuid, member_index, member_count, extent_bytes,
         slot_bytes, slot_count, extent_area_offset, journal_offset, journal_bytes,
         checkpoint_0, checkpoint_1, checkpoint_bytes, capacity_bytes, format_time_ns,
         superblock_b_offset) = cls.STRUCT.unpack_from(block)  # fmt: skip
        if version != FORMAT_VERSION:
            raise LayoutError(
                f"{where}: format version {version}, this ctxkv reads {FORMAT_VERSION}"
            )
        if slot_bytes != extent_bytes + EXTENT_HEADER_BYTES:
            raise LayoutError(
                f"{where}: slot_bytes {slot_bytes} != extent_bytes + {EXTENT_HEADER_BYTES}"
            )
        superblock = cls(
            uuid.UUID(bytes=store_uuid), member_index, member_count, extent_bytes, slot_count,
            extent_area_offset, journal_offset, journal_bytes, (checkpoint_0, checkpoint_1),
            checkpoint_bytes, capacity_bytes, format_time_ns, superblock_b_offset,
        )  # fmt: skip
        problem = superblock.geometry_problem()
        if problem:
            raise LayoutError(f"{where}: {problem}")
        return superblock

    def geometry_problem(self) -> str | None:
        """What makes this layout impossible (regions overlapping or past the end), if
        anything: a checksum proves the bytes are as written, not that they make sense."""
        extent = self.extent_bytes
        if not MIN_EXTENT_BYTES <= extent <= MAX_EXTENT_BYTES or extent & (extent - 1):
            return f"extent size {extent} is not a power of two from 64 KiB to 64 MiB"
        if not 0 <= self.member_index < self.member_count <= MAX_MEMBERS:
            return f"member {self.member_index} of {self.member_count} is out of range"
        if self.superblock_b_offset + BLOCK_BYTES > self.capacity_bytes:
            return f"superblock B at {self.superblock_b_offset} lies past the capacity"
        regions = [(self.extent_area_offset, self.slot_count * self.slot_bytes, "extent area")]
        if self.member_index == 0:
            regions += [
                (self.journal_offset, self.journal_bytes, "journal"),
                (self.checkpoint_offsets[0], self.checkpoint_bytes, "checkpoint slot 0"),
                (self.checkpoint_offsets[1], self.checkpoint_bytes, "checkpoint slot 1"),
            ]
        elif self.journal_bytes or self.checkpoint_bytes:
            return "a member other than 0 claims a journal or checkpoints"
        end = BLOCK_BYTES  # superblock A
        for offset, nbytes, name in sorted(regions):
            if nbytes <= 0 or offset % BLOCK_BYTES or nbytes % BLOCK_BYTES:
                return f"{name} ({nbytes} bytes at {offset}) is empty or not block-aligned"
            if offset < end:
                return f"{name} at {offset} overlaps what lies before it"
            end = offset + nbytes
        if end > self.superblock_b_offset:
            return f"the regions end at {end}, past superblock B at {self.superblock_b_offset}"
        return None


assert Superblock.STRUCT.size == 136, Superblock.STRUCT.size


@dataclass(frozen=True)
class ExtentHeader:
    MAGIC: ClassVar[bytes] = b"CTXKVEXT"
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<8sII16sQQIIHHHH16s1024s")

    store_uuid: uuid.UUID
    sequence: int
    value_bytes: int
    payload_bytes: int
    payload_crc32c: int
    part_index: int
    part_count: int
    key_digest: bytes
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        assert 0 < len(self.key) <= MAX_KEY_BYTES, len(self.key)
        assert len(self.key_digest) == 16
        assert 0 <= self.part_index < self.part_count

    def pack(self) -> bytes:
        block = bytearray(BLOCK_BYTES)
        self.STRUCT.pack_into(
            block, 0, self.MAGIC, FORMAT_VERSION, 0, self.store_uuid.bytes, self.sequence,
            self.value_bytes, self.payload_bytes, self.payload_crc32c, self.part_index,
            self.part_count, len(self.key), 0, self.key_digest, self.key,
        )  # fmt: skip
        return seal_block(block)

    @classmethod
    def unpack(cls, block: bytes | memoryview, where: str = "extent header") -> ExtentHeader:
        check_block(block, cls.MAGIC, where)
        (_magic, version, _crc, store_uuid, sequence, value_bytes, payload_bytes,
         payload_crc32c, part_index, part_count, key_bytes, _flags, key_digest,
         key) = cls.STRUCT.unpack_from(block)  # fmt: skip
        if version != FORMAT_VERSION:
            raise LayoutError(
                f"{where}: format version {version}, this ctxkv reads {FORMAT_VERSION}"
            )
        if not 0 < key_bytes <= MAX_KEY_BYTES or not 0 <= part_index < part_count:
            raise LayoutError(
                f"{where}: key length {key_bytes} or part {part_index}/{part_count} out of range"
            )
        return cls(
            uuid.UUID(bytes=store_uuid), sequence, value_bytes, payload_bytes, payload_crc32c,
            part_index, part_count, key_digest, key[:key_bytes],
        )  # fmt: skip


assert ExtentHeader.STRUCT.size == 1104, ExtentHeader.STRUCT.size
# Where payload_bytes lies: native code reads it to checksum a payload as it lands.
EXTENT_PAYLOAD_BYTES_OFFSET = struct.calcsize("<8sII16sQQ")
assert EXTENT_PAYLOAD_BYTES_OFFSET == 48


# ---- Journal ---------------------------------------------------------------------------

JOURNAL_MAGIC = b"CTXKVJNL"
# magic, crc32c, record_count, used_bytes, block_sequence, store_tag, durable_through
JOURNAL_BLOCK_HEADER = struct.Struct("<8sIHHQ8sQ")
assert JOURNAL_BLOCK_HEADER.size == 40, JOURNAL_BLOCK_HEADER.size
JOURNAL_PAYLOAD_BYTES = BLOCK_BYTES - JOURNAL_BLOCK_HEADER.size
RECORD_HEADER = struct.Struct("<BxH")
assert RECORD_HEADER.size == 4

RECORD_PUT, RECORD_DELETE, RECORD_PIN, RECORD_UNPIN, RECORD_EVICT = 1, 2, 3, 4, 5
_PUT_FIXED = struct.Struct("<16sQQHxx")  # digest, sequence, value_bytes, part_count
_PART = struct.Struct("<HI")  # member, slot
_KEYED = struct.Struct("<16sQ")  # digest, sequence: DELETE, PIN, UNPIN
_EVICT = struct.Struct("<16sQHI")  # digest, sequence, member, slot
assert (_PUT_FIXED.size, _PART.size, _KEYED.size, _EVICT.size) == (36, 6, 24, 30)
MAX_PARTS = (JOURNAL_PAYLOAD_BYTES - RECORD_HEADER.size - _PUT_FIXED.size) // _PART.size


@dataclass(frozen=True)
class Record:
    """One journal record. parts is ((member, slot), ...) for PUT and EVICT, else ()."""

    kind: int
    key_digest: bytes
    sequence: int
    value_bytes: int = 0
    parts: tuple[tuple[int, int], ...] = ()

    def pack(self) -> bytes:
        if self.kind == RECORD_PUT:
            assert 0 < len(self.parts) <= MAX_PARTS, len(self.parts)
            body = _PUT_FIXED.pack(
                self.key_digest, self.sequence, self.value_bytes, len(self.parts)
            )
            body += b"".join(_PART.pack(member, slot) for member, slot in self.parts)
        elif self.kind == RECORD_EVICT:
            ((member, slot),) = self.parts
            body = _EVICT.pack(self.key_digest, self.sequence, member, slot)
        else:
            assert self.kind in (RECORD_DELETE, RECORD_PIN, RECORD_UNPIN), self.kind
            body = _KEYED.pack(self.key_digest, self.sequence)
        return RECORD_HEADER.pack(self.kind, len(body)) + body

    @classmethod
    def unpack_all(cls, payload: bytes | memoryview, count: int, where: str) -> list[Record]:
        records, offset = [], 0
        for _ in range(count):
            if offset + RECORD_HEADER.size > len(payload):
                raise LayoutError(f"{where}: record header past the end of the block")
            kind, body_bytes = RECORD_HEADER.unpack_from(payload, offset)
            offset += RECORD_HEADER.size
            body = bytes(payload[offset : offset + body_bytes])
            if len(body) != body_bytes:
                raise LayoutError(f"{where}: record body past the end of the block")
            offset += body_bytes
            records.append(cls._unpack_body(kind, body, where))
        return records

    @classmethod
    def _unpack_body(cls, kind: int, body: bytes, where: str) -> Record:
        if kind == RECORD_PUT and len(body) >= _PUT_FIXED.size:
            digest, sequence, value_bytes, part_count = _PUT_FIXED.unpack_from(body)
            if len(body) == _PUT_FIXED.size + part_count * _PART.size and part_count > 0:
                parts = tuple(
                    _PART.unpack_from(body, _PUT_FIXED.size + i * _PART.size)
                    for i in range(part_count)
                )
                return cls(kind, digest, sequence, value_bytes, parts)
        elif kind == RECORD_EVICT and len(body) == _EVICT.size:
            digest, sequence, member, slot = _EVICT.unpack(body)
            return cls(kind, digest, sequence, parts=((member, slot),))
        elif kind in (RECORD_DELETE, RECORD_PIN, RECORD_UNPIN) and len(body) == _KEYED.size:
            digest, sequence = _KEYED.unpack(body)
            return cls(kind, digest, sequence)
        raise LayoutError(f"{where}: malformed record of type {kind} ({len(body)} bytes)")


def store_tag(store_uuid: uuid.UUID) -> bytes:
    """What journal blocks carry of the store's identity: blocks of an earlier store
    formatted on the same target never replay into this one."""
    return store_uuid.bytes[:8]


def pack_journal_block(
    block_sequence: int, tag: bytes, records: list[bytes], durable_through: int
) -> bytes:
    """One journal block holding already-packed records (they must fit). Every block
    before durable_through was on stable media when this one was written."""
    payload = b"".join(records)
    assert len(payload) <= JOURNAL_PAYLOAD_BYTES, len(payload)
    assert len(tag) == 8
    assert 0 <= durable_through <= block_sequence, (durable_through, block_sequence)
    block = bytearray(BLOCK_BYTES)
    JOURNAL_BLOCK_HEADER.pack_into(
        block, 0, JOURNAL_MAGIC, 0, len(records), len(payload), block_sequence, tag,
        durable_through,
    )  # fmt: skip
    block[JOURNAL_BLOCK_HEADER.size : JOURNAL_BLOCK_HEADER.size + len(payload)] = payload
    struct.pack_into("<I", block, 8, crc32c(block))
    return bytes(block)


@dataclass(frozen=True)
class JournalBlock:
    block_sequence: int
    durable_through: int
    records: list[Record]

    @classmethod
    def unpack(cls, block: bytes | memoryview, tag: bytes) -> JournalBlock | None:
        """The block if it is an intact block of the store with this tag, whatever its
        sequence; None for torn, garbage, zeroed or another store's blocks."""
        assert len(block) == BLOCK_BYTES
        magic, stored_crc, count, used, sequence, block_tag, durable_through = (
            JOURNAL_BLOCK_HEADER.unpack_from(block)
        )
        if magic != JOURNAL_MAGIC or block_tag != tag:
            return None
        zeroed = bytearray(block)
        zeroed[8:12] = b"\0\0\0\0"
        if crc32c(zeroed) != stored_crc or used > JOURNAL_PAYLOAD_BYTES:
            return None
        payload = memoryview(block)[JOURNAL_BLOCK_HEADER.size : JOURNAL_BLOCK_HEADER.size + used]
        try:
            records = Record.unpack_all(payload, count, f"journal block {sequence}")
        except LayoutError:
            return None  # a checksum collision over garbage: not a block we wrote
        return cls(sequence, durable_through, records)


def unpack_journal_block(
    block: bytes | memoryview, expected_sequence: int, tag: bytes
) -> list[Record] | None:
    """The records of a valid block with the expected sequence; None for a torn, stale or
    never-written block (the end of the journal, or damage: see engine.journal.replay)."""
    parsed = JournalBlock.unpack(block, tag)
    if parsed is None or parsed.block_sequence != expected_sequence:
        return None
    return parsed.records


# ---- Checkpoints -----------------------------------------------------------------------

CHECKPOINT_MAGIC = b"CTXKVCKP"
CHECKPOINT_HEADER = struct.Struct("<8sIIQQQQII")
assert CHECKPOINT_HEADER.size == 56, CHECKPOINT_HEADER.size
LOG_HEAD = struct.Struct("<Q")
assert CHECKPOINT_HEADER.size + MAX_MEMBERS * LOG_HEAD.size <= BLOCK_BYTES

# One live slot; a numpy dtype because checkpoints move millions of them at once.
CHECKPOINT_ENTRY_DTYPE = np.dtype(
    [
        ("digest", "V16"),  # not S16: numpy would strip a digest's trailing NUL bytes
        ("sequence", "<u8"),
        ("value_bytes", "<u8"),
        ("slot", "<u4"),
        ("member", "<u2"),
        ("part_index", "<u2"),
        ("part_count", "<u2"),
        ("flags", "<u2"),
        ("zero", "<u4"),
    ]
)
assert CHECKPOINT_ENTRY_DTYPE.itemsize == 48, CHECKPOINT_ENTRY_DTYPE.itemsize
ENTRY_FLAG_PINNED = 1


@dataclass(frozen=True)
class CheckpointHeader:
    generation: int
    journal_sequence: int
    next_sequence: int
    entry_count: int
    entries_crc32c: int
    log_heads: tuple[int, ...]

    def pack(self) -> bytes:
        block = bytearray(BLOCK_BYTES)
        CHECKPOINT_HEADER.pack_into(
            block, 0, CHECKPOINT_MAGIC, FORMAT_VERSION, 0, self.generation, self.journal_sequence,
            self.next_sequence, self.entry_count, self.entries_crc32c, len(self.log_heads),
        )  # fmt: skip
        for i, head in enumerate(self.log_heads):
            LOG_HEAD.pack_into(block, CHECKPOINT_HEADER.size + i * LOG_HEAD.size, head)
        return seal_block(block)

    @classmethod
    def unpack(cls, block: bytes | memoryview, where: str = "checkpoint") -> CheckpointHeader:
        check_block(block, CHECKPOINT_MAGIC, where)
        (_magic, version, _crc, generation, journal_sequence, next_sequence, entry_count,
         entries_crc32c, member_count) = CHECKPOINT_HEADER.unpack_from(block)  # fmt: skip
        if version != FORMAT_VERSION:
            raise LayoutError(
                f"{where}: format version {version}, this ctxkv reads {FORMAT_VERSION}"
            )
        if not 0 < member_count <= MAX_MEMBERS:
            raise LayoutError(f"{where}: member count {member_count} out of range")
        heads = tuple(
            LOG_HEAD.unpack_from(block, CHECKPOINT_HEADER.size + i * LOG_HEAD.size)[0]
            for i in range(member_count)
        )
        return cls(generation, journal_sequence, next_sequence, entry_count, entries_crc32c, heads)
