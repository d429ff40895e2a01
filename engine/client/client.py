"""A client of `ctxkv serve`, with the Store's method names (docs/protocol.md).

Errors say whose fault they are: RequestError (this request was refused: too large,
malformed), ServerError (the store failed), AuthenticationError (wrong or missing
token), and OSError subclasses for the network (ConnectionError, TimeoutError).
"""

from __future__ import annotations

import itertools
import json
import queue
import socket
import struct
import threading
from collections.abc import Sequence

from engine.closing import Closeable
from engine.errors import CtxkvError
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

DEFAULT_TIMEOUT_S = 30.0
FLAG_TOKEN_REQUIRED = 1
MAX_RESPONSE_BODY_BYTES = 1 << 40  # a response is bounded by what was put, not by us


class RequestError(CtxkvError, ValueError):
    """The server refused this request (too large, malformed); the server is fine."""


class ServerError(CtxkvError, RuntimeError):
    """The server's store failed the request."""


class AuthenticationError(CtxkvError, PermissionError):
    """The server wants a token this client did not prove."""


def check_response(header: Header, body: bytes) -> None:
    """Raises the error a non-OK response stands for (NOT_FOUND is the caller's to read)."""
    if header.status == Status.OK:
        return
    message = body.decode(errors="replace")
    if header.status in (Status.BAD_REQUEST, Status.TOO_LARGE):
        raise RequestError(message)
    if header.status == Status.UNAUTHORIZED:
        raise AuthenticationError(message)
    raise ServerError(message or f"status {header.status}")


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host, int(port)


