"""The NIXL data path of `ctxkv serve --nixl` (docs/protocol.md, "NIXL").

Requests still travel over TCP, but values do not: the server registers its buffer
pool with a NIXL agent once, and answers a get lease with where the value lies in the
pool (read there from the device) and a put lease with buffers to fill; the client
moves the bytes itself, one-sided, with its own agent. A lease's buffers count against
the server's BufferCredits (backpressure) and against a bound of their own, so NIXL
clients cannot take the whole pool from TCP ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor

from engine._native import ffi, lib
from engine.errors import LeaseError
from engine.nixl.agent import NixlAgent
from engine.server.credits import BufferCredits
from engine.server.leases import DEFAULT_LEASE_TIMEOUT_S, Kind, Lease, LeaseTable
from engine.server.protocol import (
    LeaseGrant,
    LeasePart,
    Opcode,
    ProtocolError,
    Status,
    unpack_commit,
    unpack_key,
    unpack_u64,
)
from engine.store.store import Store, ValueLease, ValueTooLargeError

logger = logging.getLogger("ctxkv.server.nixl")


class NixlFrontEnd:
    """Owns the server's NIXL agent and the lease table; answers opcodes 16 and up."""

    def __init__(
        self, store: Store, executor: Executor, credits: BufferCredits, *,
        lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S, max_lease_buffers: int | None = None,
        max_value_bytes: int,
    ):  # fmt: skip
        self.store = store
        self._executor = executor
        self._credits = credits
        lease_buffers = max_lease_buffers or max(1, store.pool_buffers // 2)
        if not 0 < lease_buffers <= store.pool_buffers:
            raise ValueError(
                f"max_lease_buffers must be 1..{store.pool_buffers} (the pool), got {lease_buffers}"
            )
        self._lease_credits = BufferCredits(lease_buffers)
        self.max_lease_buffers = lease_buffers
        self.max_value_bytes = max_value_bytes
        self.leases = LeaseTable(lease_timeout_s)
        self.granted = {"get": 0, "put": 0}
        self.agent = NixlAgent("server", progress_thread=True)
        for region in store.pool_regions():
            self.agent.register(region)
        self._metadata = self.agent.metadata

    def close(self) -> None:
        self.leases.drop_all()
        self.agent.close()

    def stats(self) -> dict[str, object]:
        return {
            "agent": self.agent.name,
            "leases_active": self.leases.active,
            "lease_buffers": self.leases.buffers,
            "max_lease_buffers": self.max_lease_buffers,
            "lease_timeout_s": self.leases.timeout_s,
            "leases_granted": dict(self.granted),
            "leases_ended": dict(self.leases.outcomes),
        }

    async def handle(
        self, opcode: int, body: bytes, owner: object,
        stored_key: Callable[[bytes], bytes] = bytes,
    ) -> tuple[Status, bytes]:  # fmt: skip
        """The answer (status, body) to one NIXL request of connection owner, whose keys
        are stored under stored_key(key) (a tenant's namespace)."""
        try:
            if opcode == Opcode.NIXL_CONNECT:
                if body:
                    raise ProtocolError("NIXL_CONNECT takes no body")
                return Status.OK, self._metadata
            if opcode == Opcode.NIXL_GET_LEASE:
                return await self._get_lease(body, owner, stored_key)
            if opcode == Opcode.NIXL_PUT_LEASE:
                return await self._put_lease(body, owner)
            if opcode == Opcode.NIXL_COMMIT:
                return await self._commit(body, owner, stored_key)
            assert opcode == Opcode.NIXL_RELEASE, opcode  # the server routes NIXL_OPCODES only
            lease = self.leases.take(unpack_u64(body, "NIXL_RELEASE"), owner, None)
            lease.value.release()
            self.leases.end_taken(lease, "released")
            return Status.OK, b""
        except LeaseError as error:
            return Status.NOT_FOUND, str(error).encode()

    async def _get_lease(
        self, body: bytes, owner: object, stored_key: Callable[[bytes], bytes]
    ) -> tuple[Status, bytes]:
        key, end = unpack_key(body)
        if end != len(body):
            raise ProtocolError("trailing bytes after the key")
        key = stored_key(key)
        parts = self.store.parts_of(key) or 1
        if parts > self.max_lease_buffers:
            return Status.TOO_LARGE, self._too_many(key, parts)
        value = await self._with_credits(parts, self.store.read, key)
        if value is None:
            self._give_credits(parts)
            return Status.NOT_FOUND, b""
        crcs = value.payload_crcs()
        lease = self._grant("get", value, owner, parts)
        return Status.OK, self._grant_body(lease, crcs)

    async def _put_lease(self, body: bytes, owner: object) -> tuple[Status, bytes]:
        value_bytes = unpack_u64(body, "NIXL_PUT_LEASE")
        if value_bytes > self.max_value_bytes:
            return Status.TOO_LARGE, (
                f"value of {value_bytes} bytes exceeds the limit {self.max_value_bytes}".encode()
            )
        try:
            parts = self.store.parts_for(value_bytes)
        except ValueTooLargeError as error:
            return Status.TOO_LARGE, str(error).encode()
        if parts > self.max_lease_buffers:
            return Status.TOO_LARGE, self._too_many(f"a value of {value_bytes} bytes", parts)
        value = await self._with_credits(parts, self.store.reserve, value_bytes)
        lease = self._grant("put", value, owner, parts)
        return Status.OK, self._grant_body(lease, [0] * len(value.part_bytes))

    async def _commit(
        self, body: bytes, owner: object, stored_key: Callable[[bytes], bytes]
    ) -> tuple[Status, bytes]:
        lease_id, client_crcs, key = unpack_commit(body)
        key = stored_key(key)
        lease = self.leases.take(lease_id, owner, "put")
        loop = asyncio.get_running_loop()
        try:
            error = await loop.run_in_executor(
                self._executor, _commit_checked, self.store, key, lease.value, client_crcs
            )
        except Exception as failure:  # the store failed: the client must hear why
            error = f"put of {key!r} failed: {failure}"
        finally:
            lease.value.release()  # commit released it already, unless it failed first
        if error is None:
            self.leases.end_taken(lease, "committed")
            return Status.OK, b""
        logger.warning("NIXL put lease %d: %s", lease_id, error)
        self.leases.end_taken(lease, f"failed: {error}")
        return Status.SERVER_ERROR, error.encode()

    async def _with_credits(self, parts: int, call: object, argument: object) -> ValueLease:
        """call(argument) in a worker once parts credits of both kinds are held; they stay
        held (for the lease) unless the call fails."""
        await self._lease_credits.acquire(parts)
        await self._credits.acquire(parts)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call, argument)
        except BaseException:
            self._give_credits(parts)
            raise

    def _too_many(self, what: object, parts: int) -> bytes:
        return (
            f"{what} takes {parts} pool buffers; NIXL leases may hold at most "
            f"{self.max_lease_buffers} (--nixl-lease-buffers)"
        ).encode()

    def _give_credits(self, parts: int) -> None:
        self._credits.release(parts)
        self._lease_credits.release(parts)

    def _grant(self, kind: Kind, value: ValueLease, owner: object, parts: int) -> Lease:
        lease = self.leases.grant(kind, value, owner)
        lease.on_end.add_done_callback(lambda _outcome: self._give_credits(parts))
        self.granted[kind] += 1
        return lease

    def _grant_body(self, lease: Lease, crcs: list[int]) -> bytes:
        parts = tuple(
            LeasePart(address, nbytes, crc)
            for (address, nbytes), crc in zip(lease.value.regions, crcs, strict=True)
        )
        timeout_ms = int(self.leases.timeout_s * 1000)
        return LeaseGrant(lease.lease_id, lease.value.nbytes, timeout_ms, parts).pack()


def _commit_checked(
    store: Store, key: bytes, value: ValueLease, client_crcs: list[int]
) -> str | None:
    """Commits value under key if what landed in the pool is what the client sent (its
    crc32c per part); otherwise the reason it was refused (nothing is stored)."""
    regions = value.regions
    if len(client_crcs) != len(regions):
        return f"the commit names {len(client_crcs)} checksums for {len(regions)} parts"
    pool_crcs = [lib.ctxkv_crc32c(0, ffi.cast("char *", a), n) for a, n in regions]
    for index, (client, pool) in enumerate(zip(client_crcs, pool_crcs, strict=True)):
        if client != pool:
            return (
                f"part {index} of {key!r} arrived damaged or incomplete: crc32c "
                f"{pool:#010x} in the pool, {client:#010x} sent by the client"
            )
    store.commit(key, value, payload_crcs=pool_crcs)
    return None
