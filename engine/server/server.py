"""`ctxkv serve`: one Store shared by many clients over TCP (docs/protocol.md).

asyncio owns the sockets; the store's blocking calls run on a bounded thread pool (the
store is thread-safe, one io_uring per thread). Values travel without a copy in user
space: a PUT's value is received straight into the pool buffers of store.reserve(),
and a GET is sent straight from the pool buffers of store.read().
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor

from engine.server.protocol import (
    COUNT,
    DEFAULT_MAX_BATCH_KEYS,
    DEFAULT_MAX_VALUE_BYTES,
    HEADER,
    HELLO,
    HELLO_MAGIC,
    KEY_LENGTH,
    MAX_KEY_BYTES,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    Header,
    Opcode,
    ProtocolError,
    Status,
    proof,
    unpack_key,
    unpack_keys,
)
from engine.store.store import Store, ValueTooLargeError

logger = logging.getLogger("ctxkv.server")
HANDSHAKE_TIMEOUT_S = 10
FLAG_TOKEN_REQUIRED = 1


class PeerClosed(Exception):
    """The client went away mid-frame."""


class BufferCredits:
    """Pool buffers promised to the requests in flight. A request waits here, in the event
    loop, until its buffers are free; it never waits on the pool inside a worker thread,
    where enough such waits would take every worker and leave none to run the commits
    that free buffers."""

    def __init__(self, total: int):
        self.available = total
        self._condition = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, count: int) -> AsyncIterator[None]:
        async with self._condition:
            await self._condition.wait_for(lambda: self.available >= count)
            self.available -= count
        try:
            yield
        finally:
            async with self._condition:
                self.available += count
                self._condition.notify_all()


class Server:
    def __init__(
        self,
        store: Store,
        host: str = "127.0.0.1",
        port: int = 7420,
        *,
        token: bytes | None = None,
        max_connections: int = 256,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        worker_threads: int = 8,
    ):
        self.store = store
        self.host, self.port = host, port
        self.token = token
        self.max_connections = max_connections
        self.max_value_bytes = max_value_bytes
        # The largest body a request may carry: a PUT of the largest value, or a batch of keys.
        self.max_body_bytes = max(
            KEY_LENGTH.size + MAX_KEY_BYTES + max_value_bytes,
            COUNT.size + DEFAULT_MAX_BATCH_KEYS * (KEY_LENGTH.size + MAX_KEY_BYTES),
        )
        self._executor = ThreadPoolExecutor(worker_threads, thread_name_prefix="ctxkv-store")
        self._credits = BufferCredits(store.pool_buffers)
        self._connections: set[asyncio.Task] = set()
        self._listener: socket.socket | None = None
        self.counters = {"connections": 0, "requests": 0, "protocol_errors": 0, "refused": 0}

    # ---- lifecycle -------------------------------------------------------------------------

    async def serve(
        self, stop: asyncio.Event, ready: Callable[[str, int], None] | None = None
    ) -> None:
        """Accepts clients until stop is set, then drains the connections in flight.
        ready(host, port) is called once the socket listens."""
        listener = socket.create_server((self.host, self.port), reuse_port=False, backlog=128)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        logger.info("serving store %s on %s:%d", self.store.store_uuid, self.host, self.port)
        if ready is not None:
            ready(self.host, self.port)
        accepting = asyncio.create_task(self._accept(listener))
        await stop.wait()
        accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accepting
        listener.close()
        if self._connections:
            await asyncio.wait(self._connections, timeout=30)
        for task in self._connections:
            task.cancel()
        self._executor.shutdown(wait=True)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _address = await loop.sock_accept(listener)
            if len(self._connections) >= self.max_connections:
                self.counters["refused"] += 1
                connection.close()
                continue
            connection.setblocking(False)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._serve_connection(connection))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    # ---- one connection --------------------------------------------------------------------

    async def _serve_connection(self, connection: socket.socket) -> None:
        self.counters["connections"] += 1
        try:
            if await asyncio.wait_for(self._handshake(connection), HANDSHAKE_TIMEOUT_S):
                while True:
                    header = Header.unpack(
                        await self._recv(connection, HEADER.size), self.max_body_bytes
                    )
                    self.counters["requests"] += 1
                    await self._dispatch(connection, header)
        except (TimeoutError, PeerClosed, ConnectionError):
            pass
        except ProtocolError as error:
            self.counters["protocol_errors"] += 1
            with contextlib.suppress(OSError):
                await self._respond(connection, 0, Status.BAD_REQUEST, 0, str(error).encode())
        except Exception:
            logger.exception("connection failed")
        finally:
            connection.close()

    async def _handshake(self, connection: socket.socket) -> bool:
        loop = asyncio.get_running_loop()
        nonce = os.urandom(NONCE_BYTES)
        flags = FLAG_TOKEN_REQUIRED if self.token else 0
        await loop.sock_sendall(connection, HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, flags, nonce))
        magic, version, _flags, client_proof = HELLO.unpack(
            await self._recv(connection, HELLO.size)
        )
        if magic != HELLO_MAGIC:
            raise ProtocolError("the client did not say hello")
        if version != PROTOCOL_VERSION:
            message = (
                f"protocol version {version} unsupported, this server speaks {PROTOCOL_VERSION}"
            )
            await self._respond(connection, 0, Status.BAD_REQUEST, 0, message.encode())
            return False
        if self.token and not _equal(client_proof, proof(self.token, nonce)):
            await self._respond(connection, 0, Status.UNAUTHORIZED, 0, b"wrong token")
            return False
        await self._respond(connection, 0, Status.OK, 0)
        return True

    async def _dispatch(self, connection: socket.socket, header: Header) -> None:
        loop = asyncio.get_running_loop()
        store, run = self.store, self._executor
        request_id = header.request_id

        def reply(status: Status, body: bytes = b"") -> Coroutine[None, None, None]:
            return self._respond(connection, header.opcode, status, request_id, body)

        if header.opcode == Opcode.PUT:
            await self._put(connection, header)
            return
        body = await self._recv(connection, header.body_bytes)
        if header.opcode == Opcode.GET:
            await self._get(connection, header, body)
        elif header.opcode in (Opcode.DELETE, Opcode.CONTAINS):
            key = _whole_key(body)
            call = store.delete if header.opcode == Opcode.DELETE else store.__contains__
            present = await loop.run_in_executor(run, call, key)
            if header.opcode == Opcode.CONTAINS:
                await reply(Status.OK, bytes([int(present)]))
            else:
                await reply(Status.OK if present else Status.NOT_FOUND)
        elif header.opcode == Opcode.LONGEST_PREFIX:
            keys = unpack_keys(body, DEFAULT_MAX_BATCH_KEYS)
            count = await loop.run_in_executor(run, store.longest_prefix, keys)
            await reply(Status.OK, COUNT.pack(count))
        elif header.opcode == Opcode.STATS:
            stats = await loop.run_in_executor(run, store.stats)
            await reply(Status.OK, json.dumps({**stats, "server": self.counters}).encode())
        else:
            raise ProtocolError(f"unknown opcode {header.opcode}")

    async def _put(self, connection: socket.socket, header: Header) -> None:
        """PUT: the key, then the value received straight into reserved pool buffers."""
        loop = asyncio.get_running_loop()
        if header.body_bytes < KEY_LENGTH.size:
            raise ProtocolError("PUT body too short")
        (key_bytes,) = KEY_LENGTH.unpack(await self._recv(connection, KEY_LENGTH.size))
        if not 0 < key_bytes <= MAX_KEY_BYTES or KEY_LENGTH.size + key_bytes > header.body_bytes:
            raise ProtocolError(f"bad key length {key_bytes}")
        key = bytes(await self._recv(connection, key_bytes))
        value_bytes = header.body_bytes - KEY_LENGTH.size - key_bytes
        if value_bytes > self.max_value_bytes:
            raise ProtocolError(
                f"value of {value_bytes} bytes exceeds the limit {self.max_value_bytes}"
            )
        try:
            parts = self.store.parts_for(value_bytes)
        except ValueTooLargeError as error:
            await self._discard(connection, value_bytes)
            message = str(error).encode()
            await self._respond(
                connection, Opcode.PUT, Status.TOO_LARGE, header.request_id, message
            )
            return
        async with self._credits.hold(parts):
            lease = await loop.run_in_executor(self._executor, self.store.reserve, value_bytes)
            try:
                for view in lease.views:
                    await self._recv_into(connection, view)
            except BaseException:
                lease.release()
                raise
            try:
                await loop.run_in_executor(self._executor, self.store.commit, key, lease)
                status, message = Status.OK, b""
            except Exception as error:  # the store refused or failed: the client must hear why
                logger.warning("put of %r failed: %s", key, error)
                status, message = Status.SERVER_ERROR, str(error).encode()
        await self._respond(connection, Opcode.PUT, status, header.request_id, message)

    async def _get(self, connection: socket.socket, header: Header, body: bytes) -> None:
        """GET: the value sent straight from the pool buffers it was read into."""
        loop = asyncio.get_running_loop()
        key = _whole_key(body)
        parts = self.store.parts_of(key)
        lease = None
        if parts is not None:
            async with self._credits.hold(parts):
                lease = await loop.run_in_executor(self._executor, self.store.read, key)
                if lease is not None:
                    with lease:
                        head = Header(Opcode.GET, Status.OK, header.request_id, lease.nbytes)
                        await loop.sock_sendall(connection, head.pack())
                        for view in lease.views:
                            await loop.sock_sendall(connection, view)
        if lease is None:
            await self._respond(connection, Opcode.GET, Status.NOT_FOUND, header.request_id)

    # ---- socket plumbing -------------------------------------------------------------------

    async def _respond(
        self, connection: socket.socket, opcode: int, status: Status, request_id: int,
        body: bytes = b"",
    ) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        header = Header(opcode, status, request_id, len(body))
        await loop.sock_sendall(connection, header.pack() + body)

    async def _recv(self, connection: socket.socket, nbytes: int) -> bytes:
        buffer = bytearray(nbytes)
        await self._recv_into(connection, memoryview(buffer))
        return bytes(buffer)

    async def _recv_into(self, connection: socket.socket, view: memoryview) -> None:
        loop = asyncio.get_running_loop()
        received = 0
        while received < len(view):
            count = await loop.sock_recv_into(connection, view[received:])
            if count == 0:
                raise PeerClosed()
            received += count

    async def _discard(self, connection: socket.socket, nbytes: int) -> None:
        scratch = memoryview(bytearray(min(nbytes, 1 << 20)))
        while nbytes:
            chunk = scratch[: min(nbytes, len(scratch))]
            await self._recv_into(connection, chunk)
            nbytes -= len(chunk)


def _whole_key(body: bytes) -> bytes:
    key, end = unpack_key(body)
    if end != len(body):
        raise ProtocolError("trailing bytes after the key")
    return key


def _equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
