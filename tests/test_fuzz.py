"""Fuzzing every on-disk parser and the wire protocol (hypothesis).

Raw random bytes only test the magic and checksum checks, so most cases here build
blocks whose checksum is right and whose fields are hostile: a checksum proves the bytes
are as written, not that they make sense. Each parser must answer with its own error
(LayoutError, ProtocolError) or with a value that packs back to the same bytes; nothing
else may escape, and a running server must stay up and answer a well-formed client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.client.client import Client
from engine.server.protocol import (
    COUNT,
    FRAME_MAGIC,
    HEADER,
    HELLO,
    KEY_LENGTH,
    Header,
    ProtocolError,
    pack_keys,
    unpack_keys,
)
from engine.server.server import Server
from engine.store.checkpoint import entries_problem
from engine.store.layout import (
    BLOCK_BYTES,
    CHECKPOINT_ENTRY_DTYPE,
    CHECKPOINT_HEADER,
    CHECKPOINT_MAGIC,
    JOURNAL_BLOCK_HEADER,
    JOURNAL_MAGIC,
    JOURNAL_PAYLOAD_BYTES,
    CheckpointHeader,
    ExtentHeader,
    JournalBlock,
    LayoutError,
    Record,
    Superblock,
    crc32c,
    seal_block,
)
from engine.store.state import StoreState
from engine.store.store import Store

# `make test` runs the default; `make test-crash` many more (CTXKV_FUZZ_EXAMPLES).
EXAMPLES = int(os.environ.get("CTXKV_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U64 = st.integers(0, (1 << 64) - 1)
SMALL = st.integers(0, 1 << 40)
TAG = b"T" * 8


def sealed(magic: bytes, fields: struct.Struct, values: tuple, tail: bytes = b"") -> bytes:
    block = bytearray(BLOCK_BYTES)
    fields.pack_into(block, 0, magic, *values)
    block[fields.size : fields.size + len(tail)] = tail[: BLOCK_BYTES - fields.size]
    return seal_block(block)


@FUZZ
@given(
    st.sampled_from([b"", Superblock.MAGIC, ExtentHeader.MAGIC, CHECKPOINT_MAGIC, JOURNAL_MAGIC]),
    st.binary(max_size=512),
)
def test_random_blocks_are_refused_by_every_parser(magic, data):
    block = (magic + data).ljust(BLOCK_BYTES, b"\0")
    for parse in (Superblock.unpack, ExtentHeader.unpack, CheckpointHeader.unpack):
        with pytest.raises(LayoutError):
            parse(block)
    assert JournalBlock.unpack(block, TAG) is None


@FUZZ
@given(
    version=st.sampled_from([1, 1, 1, 2, 0]),
    member=st.tuples(st.integers(0, 300), st.integers(0, 300)),
    geometry=st.lists(st.one_of(SMALL, U64, st.sampled_from([0, 4096, 1 << 16, 1 << 20])),
                      min_size=12, max_size=12),
)  # fmt: skip
def test_sealed_superblocks_with_hostile_fields(version, member, geometry):
    values = (version, 0, uuid.uuid4().bytes, *member, *geometry)
    block = sealed(Superblock.MAGIC, Superblock.STRUCT, values)
    try:
        superblock = Superblock.unpack(block)
    except LayoutError:
        return
    assert superblock.geometry_problem() is None
    assert superblock.pack() == block
    assert superblock.extent_area_offset + superblock.slot_count * superblock.slot_bytes <= (
        superblock.superblock_b_offset
    )


@FUZZ
@given(
    fields=st.tuples(U64, U64, st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1),
                     st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
                     st.integers(0, 0xFFFF)),
    key=st.binary(max_size=1100),
)  # fmt: skip
def test_sealed_extent_headers_with_hostile_fields(fields, key):
    sequence, value_bytes, payload_bytes, crc, part_index, part_count, key_bytes, flags = fields
    values = (1, 0, uuid.uuid4().bytes, sequence, value_bytes, payload_bytes, crc, part_index,
              part_count, key_bytes, flags, b"d" * 16, key[:1024])  # fmt: skip
    block = sealed(ExtentHeader.MAGIC, ExtentHeader.STRUCT, values)
    try:
        header = ExtentHeader.unpack(block)
    except LayoutError:
        return
    assert 0 < len(header.key) <= 1024 and header.part_index < header.part_count


@FUZZ
@given(
    fields=st.tuples(U64, U64, U64, U64, st.integers(0, (1 << 32) - 1), st.integers(0, 300)),
    heads=st.lists(U64, max_size=300),
)
def test_sealed_checkpoint_headers_with_hostile_fields(fields, heads):
    generation, journal_sequence, next_sequence, entry_count, entries_crc, members = fields
    tail = b"".join(struct.pack("<Q", head) for head in heads)
    values = (1, 0, generation, journal_sequence, next_sequence, entry_count, entries_crc, members)
    block = sealed(CHECKPOINT_MAGIC, CHECKPOINT_HEADER, values, tail)
    try:
        header = CheckpointHeader.unpack(block)
    except LayoutError:
        return
    assert len(header.log_heads) == members
    assert CheckpointHeader.unpack(header.pack()) == header


@FUZZ
@given(count=st.integers(0, 0xFFFF), used=st.integers(0, 0xFFFF), payload=st.binary(max_size=600))
def test_sealed_journal_blocks_with_hostile_records(count, used, payload):
    block = bytearray(BLOCK_BYTES)
    JOURNAL_BLOCK_HEADER.pack_into(block, 0, JOURNAL_MAGIC, 0, count, used, 9, TAG, 3)
    block[JOURNAL_BLOCK_HEADER.size : JOURNAL_BLOCK_HEADER.size + len(payload)] = payload
    struct.pack_into("<I", block, 8, crc32c(block))
    parsed = JournalBlock.unpack(bytes(block), TAG)
    if parsed is None:
        return
    assert used <= JOURNAL_PAYLOAD_BYTES and len(parsed.records) == count
    repacked = b"".join(record.pack() for record in parsed.records)
    assert bytes(block[JOURNAL_BLOCK_HEADER.size : JOURNAL_BLOCK_HEADER.size + len(repacked)]) == (
        repacked
    )


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(1, 3), st.integers(0, 3), st.integers(0, 4),
                  st.integers(0, 3), st.integers(0, 4), st.integers(0, 10**6)),
        max_size=12,
    )
)  # fmt: skip
def test_checkpoint_entries_either_refused_or_loaded_consistently(rows):
    slot_counts = np.array([6, 6], dtype=np.uint64)
    entries = np.zeros(len(rows), CHECKPOINT_ENTRY_DTYPE)
    for i, (key, sequence, slot, member, part_index, part_count, value_bytes) in enumerate(rows):
        entries[i]["digest"] = np.void(bytes([key]) * 16)
        entries[i]["sequence"] = sequence
        entries[i]["slot"] = slot
        entries[i]["member"] = member
        entries[i]["part_index"] = part_index
        entries[i]["part_count"] = part_count
        entries[i]["value_bytes"] = value_bytes
    if entries_problem(entries, slot_counts) is not None:
        return
    state = StoreState([6, 6], [0, 0])
    try:
        state.load_checkpoint_entries(entries)
    except ValueError as error:
        assert "inconsistent parts" in str(error)
        return
    finally:
        reloaded = state.checkpoint_entries() if len(state.index) else None
        state.close()
    assert reloaded is not None or len(entries) == 0
    if reloaded is not None:
        key = ["member", "slot", "digest", "sequence", "part_index", "part_count"]
        assert sorted(reloaded[key].tolist()) == sorted(entries[key].tolist())


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 7), st.binary(min_size=16, max_size=16), U64, U64,
                          st.lists(st.tuples(st.integers(0, 4), st.integers(0, 20)),
                                   min_size=1, max_size=3)), max_size=8))  # fmt: skip
def test_replayed_records_outside_the_store_are_refused_precisely(records):
    state = StoreState([6, 6], [0, 0])
    try:
        for kind, digest, sequence, value_bytes, parts in records:
            kind = kind % 5 + 1
            parts = tuple(parts) if kind == 1 else (tuple(parts[:1]) if kind == 5 else ())
            try:
                Record(kind, digest, sequence, value_bytes % (1 << 40), parts).pack()
            except AssertionError:
                continue
            record = Record(kind, digest, sequence, value_bytes % (1 << 40), parts)
            outside = any(member >= 2 or slot >= 6 for member, slot in parts)
            zero = digest == bytes(16)
            try:
                state.apply_record(record)
            except LayoutError as error:
                assert ("outside the store" in str(error) and outside) or (
                    "all-zero key digest" in str(error) and zero
                )
                continue
            assert not outside and not zero
    finally:
        state.close()


# ---- the wire protocol -------------------------------------------------------------------


@FUZZ
@given(st.binary(min_size=HEADER.size, max_size=HEADER.size), st.integers(0, 1 << 30))
def test_frame_headers_parse_or_refuse(data, limit):
    try:
        header = Header.unpack(data, limit)
    except ProtocolError:
        return
    assert header.body_bytes <= limit and header.pack() == data


@FUZZ
@given(st.binary(max_size=300), st.lists(st.binary(min_size=1, max_size=40), max_size=5))
def test_key_lists_parse_or_refuse(body, keys):
    assert unpack_keys(pack_keys(keys), 16) == keys
    try:
        parsed = unpack_keys(body, 16)
    except ProtocolError:
        return
    assert pack_keys(parsed) == body


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """A server in this process over a small file-backed store."""
    target = str(tmp_path_factory.mktemp("fuzz") / "store.img")
    with open(target, "wb") as file:
        file.truncate(64 << 20)
    store = Store.format([target], extent_size=64 << 10)
    server = Server(store, "127.0.0.1", 0, max_value_bytes=1 << 20)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()
    thread = threading.Thread(
        target=lambda: loop.run_until_complete(server.serve(stop, ready=lambda *_: started.set()))
    )
    thread.start()
    assert started.wait(10)
    yield f"127.0.0.1:{server.port}"
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    loop.close()
    store.close()


frame = st.builds(
    lambda opcode, status, request_id, body, lie: (
        struct.pack(
            "<IBBHQII", FRAME_MAGIC, opcode, 0, status, request_id, max(0, len(body) + lie), 0
        )
        + body
    ),
    st.integers(0, 9),
    st.integers(0, 6),
    U64,
    st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda k, v: KEY_LENGTH.pack(len(k)) + k + v,
            st.binary(min_size=1, max_size=8),
            st.binary(max_size=64),
        ),
        st.builds(
            lambda n, rest: COUNT.pack(n) + rest,
            st.integers(0, 1 << 32 - 1),
            st.binary(max_size=32),
        ),
    ),
    st.sampled_from([0, 0, 0, -1, 1, 1000]),
)


@settings(
    max_examples=EXAMPLES // 2 + 1,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(frames=st.lists(st.one_of(frame, st.binary(max_size=80)), min_size=1, max_size=4))
def test_the_server_survives_generated_frame_sequences(live_server, frames):
    host, port = live_server.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.settimeout(0.2)
        hello = connection.recv(HELLO.size, socket.MSG_WAITALL)
        assert len(hello) == HELLO.size
        connection.sendall(HELLO.pack(b"CTXKV\x00P\x01", 1, 0, bytes(32)))
        for data in frames:
            try:
                connection.sendall(data)
                connection.recv(65536)
            except (TimeoutError, ConnectionError):
                pass  # no answer yet (a body is still owed) or the server hung up
    with Client(live_server, timeout=10) as client:  # and a good client is served
        client.put(b"still-up", b"yes")
        assert client.get(b"still-up") == b"yes"
