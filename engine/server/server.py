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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engine.server.metrics import Metrics, serve_metrics
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
from engine.tenants.config import Tenant

logger = logging.getLogger("ctxkv.server")
HANDSHAKE_TIMEOUT_S = 10
FLAG_TOKEN_REQUIRED = 1


class PeerClosed(Exception):
    """The client went away mid-frame."""


class TenantKeyTooLong(ValueError):
    """A key that fits the protocol but not under its tenant's prefix: TOO_LARGE."""


@dataclass(frozen=True)
class Session:
    """Who a connection proved to be: a tenant, whose keys are all namespaced under its
    prefix, or nobody in particular (no tenant table: the whole store, as before)."""

    tenant: str | None = None
    prefix: bytes = b""

    def key(self, key: bytes) -> bytes:
        """The stored key of the client's key."""
        if len(self.prefix) + len(key) > MAX_KEY_BYTES:
            raise TenantKeyTooLong(
                f"key of {len(key)} bytes: tenant {self.tenant!r}'s keys are at most "
                f"{MAX_KEY_BYTES - len(self.prefix)} bytes"
            )
        return self.prefix + key


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
        tenants: Sequence[Tenant] = (),
        max_connections: int = 256,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        worker_threads: int = 8,
    ):
        """tenants: each connection must prove one tenant's token and then sees only that
        tenant's keys; their quotas are enforced on store (QuotaError if they do not fit)."""
        if token and tenants:
            raise ValueError("a server has one token or a tenant table, not both")
        self.store = store
        self.host, self.port = host, port
        self.token = token
        self.tenants = list(tenants)
        self.quotas = (
            store.enforce_quotas({t.name: t.quota_bytes for t in tenants}) if tenants else None
        )
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

    def render_metrics(self) -> str:
        usage = {t.name: self.quotas.report(t.name) for t in self.tenants} if self.quotas else {}
        return self.metrics.render(
            self.store.stats(), self.store.pool_leased, self.store.pool_buffers, usage
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
            session = await asyncio.wait_for(self._handshake(connection), HANDSHAKE_TIMEOUT_S)
            if session is not None:
                while True:
                    raw = await self._recv(connection, HEADER.size)
                    self._busy.add(task)
                    header = Header.unpack(raw, self.max_body_bytes)
                    metrics.bytes_received += HEADER.size + header.body_bytes
                    started = time.monotonic()
                    status = await self._dispatch(connection, header, session)
                    operation = Opcode(header.opcode).name.lower()
                    metrics.observe(
                        operation, status.name.lower(), time.monotonic() - started,
                        session.tenant,
                    )  # fmt: skip
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
            metrics.connections_active -= 1
            connection.close()

    async def _handshake(self, connection: socket.socket) -> Session | None:
        """The session the client proved, or None when it was refused."""
        loop = asyncio.get_running_loop()
        nonce = os.urandom(NONCE_BYTES)
        flags = FLAG_TOKEN_REQUIRED if self.token or self.tenants else 0
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
            return None
        session: Session | None = Session()
        if self.tenants:
            # Every tenant's proof is checked, so the time taken says nothing of which
            # tenant (if any) the proof was close to.
            proven = [t for t in self.tenants if _equal(client_proof, proof(t.token, nonce))]
            session = Session(proven[0].name, proven[0].prefix) if proven else None
        elif self.token and not _equal(client_proof, proof(self.token, nonce)):
            session = None
        if session is None:
            await self._respond(connection, 0, Status.UNAUTHORIZED, 0, b"wrong token")
            return None
        await self._respond(connection, 0, Status.OK, 0)
        return session

    async def _dispatch(
        self, connection: socket.socket, header: Header, session: Session
    ) -> Status:
        """Answers one request; returns the status it answered with."""

        async def reply(status: Status, body: bytes = b"") -> Status:
            await self._respond(connection, header.opcode, status, header.request_id, body)
            return status

        if header.opcode == Opcode.PUT:
            return await self._put(connection, header, session)
        body = await self._recv(connection, header.body_bytes)
        try:
            return await self._answer(connection, header, body, session, reply)
        except TenantKeyTooLong as error:
            return await reply(Status.TOO_LARGE, str(error).encode())

    async def _answer(
        self, connection: socket.socket, header: Header, body: bytes, session: Session,
        reply: Callable[[Status, bytes], Awaitable[Status]],
    ) -> Status:  # fmt: skip
        """Answers a request other than PUT, its body received."""
        loop = asyncio.get_running_loop()
        store, run = self.store, self._executor
        if header.opcode == Opcode.GET:
            return await self._get(connection, header, session.key(_whole_key(body)), session)
        elif header.opcode in (Opcode.DELETE, Opcode.CONTAINS):
            key = session.key(_whole_key(body))
            call = store.delete if header.opcode == Opcode.DELETE else store.__contains__
            present = await loop.run_in_executor(run, call, key)
            if header.opcode == Opcode.CONTAINS:
                return await reply(Status.OK, bytes([int(present)]))
            else:
                return await reply(Status.OK if present else Status.NOT_FOUND)
        elif header.opcode == Opcode.LONGEST_PREFIX:
            keys = [session.key(key) for key in unpack_keys(body, DEFAULT_MAX_BATCH_KEYS)]
            count = await loop.run_in_executor(run, store.longest_prefix, keys)
            return await reply(Status.OK, COUNT.pack(count))
        elif header.opcode == Opcode.STATS and session.tenant is not None:
            # A tenant hears of itself only: nothing of the others' keys or traffic.
            stats = {
                "tenant": session.tenant,
                "extent_bytes": store.extent_bytes,
                **self.quotas.report(session.tenant),
                **self.metrics.tenant_figures(session.tenant),
            }
            return await reply(Status.OK, json.dumps(stats).encode())
        elif header.opcode == Opcode.STATS:
            stats = await loop.run_in_executor(run, store.stats)
            server = {
                "connections": self.metrics.connections_total,
                "requests": sum(self.metrics.requests.values()),
                "protocol_errors": self.metrics.protocol_errors,
                "refused": self.metrics.connections_refused,
            }
            return await reply(Status.OK, json.dumps({**stats, "server": server}).encode())
        else:
            raise ProtocolError(f"unknown opcode {header.opcode}")

    async def _put(self, connection: socket.socket, header: Header, session: Session) -> Status:
        """PUT: the key, then the value received straight into reserved pool buffers."""
        loop = asyncio.get_running_loop()
        if header.body_bytes < KEY_LENGTH.size:
            raise ProtocolError("PUT body too short")
        (key_bytes,) = KEY_LENGTH.unpack(await self._recv(connection, KEY_LENGTH.size))
        if not 0 < key_bytes <= MAX_KEY_BYTES or KEY_LENGTH.size + key_bytes > header.body_bytes:
            raise ProtocolError(f"bad key length {key_bytes}")
        value_bytes = header.body_bytes - KEY_LENGTH.size - key_bytes
        try:
            key = session.key(bytes(await self._recv(connection, key_bytes)))
        except TenantKeyTooLong as error:
            await self._discard(connection, value_bytes)
            await self._respond(
                connection, Opcode.PUT, Status.TOO_LARGE, header.request_id, str(error).encode()
            )
            return Status.TOO_LARGE
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
                self.metrics.count_bytes(session.tenant, "put", value_bytes)
            except Exception as error:  # the store refused or failed: the client must hear why
                logger.warning("put of %r failed: %s", key, error)
                status, message = Status.SERVER_ERROR, str(error).encode()
        await self._respond(connection, Opcode.PUT, status, header.request_id, message)
        return status

    async def _get(
        self, connection: socket.socket, header: Header, key: bytes, session: Session
    ) -> Status:
        """GET: the value sent straight from the pool buffers it was read into."""
        loop = asyncio.get_running_loop()
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
                    self.metrics.count_bytes(session.tenant, "got", lease.nbytes)
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
