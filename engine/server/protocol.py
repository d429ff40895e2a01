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