class Client(Closeable):
    """One connection; not for concurrent use from several threads (make one each)."""

    def __init__(
        self, address: str, *, token: str | bytes | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ):
        host, port = parse_address(address)
        self._socket = socket.create_connection((host, port), timeout=timeout)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Timeouts in the kernel rather than Python's: a Python timeout makes the socket
        # non-blocking, and then MSG_WAITALL stops at whatever has arrived.
        self._socket.settimeout(None)
        seconds = int(timeout)
        timeval = struct.pack("@ll", seconds, int((timeout - seconds) * 1e6))
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._ids = itertools.count(1)
        try:
            self._hello(token.encode() if isinstance(token, str) else token)
        except BaseException:
            self._socket.close()
            raise

    def _hello(self, token: bytes | None) -> None:
        magic, version, flags, nonce = HELLO.unpack(self._recv(HELLO.size))
        if magic != HELLO_MAGIC:
            raise ConnectionError("the peer is not a ctxkv server")
        if flags & FLAG_TOKEN_REQUIRED and not token:
            raise AuthenticationError("the server requires a token")
        answer = proof(token, nonce) if token else bytes(32)
        self._socket.sendall(HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, answer))
        header, body = self._read_response()
        if header.status == Status.UNAUTHORIZED:
            raise AuthenticationError(f"the server refused the token: {body.decode()}")
        check_response(header, body)
        del version

    # ---- the Store's methods -------------------------------------------------------------

    def put(
        self, key: bytes, value: bytes | bytearray | memoryview, *more: bytes | memoryview
    ) -> None:
        """The value is `value` followed by `more` (a header and a payload, say), sent
        without joining them."""
        views = [memoryview(part).cast("B") for part in (value, *more)]
        body_head = pack_key(key)
        header = Header(Opcode.PUT, 0, next(self._ids), len(body_head) + sum(map(len, views)))
        self._socket.sendall(header.pack() + body_head)
        for view in views:
            self._socket.sendall(view)
        check_response(*self._read_response())

    def get(self, key: bytes) -> bytes | None:
        header, body = self._request(Opcode.GET, pack_key(key))
        return None if header.status == Status.NOT_FOUND else body

    def get_into(
        self, key: bytes, buffer: bytearray | memoryview, *more: bytearray | memoryview
    ) -> int | None:
        """Receives the value straight into buffer (no intermediate copy), then into
        `more` when buffer is full; its length, or None on a miss. ValueError if the
        buffers are too small (the value is drained)."""
        body = pack_key(key)
        request = Header(Opcode.GET, 0, next(self._ids), len(body))
        self._socket.sendall(request.pack() + body)
        header = Header.unpack(self._recv(HEADER.size), MAX_RESPONSE_BODY_BYTES)
        if header.request_id != request.request_id:
            raise ConnectionError(f"response {header.request_id} to request {request.request_id}")
        if header.status != Status.OK:
            message = self._recv(header.body_bytes)
            if header.status == Status.NOT_FOUND:
                return None
            check_response(header, message)
        targets = [memoryview(part).cast("B") for part in (buffer, *more)]
        if sum(map(len, targets)) < header.body_bytes:
            self._recv(header.body_bytes)  # keep the connection in step
            raise ValueError(
                f"buffers of {sum(map(len, targets))} bytes are too small for {header.body_bytes}"
            )
        remaining = header.body_bytes
        for target in targets:
            if remaining == 0:
                break
            self._recv_into(target[: min(len(target), remaining)])
            remaining -= min(len(target), remaining)
        return header.body_bytes

    def delete(self, key: bytes) -> bool:
        header, _body = self._request(Opcode.DELETE, pack_key(key))
        return header.status == Status.OK

    def contains(self, key: bytes) -> bool:
        _header, body = self._request(Opcode.CONTAINS, pack_key(key))
        return body == b"\x01"

    __contains__ = contains

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            self.put(key, value)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Pipelined: every request is sent before the first response is read."""
        ids = []
        for key in keys:
            body = pack_key(key)
            header = Header(Opcode.GET, 0, next(self._ids), len(body))
            self._socket.sendall(header.pack() + body)
            ids.append(header.request_id)
        values = []
        for request_id in ids:
            header, body = self._read_response()
            if header.request_id != request_id:
                raise ConnectionError(
                    f"response {header.request_id} out of order, wanted {request_id}"
                )
            if header.status == Status.NOT_FOUND:
                values.append(None)
            else:
                check_response(header, body)
                values.append(body)
        return values

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        _header, body = self._request(Opcode.LONGEST_PREFIX, pack_keys(list(keys)))
        return COUNT.unpack(body)[0]

    def stats(self) -> dict:
        _header, body = self._request(Opcode.STATS, b"")
        return json.loads(body)

    def close(self) -> None:
        self._socket.close()

    # ---- plumbing --------------------------------------------------------------------------

    def _request(self, opcode: Opcode, body: bytes) -> tuple[Header, bytes]:
        header = Header(opcode, 0, next(self._ids), len(body))
        self._socket.sendall(header.pack() + body)
        response, response_body = self._read_response()
        if response.request_id != header.request_id:
            raise ConnectionError(f"response {response.request_id} to request {header.request_id}")
        if response.status != Status.NOT_FOUND:
            check_response(response, response_body)
        return response, response_body

    def _read_response(self) -> tuple[Header, bytes]:
        header = Header.unpack(self._recv(HEADER.size), MAX_RESPONSE_BODY_BYTES)
        return header, self._recv(header.body_bytes)

    def _recv(self, nbytes: int) -> bytes:
        # One recv with MSG_WAITALL fills a fresh bytes object: a single copy out of the
        # kernel. A signal may cut it short; the rest is then received into a buffer.
        try:
            data = self._socket.recv(nbytes, socket.MSG_WAITALL) if nbytes else b""
        except BlockingIOError as error:  # SO_RCVTIMEO expired
            raise TimeoutError(f"no answer from the server within the timeout: {error}") from None
        if len(data) == nbytes:
            return data
        if not data:
            raise ConnectionError("the server closed the connection")
        buffer = bytearray(nbytes)
        buffer[: len(data)] = data
        self._recv_into(memoryview(buffer)[len(data) :])
        return bytes(buffer)

    def _recv_into(self, view: memoryview) -> None:
        received = 0
        while received < len(view):
            try:
                count = self._socket.recv_into(view[received:])
            except BlockingIOError as error:  # SO_RCVTIMEO expired
                raise TimeoutError(
                    f"no answer from the server within the timeout: {error}"
                ) from None
            if count == 0:
                raise ConnectionError("the server closed the connection")
            received += count


class ClientPool(Closeable):
    """Connections to one server shared by many threads. Reads (get, get_many, contains,
    longest_prefix, stats) that meet a broken connection are retried on a fresh one, up
    to `retries` times; writes are not retried, since the server may have applied them."""

    def __init__(
        self,
        address: str,
        *,
        token: str | bytes | None = None,
        size: int = 8,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = 2,
    ):
        if size <= 0 or retries < 0:
            raise ValueError(f"size must be positive and retries not negative: {size}, {retries}")
        self._connect = lambda: Client(address, token=token, timeout=timeout)
        self._idle: queue.LifoQueue[Client] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self.retries = retries
        self._closed = False

    def _call(self, method: str, *arguments: object, retry: bool) -> object:
        attempts = self.retries + 1 if retry else 1
        with self._slots:
            for attempt in range(attempts):
                if self._closed:
                    raise CtxkvError("the client pool is closed")
                try:
                    client = self._idle.get_nowait()
                except queue.Empty:
                    client = self._connect()
                try:
                    result = getattr(client, method)(*arguments)
                except (ConnectionError, TimeoutError):
                    # Broken or out of step, and the idle ones likely too (a restarted
                    # server drops them all): the next attempt starts on a new connection.
                    client.close()
                    self._drop_idle()
                    if attempt + 1 == attempts:
                        raise
                    continue
                except BaseException:
                    client.close()
                    raise
                self._idle.put(client)
                return result
        raise AssertionError("unreachable")

    def put(
        self, key: bytes, value: bytes | bytearray | memoryview, *more: bytes | memoryview
    ) -> None:
        self._call("put", key, value, *more, retry=False)

    def delete(self, key: bytes) -> bool:
        return self._call("delete", key, retry=False)

    def get(self, key: bytes) -> bytes | None:
        return self._call("get", key, retry=True)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return self._call("get_many", keys, retry=True)

    def get_into(
        self, key: bytes, buffer: bytearray | memoryview, *more: bytearray | memoryview
    ) -> int | None:
        return self._call("get_into", key, buffer, *more, retry=True)

    def contains(self, key: bytes) -> bool:
        return self._call("contains", key, retry=True)

    __contains__ = contains

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        return self._call("longest_prefix", keys, retry=True)

    def stats(self) -> dict:
        return self._call("stats", retry=True)

    def close(self) -> None:
        self._closed = True
        self._drop_idle()

    def _drop_idle(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
