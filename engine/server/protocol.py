"""The wire protocol of `ctxkv serve` (docs/protocol.md): frames and their codecs.

Every frame, either way, is a 24-byte header and a body. Requests carry an id that the
response repeats, so a client may pipeline many requests on one connection.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass

from engine.errors import CtxkvError
from engine.store.layout import MAX_KEY_BYTES

PROTOCOL_VERSION = 1
HELLO_MAGIC = b"CTXKV\x00P\x01"
FRAME_MAGIC = 0x4B56_4B43  # "CKVK" little-endian
HEADER = struct.Struct("<IBBHQII")  # magic, opcode, flags, status, request_id, body_bytes, zero
assert HEADER.size == 24, HEADER.size
HELLO = struct.Struct("<8sHH32s")  # magic, version, flags, nonce (server) or proof (client)
assert HELLO.size == 44, HELLO.size
KEY_LENGTH = struct.Struct("<H")
COUNT = struct.Struct("<I")
U64 = struct.Struct("<Q")  # lease ids, value lengths
GRANT = struct.Struct("<QQII")  # lease_id, value_bytes, timeout_ms, part count
PART = struct.Struct("<QII")  # address, nbytes, payload crc32c (0 in put grants)
CRC = struct.Struct("<I")
NONCE_BYTES = 32

DEFAULT_MAX_VALUE_BYTES = 256 << 20
DEFAULT_MAX_BATCH_KEYS = 4096


class Opcode(enum.IntEnum):
    PUT = 1  # body: key_len u16, key, value
    GET = 2  # body: key_len u16, key            -> value
    DELETE = 3  # body: key_len u16, key
    CONTAINS = 4  # body: key_len u16, key       -> u8 (1 present, 0 absent)
    LONGEST_PREFIX = 5  # body: count u32, then (key_len u16, key) x count -> u32
    STATS = 6  # body: empty                   -> JSON object, UTF-8
    # NIXL data path (docs/protocol.md, "NIXL"): 16 and up, clear of the TCP opcodes.
    NIXL_CONNECT = 16  # body: empty                -> the server agent's NIXL metadata
    NIXL_GET_LEASE = 17  # body: key_len u16, key   -> LeaseGrant (the value in pool buffers)
    NIXL_PUT_LEASE = 18  # body: value_bytes u64    -> LeaseGrant (pool buffers to WRITE)
    NIXL_COMMIT = 19  # body: lease_id u64, count u32, crc32c u32 x count, key_len u16, key
    NIXL_RELEASE = 20  # body: lease_id u64


NIXL_OPCODES = frozenset(
    {Opcode.NIXL_CONNECT, Opcode.NIXL_GET_LEASE, Opcode.NIXL_PUT_LEASE, Opcode.NIXL_COMMIT,
     Opcode.NIXL_RELEASE}
)  # fmt: skip


class Status(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_REQUEST = 2  # the request was malformed: the connection is closed after this
    TOO_LARGE = 3  # a limit was exceeded (named in the body)
    SERVER_ERROR = 4  # the store failed (the message is in the body)
    UNAUTHORIZED = 5


class ProtocolError(CtxkvError, ValueError):
    """Bytes that are not a valid frame: the peer is broken or hostile."""


@dataclass(frozen=True)
class Header:
    opcode: int
    status: int
    request_id: int
    body_bytes: int
    flags: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(FRAME_MAGIC, self.opcode, self.flags, self.status, self.request_id,
                           self.body_bytes, 0)  # fmt: skip

    @classmethod
    def unpack(cls, data: bytes | memoryview, max_body_bytes: int) -> Header:
        magic, opcode, flags, status, request_id, body_bytes, zero = HEADER.unpack(data)
        if magic != FRAME_MAGIC:
            raise ProtocolError(f"bad frame magic {magic:#010x}")
        if zero != 0 or flags != 0:
            raise ProtocolError("reserved header fields are not zero")
        if body_bytes > max_body_bytes:
            raise ProtocolError(
                f"frame body of {body_bytes} bytes exceeds the limit {max_body_bytes}"
            )
        return cls(opcode, status, request_id, body_bytes, flags)


def proof(token: bytes, nonce: bytes) -> bytes:
    """What a client sends to show it knows the token without sending it."""
    return hmac.new(token, b"ctxkv-hello" + nonce, hashlib.sha256).digest()


def pack_key(key: bytes) -> bytes:
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"keys are 1..{MAX_KEY_BYTES} bytes, got {len(key)}")
    return KEY_LENGTH.pack(len(key)) + key


def unpack_key(body: bytes | memoryview, offset: int = 0) -> tuple[bytes, int]:
    """(key, offset after it); ProtocolError when the body is too short or the length bad."""
    if offset + KEY_LENGTH.size > len(body):
        raise ProtocolError("body too short for a key length")
    (length,) = KEY_LENGTH.unpack_from(body, offset)
    start = offset + KEY_LENGTH.size
    if not 0 < length <= MAX_KEY_BYTES or start + length > len(body):
        raise ProtocolError(f"bad key length {length}")
    return bytes(body[start : start + length]), start + length


def pack_keys(keys: list[bytes]) -> bytes:
    return COUNT.pack(len(keys)) + b"".join(pack_key(key) for key in keys)


def unpack_keys(body: bytes | memoryview, max_keys: int) -> list[bytes]:
    if len(body) < COUNT.size:
        raise ProtocolError("body too short for a key count")
    (count,) = COUNT.unpack_from(body)
    if count > max_keys:
        raise ProtocolError(f"{count} keys in one request exceed the limit {max_keys}")
    keys, offset = [], COUNT.size
    for _ in range(count):
        key, offset = unpack_key(body, offset)
        keys.append(key)
    if offset != len(body):
        raise ProtocolError("trailing bytes after the keys")
    return keys


@dataclass(frozen=True)
class LeasePart:
    """One pool buffer's payload, as a NIXL peer addresses it in the server's memory."""

    address: int
    nbytes: int
    crc32c: int = 0


@dataclass(frozen=True)
class LeaseGrant:
    """The answer to NIXL_GET_LEASE / NIXL_PUT_LEASE: where the value lies (or goes) in
    the server's pool, and for how long the buffers are the client's."""

    lease_id: int
    value_bytes: int
    timeout_ms: int
    parts: tuple[LeasePart, ...]

    def pack(self) -> bytes:
        head = GRANT.pack(self.lease_id, self.value_bytes, self.timeout_ms, len(self.parts))
        return head + b"".join(PART.pack(p.address, p.nbytes, p.crc32c) for p in self.parts)

    @classmethod
    def unpack(cls, body: bytes) -> LeaseGrant:
        if len(body) < GRANT.size:
            raise ProtocolError("lease grant too short")
        lease_id, value_bytes, timeout_ms, count = GRANT.unpack_from(body)
        if len(body) != GRANT.size + count * PART.size:
            raise ProtocolError(f"lease grant of {len(body)} bytes does not hold {count} parts")
        parts = tuple(
            LeasePart(*PART.unpack_from(body, GRANT.size + i * PART.size)) for i in range(count)
        )
        if sum(part.nbytes for part in parts) != value_bytes:
            raise ProtocolError(f"lease grant parts do not add up to {value_bytes} bytes")
        return cls(lease_id, value_bytes, timeout_ms, parts)


def pack_commit(lease_id: int, crcs: list[int], key: bytes) -> bytes:
    return (
        U64.pack(lease_id) + COUNT.pack(len(crcs))
        + b"".join(CRC.pack(crc) for crc in crcs) + pack_key(key)
    )  # fmt: skip


def unpack_commit(body: bytes | memoryview) -> tuple[int, list[int], bytes]:
    """(lease_id, payload crc32c per part, key) of a NIXL_COMMIT body."""
    if len(body) < U64.size + COUNT.size:
        raise ProtocolError("NIXL_COMMIT body too short")
    (lease_id,) = U64.unpack_from(body)
    (count,) = COUNT.unpack_from(body, U64.size)
    offset = U64.size + COUNT.size
    if offset + count * CRC.size > len(body):
        raise ProtocolError(f"NIXL_COMMIT body too short for {count} checksums")
    crcs = [CRC.unpack_from(body, offset + i * CRC.size)[0] for i in range(count)]
    key, end = unpack_key(body, offset + count * CRC.size)
    if end != len(body):
        raise ProtocolError("trailing bytes after the key")
    return lease_id, crcs, key


def unpack_u64(body: bytes | memoryview, what: str) -> int:
    if len(body) != U64.size:
        raise ProtocolError(f"{what}: body of {len(body)} bytes, wanted {U64.size}")
    return U64.unpack(body)[0]
