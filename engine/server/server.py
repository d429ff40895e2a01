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
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from engine.server.credits import BufferCredits
from engine.server.leases import DEFAULT_LEASE_TIMEOUT_S
from engine.server.metrics import Metrics, serve_metrics
from engine.server.nixl import NixlFrontEnd
from engine.server.protocol import (
    COUNT,
    DEFAULT_MAX_BATCH_KEYS,
    DEFAULT_MAX_VALUE_BYTES,
    HEADER,
    HELLO,
    HELLO_MAGIC,
    KEY_LENGTH,
    MAX_KEY_BYTES,
    NIXL_OPCODES,
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
        nixl: bool = False,
        nixl_lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S,
        nixl_lease_buffers: int | None = None,
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
        self._busy: set[asyncio.Task] = set()  # connections in the middle of a request
        self._listener: socket.socket | None = None
        self.metrics = Metrics()
        # The NIXL data path (engine/server/nixl.py): its agent registers the pool at start.
        self.nixl = nixl
        self._nixl_options = {
            "lease_timeout_s": nixl_lease_timeout_s,
            "max_lease_buffers": nixl_lease_buffers,
        }
        self._nixl: NixlFrontEnd | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def serve(
        self,
        stop: asyncio.Event,
        ready: Callable[[str, int], None] | None = None,
        metrics_address: tuple[str, int] | None = None,
        metrics_ready: Callable[[str, int], None] | None = None,
    ) -> None:
        """Accepts clients until stop is set, then finishes the requests in flight.
        ready(host, port) is called once the socket listens; with metrics_address, /metrics
        is served there too."""
        exporter = None
        if metrics_address is not None:
            exporter = asyncio.create_task(
                serve_metrics(*metrics_address, self.render_metrics, stop, metrics_ready)
            )
        if self.nixl:
            self._nixl = NixlFrontEnd(
                self.store, self._executor, self._credits, max_value_bytes=self.max_value_bytes,
                **self._nixl_options,
            )  # fmt: skip
            logger.info("NIXL agent %s holds the pool's memory", self._nixl.agent.name)
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
        # Idle connections (waiting for a next request) go now; busy ones finish first.
        for task in self._connections - self._busy:
            task.cancel()
        if self._busy:
            await asyncio.wait(set(self._busy), timeout=30)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=5)
        if exporter is not None:
            await exporter
        self._executor.shutdown(wait=True)
        if self._nixl is not None:
            self._nixl.close()  # every lease's buffers back in the pool before it closes

    def render_metrics(self) -> str:
        nixl = None if self._nixl is None else self._nixl.stats()
        return self.metrics.render(
            self.store.stats(), self.store.pool_leased, self.store.pool_buffers, nixl
        )

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _address = await loop.sock_accept(listener)
            if len(self._connections) >= self.max_connections:
                self.metrics.connections_refused += 1
                connection.close()
                continue
            connection.setblocking(False)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._serve_connection(connection))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    # ---- one connection --------------------------------------------------------------------

    async def _serve_connection(self, connection: socket.socket) -> None:
        metrics = self.metrics
        metrics.connections_total += 1
        metrics.connections_active += 1
        task = asyncio.current_task()
        try:
            if await asyncio.wait_for(self._handshake(connection), HANDSHAKE_TIMEOUT_S):
                while True:
                    raw = await self._recv(connection, HEADER.size)
                    self._busy.add(task)
                    header = Header.unpack(raw, self.max_body_bytes)
                    metrics.bytes_received += HEADER.size + header.body_bytes
                    started = time.monotonic()
                    status = await self._dispatch(connection, header)
                    operation = Opcode(header.opcode).name.lower()
                    metrics.observe(operation, status.name.lower(), time.monotonic() - started)
                    self._busy.discard(task)
        except (TimeoutError, PeerClosed, ConnectionError, asyncio.CancelledError):
            pass
        except ProtocolError as error:
            metrics.protocol_errors += 1
            with contextlib.suppress(OSError):
                await self._respond(connection, 0, Status.BAD_REQUEST, 0, str(error).encode())
        except Exception:
            logger.exception("connection failed")
        finally:
            self._busy.discard(task)
            if self._nixl is not None:
                self._nixl.leases.drop_owner(connection)
            metrics.connections_active -= 1
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

    async def _dispatch(self, connection: socket.socket, header: Header) -> Status:
        """Answers one request; returns the status it answered with."""
        loop = asyncio.get_running_loop()
        store, run = self.store, self._executor
        request_id = header.request_id

        async def reply(status: Status, body: bytes = b"") -> Status:
            await self._respond(connection, header.opcode, status, request_id, body)
            return status

        if header.opcode == Opcode.PUT:
            return await self._put(connection, header)
        body = await self._recv(connection, header.body_bytes)
        if header.opcode == Opcode.GET:
            return await self._get(connection, header, body)
        elif header.opcode in NIXL_OPCODES:
            if self._nixl is None:
                raise ProtocolError(
                    f"opcode {header.opcode} is NIXL's, and this server was started without --nixl"
                )
            return await reply(*await self._nixl.handle(header.opcode, body, connection))
        elif header.opcode in (Opcode.DELETE, Opcode.CONTAINS):
            key = _whole_key(body)
            call = store.delete if header.opcode == Opcode.DELETE else store.__contains__
            present = await loop.run_in_executor(run, call, key)
            if header.opcode == Opcode.CONTAINS:
                return await reply(Status.OK, bytes([int(present)]))
            else:
                return await reply(Status.OK if present else Status.NOT_FOUND)
        elif header.opcode == Opcode.LONGEST_PREFIX:
            keys = unpack_keys(body, DEFAULT_MAX_BATCH_KEYS)
            count = await loop.run_in_executor(run, store.longest_prefix, keys)
            return await reply(Status.OK, COUNT.pack(count))
        elif header.opcode == Opcode.STATS:
            stats = await loop.run_in_executor(run, store.stats)
            server = {
                "connections": self.metrics.connections_total,
                "requests": sum(self.metrics.requests.values()),
                "protocol_errors": self.metrics.protocol_errors,
                "refused": self.metrics.connections_refused,
            }
            if self._nixl is not None:
                server["nixl"] = self._nixl.stats()
            return await reply(Status.OK, json.dumps({**stats, "server": server}).encode())
        else:
            raise ProtocolError(f"unknown opcode {header.opcode}")

    async def _put(self, connection: socket.socket, header: Header) -> Status:
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
            return Status.TOO_LARGE
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
        return status

    async def _get(self, connection: socket.socket, header: Header, body: bytes) -> Status:
        """GET: the value sent straight from the pool buffers it was read into."""
        loop = asyncio.get_running_loop()
        key = _whole_key(body)
        # An absent key still goes through store.read, so the store counts the miss.
        parts = self.store.parts_of(key) or 1
        async with self._credits.hold(parts):
            lease = await loop.run_in_executor(self._executor, self.store.read, key)
            if lease is not None:
                with lease:
                    head = Header(Opcode.GET, Status.OK, header.request_id, lease.nbytes)
                    await loop.sock_sendall(connection, head.pack())
                    for view in lease.views:
                        await loop.sock_sendall(connection, view)
                    self.metrics.bytes_sent += HEADER.size + lease.nbytes
                return Status.OK
        await self._respond(connection, Opcode.GET, Status.NOT_FOUND, header.request_id)
        return Status.NOT_FOUND

    # ---- socket plumbing -------------------------------------------------------------------

    async def _respond(
        self, connection: socket.socket, opcode: int, status: Status, request_id: int,
        body: bytes = b"",
    ) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        header = Header(opcode, status, request_id, len(body))
        await loop.sock_sendall(connection, header.pack() + body)
        self.metrics.bytes_sent += HEADER.size + len(body)

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
