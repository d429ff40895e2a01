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
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engine.closing import Releasable
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
from engine.tenants.config import Tenant

logger = logging.getLogger("ctxkv.server")
HANDSHAKE_TIMEOUT_S = 10
# Requests of one connection answered at once: a GET's device read overlaps the sending
# of the value before it, and pipelined GETs read in parallel.
PIPELINE_DEPTH = 8
SHUTDOWN_DRAIN_S = 30
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


class Reply:
    """A request that has run: how to send its response, and what to free afterwards
    (or instead, when the connection dies first)."""

    def __init__(
        self, send: Callable[[], Awaitable[Status]], release: Callable[[], None] | None = None
    ):
        self.send = send
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class Request:
    """A request received, its buffers taken: whether it changes the store, how to run
    it, and what to free if it never runs (its connection died first)."""

    def __init__(
        self, writes: bool, run: Callable[[], Awaitable[Reply]],
        abandon: Callable[[], None] | None = None, *, exclusive: bool = False,
    ):  # fmt: skip
        self.writes = writes
        self.run = run
        self.abandon = abandon
        self.exclusive = exclusive  # the next request is received once this one has run


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
        nixl: bool = False,
        nixl_lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S,
        nixl_lease_buffers: int | None = None,
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
        # Every connection stops reading requests; those it has received are answered
        # first (each connection drains its pipeline before it closes).
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=SHUTDOWN_DRAIN_S + 5)
        if exporter is not None:
            await exporter
        self._executor.shutdown(wait=True)
        if self._nixl is not None:
            self._nixl.close()  # every lease's buffers back in the pool before it closes

    def render_metrics(self) -> str:
        usage = {t.name: self.quotas.report(t.name) for t in self.tenants} if self.quotas else {}
        nixl = None if self._nixl is None else self._nixl.stats()
        return self.metrics.render(
            self.store.stats(), self.store.pool_leased, self.store.pool_buffers, usage, nixl
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
        answering: set[asyncio.Task] = set()
        try:
            session = await asyncio.wait_for(self._handshake(connection), HANDSHAKE_TIMEOUT_S)
            if session is not None:
                await self._serve_requests(connection, session, answering)
        except (TimeoutError, PeerClosed, ConnectionError, asyncio.CancelledError):
            pass
        except ProtocolError as error:
            metrics.protocol_errors += 1
            with contextlib.suppress(OSError):
                if answering:  # the error answer goes after the answers owed before it
                    await asyncio.wait(answering, timeout=SHUTDOWN_DRAIN_S)
                await self._respond(connection, 0, Status.BAD_REQUEST, 0, str(error).encode())
        except Exception:
            logger.exception("connection failed")
        finally:
            if answering:
                # Requests received before a shutdown or a client's half-close are answered.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait(answering, timeout=SHUTDOWN_DRAIN_S)
                for task in answering:
                    task.cancel()
            if self._nixl is not None:
                self._nixl.leases.drop_owner(connection)
            metrics.connections_active -= 1
            connection.close()

    async def _serve_requests(
        self, connection: socket.socket, session: Session, answering: set
    ) -> None:
        """Receives requests in order and answers up to PIPELINE_DEPTH at once. Responses
        leave in request order. A request that reads runs alongside the reads around it;
        one that writes runs after every request before it and before every one after it,
        so a connection sees its own writes."""
        loop = asyncio.get_running_loop()
        connection_task = asyncio.current_task()
        slots = asyncio.Semaphore(PIPELINE_DEPTH)
        done = loop.create_future()
        done.set_result(None)
        previous_sent, last_write_ran, reads_since_write = done, done, []
        # Extents of values this connection put that may not be committed yet: a GET of
        # such a key takes credits for them, not for what the store holds now.
        putting: dict[bytes, int] = {}

        def finished(task: asyncio.Task) -> None:
            answering.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                connection_task.cancel()  # the connection is broken: stop reading it

        while True:
            raw = await self._recv(connection, HEADER.size)
            header = Header.unpack(raw, self.max_body_bytes)
            self.metrics.bytes_received += HEADER.size + header.body_bytes
            started = time.monotonic()
            await slots.acquire()
            if not answering:
                putting.clear()
            try:
                request = await self._receive(connection, header, session, putting)
            except BaseException:
                slots.release()
                raise
            ran, sent = loop.create_future(), loop.create_future()
            if request.writes:
                after = [last_write_ran, *reads_since_write]
                last_write_ran, reads_since_write = ran, []
            else:
                after = [last_write_ran]
                reads_since_write.append(ran)
            task = asyncio.create_task(
                self._answer(
                    connection, header, session, request, after, ran, previous_sent, sent, started
                )
            )
            previous_sent = sent
            answering.add(task)
            task.add_done_callback(finished)
            if request.exclusive:
                await asyncio.wait([ran])

    async def _answer(
        self, connection: socket.socket, header: Header, session: Session, request: Request,
        after: list[asyncio.Future],
        ran: asyncio.Future, previous_sent: asyncio.Future, sent: asyncio.Future,
        started: float,
    ) -> None:  # fmt: skip
        reply, running = None, False
        try:
            try:
                await asyncio.gather(*after)
                running = True
                reply = await request.run()
            except Exception as error:  # the store refused or failed: the client must hear why
                logger.warning("%s failed: %s", Opcode(header.opcode).name, error)
                reply = self._reply(connection, header, Status.SERVER_ERROR, str(error).encode())
            finally:
                ran.set_result(None)
            await previous_sent
            status = await reply.send()
            operation = Opcode(header.opcode).name.lower()
            self.metrics.observe(
                operation, status.name.lower(), time.monotonic() - started, session.tenant
            )
        finally:
            if not sent.done():
                sent.set_result(None)
            if reply is not None:
                reply.release()
            elif not running and request.abandon is not None:
                request.abandon()

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

    def _reply(
        self, connection: socket.socket, header: Header, status: Status, body: bytes = b""
    ) -> Reply:
        async def send() -> Status:
            await self._respond(connection, header.opcode, status, header.request_id, body)
            return status

        return Reply(send)

    def _replying_at_once(
        self, connection: socket.socket, header: Header, status: Status, message: str
    ) -> Request:
        """A request refused before it runs; it still answers in its turn."""
        reply = self._reply(connection, header, status, message.encode())

        async def refuse() -> Reply:
            return reply

        return Request(False, refuse)

    async def _receive(
        self, connection: socket.socket, header: Header, session: Session,
        putting: dict[bytes, int],
    ) -> Request:  # fmt: skip
        """Reads the body of one request and takes the buffers it needs, in request order;
        returns whether it writes and how to run it."""
        if header.opcode == Opcode.PUT:
            return await self._receive_put(connection, header, session, putting)
        body = await self._recv(connection, header.body_bytes)
        try:
            return await self._parse(connection, header, body, session, putting)
        except TenantKeyTooLong as error:
            return self._replying_at_once(connection, header, Status.TOO_LARGE, str(error))

    async def _parse(
        self, connection: socket.socket, header: Header, body: bytes, session: Session,
        putting: dict[bytes, int],
    ) -> Request:  # fmt: skip
        """A request other than PUT, its body received."""
        loop = asyncio.get_running_loop()
        store, run = self.store, self._executor

        def replying(status: Status, body: bytes = b"") -> Reply:
            return self._reply(connection, header, status, body)

        if header.opcode == Opcode.GET:
            key = session.key(_whole_key(body))
            return await self._prepare_get(connection, header, session, key, putting.get(key, 1))
        elif header.opcode in NIXL_OPCODES:
            if self._nixl is None:
                raise ProtocolError(
                    f"opcode {header.opcode} is NIXL's, and this server was started without --nixl"
                )
            nixl = self._nixl

            async def nixl_request() -> Reply:
                try:
                    return replying(
                        *await nixl.handle(header.opcode, body, connection, session.key)
                    )
                except TenantKeyTooLong as error:
                    return replying(Status.TOO_LARGE, str(error).encode())

            # A lease or commit runs after everything before it, like a write (a commit is
            # one; a get lease must see the connection's earlier puts), and takes its
            # buffers when it runs: so nothing after it is received before it has run,
            # or a later request could hold the buffers it waits for.
            return Request(True, nixl_request, exclusive=True)
        elif header.opcode in (Opcode.DELETE, Opcode.CONTAINS):
            key = session.key(_whole_key(body))
            deletes = header.opcode == Opcode.DELETE

            async def test_or_delete() -> Reply:
                present = await loop.run_in_executor(
                    run, store.delete if deletes else store.__contains__, key
                )
                if deletes:
                    return replying(Status.OK if present else Status.NOT_FOUND)
                return replying(Status.OK, bytes([int(present)]))

            return Request(deletes, test_or_delete)
        elif header.opcode == Opcode.LONGEST_PREFIX:
            keys = [session.key(key) for key in unpack_keys(body, DEFAULT_MAX_BATCH_KEYS)]

            async def longest_prefix() -> Reply:
                count = await loop.run_in_executor(run, store.longest_prefix, keys)
                return replying(Status.OK, COUNT.pack(count))

            return Request(False, longest_prefix)
        elif header.opcode == Opcode.STATS and session.tenant is not None:
            # A tenant hears of itself only: nothing of the others' keys or traffic.
            tenant = session.tenant

            async def tenant_stats() -> Reply:
                stats = {
                    "tenant": tenant,
                    "extent_bytes": store.extent_bytes,
                    **self.quotas.report(tenant),
                    **self.metrics.tenant_figures(tenant),
                }
                return replying(Status.OK, json.dumps(stats).encode())

            return Request(False, tenant_stats)
        elif header.opcode == Opcode.STATS:

            async def stats() -> Reply:
                stats = await loop.run_in_executor(run, store.stats)
                server = {
                    "connections": self.metrics.connections_total,
                    "requests": sum(self.metrics.requests.values()),
                    "protocol_errors": self.metrics.protocol_errors,
                    "refused": self.metrics.connections_refused,
                    "pool_leased": store.pool_leased,
                }
                if self._nixl is not None:
                    server["nixl"] = self._nixl.stats()
                return replying(Status.OK, json.dumps({**stats, "server": server}).encode())

            return Request(False, stats)
        else:
            raise ProtocolError(f"unknown opcode {header.opcode}")

    async def _receive_put(
        self, connection: socket.socket, header: Header, session: Session,
        putting: dict[bytes, int],
    ) -> Request:  # fmt: skip
        """PUT: the key, then the value received straight into reserved pool buffers."""
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
            return self._replying_at_once(connection, header, Status.TOO_LARGE, str(error))
        if value_bytes > self.max_value_bytes:
            raise ProtocolError(
                f"value of {value_bytes} bytes exceeds the limit {self.max_value_bytes}"
            )
        try:
            parts = self.store.parts_for(value_bytes)
        except ValueTooLargeError as error:
            await self._discard(connection, value_bytes)
            return self._replying_at_once(connection, header, Status.TOO_LARGE, str(error))
        putting[key] = parts
        await self._credits.acquire(parts)
        try:
            lease = await self._in_worker(self.store.reserve, value_bytes)
            try:
                for view in lease.views:
                    await self._recv_into(connection, view)
            except BaseException:
                lease.release()
                raise
        except BaseException:
            self._credits.release(parts)
            raise

        async def commit() -> Reply:
            try:
                await self._in_worker(self.store.commit, key, lease)
            finally:
                self._credits.release(parts)
            self.metrics.count_bytes(session.tenant, "put", value_bytes)
            return self._reply(connection, header, Status.OK)

        def abandon() -> None:
            lease.release()
            self._credits.release(parts)

        return Request(True, commit, abandon)

    async def _prepare_get(
        self, connection: socket.socket, header: Header, session: Session, key: bytes,
        least_parts: int,
    ) -> Request:  # fmt: skip
        """GET: the value sent straight from the pool buffers it was read into."""
        loop = asyncio.get_running_loop()
        # An absent key still goes through store.read, so the store counts the miss.
        # (Never more than the pool: a value that big fails in store.read, clearly.)
        parts = min(max(self.store.parts_of(key) or 1, least_parts), self.store.pool_buffers)
        await self._credits.acquire(parts)

        def give_back() -> None:
            self._credits.release(parts)

        async def read() -> Reply:
            try:
                lease = await self._in_worker(self.store.read, key)
            except BaseException:
                give_back()
                raise
            if lease is None:
                give_back()
                return self._reply(connection, header, Status.NOT_FOUND)

            async def send() -> Status:
                head = Header(Opcode.GET, Status.OK, header.request_id, lease.nbytes)
                await loop.sock_sendall(connection, head.pack())
                for view in lease.views:
                    await loop.sock_sendall(connection, view)
                self.metrics.bytes_sent += HEADER.size + lease.nbytes
                self.metrics.count_bytes(session.tenant, "got", lease.nbytes)
                return Status.OK

            def release() -> None:
                lease.release()
                give_back()

            return Reply(send, release)

        return Request(False, read, give_back)

    async def _in_worker(self, call: Callable, *arguments: object) -> object:
        """call(*arguments) on a worker thread. If the waiting task is cancelled, the call
        is let finish first, so no one frees buffers a worker is still using, and buffers
        it returned to no one are released."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, call, *arguments)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            if not future.exception() and isinstance(future.result(), Releasable):
                future.result().release()
            raise

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
