"""The asyncio twin of engine.client.client.Client: the same methods, awaited, on one
connection (LMCache's remote connectors are coroutines). Requests on one AsyncClient
are answered in order; concurrent calls are serialised by a lock, so a caller wanting
parallelism opens several clients."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Sequence
from types import TracebackType

from engine.client.client import (
    DEFAULT_TIMEOUT_S,
    FLAG_TOKEN_REQUIRED,
    MAX_RESPONSE_BODY_BYTES,
    AuthenticationError,
    check_response,
    parse_address,
)
from engine.server.protocol import (
    COUNT,
    HEADER,
    HELLO,
    HELLO_MAGIC,
    PROTOCOL_VERSION,
    Header,
    Opcode,
    Status,
    pack_key,
    pack_keys,
    proof,
)


class AsyncClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self._reader, self._writer, self._timeout = reader, writer, timeout
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls, address: str, *, token: str | bytes | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> AsyncClient:
        host, port = parse_address(address)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        client = cls(reader, writer, timeout)
        try:
            await client._hello(token.encode() if isinstance(token, str) else token)
        except BaseException:
            await client.close()
            raise
        return client

    async def _hello(self, token: bytes | None) -> None:
        magic, _version, flags, nonce = HELLO.unpack(await self._read(HELLO.size))
        if magic != HELLO_MAGIC:
            raise ConnectionError("the peer is not a ctxkv server")
        if flags & FLAG_TOKEN_REQUIRED and not token:
            raise AuthenticationError("the server requires a token")
        answer = proof(token, nonce) if token else bytes(32)
        self._writer.write(HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, answer))
        header, body = await self._response()
        if header.status == Status.UNAUTHORIZED:
            raise AuthenticationError(f"the server refused the token: {body.decode()}")
        check_response(header, body)

    async def put(self, key: bytes, value: bytes | bytearray | memoryview) -> None:
        view = memoryview(value).cast("B")
        head = pack_key(key)
        async with self._lock:
            header = Header(Opcode.PUT, 0, next(self._ids), len(head) + len(view))
            self._writer.write(header.pack() + head)
            self._writer.write(view)
            check_response(*await self._response())

    async def get(self, key: bytes) -> bytes | None:
        header, body = await self._request(Opcode.GET, pack_key(key))
        return None if header.status == Status.NOT_FOUND else body

    async def delete(self, key: bytes) -> bool:
        header, _body = await self._request(Opcode.DELETE, pack_key(key))
        return header.status == Status.OK

    async def contains(self, key: bytes) -> bool:
        _header, body = await self._request(Opcode.CONTAINS, pack_key(key))
        return body == b"\x01"

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            await self.put(key, value)

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [await self.get(key) for key in keys]

    async def longest_prefix(self, keys: Sequence[bytes]) -> int:
        _header, body = await self._request(Opcode.LONGEST_PREFIX, pack_keys(list(keys)))
        return COUNT.unpack(body)[0]

    async def stats(self) -> dict:
        _header, body = await self._request(Opcode.STATS, b"")
        return json.loads(body)

    async def close(self) -> None:
        self._writer.close()
        # OSError: the server went first, and nothing is left to close.
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _request(self, opcode: Opcode, body: bytes) -> tuple[Header, bytes]:
        async with self._lock:
            header = Header(opcode, 0, next(self._ids), len(body))
            self._writer.write(header.pack() + body)
            response, response_body = await self._response()
        if response.request_id != header.request_id:
            raise ConnectionError(f"response {response.request_id} to request {header.request_id}")
        if response.status != Status.NOT_FOUND:
            check_response(response, response_body)
        return response, response_body

    async def _response(self) -> tuple[Header, bytes]:
        await asyncio.wait_for(self._writer.drain(), self._timeout)
        header = Header.unpack(await self._read(HEADER.size), MAX_RESPONSE_BODY_BYTES)
        return header, await self._read(header.body_bytes)

    async def _read(self, nbytes: int) -> bytes:
        try:
            return await asyncio.wait_for(self._reader.readexactly(nbytes), self._timeout)
        except asyncio.IncompleteReadError:
            raise ConnectionError("the server closed the connection") from None
