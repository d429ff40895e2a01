"""A client of `ctxkv serve --nixl` whose values move by NIXL (docs/protocol.md, "NIXL").

Requests go over the TCP connection of Client; the bytes go one-sided between the
server's pool and this client's registered memory. A get: lease the value (the server
reads it into pool buffers and says where), READ it, check each part's crc32c, release
the lease. A put: lease pool buffers, WRITE the value into them, commit with each
part's crc32c (the server checks what landed before storing it). Each transfer must end
before the lease does; the client aborts one that would not (TransferError).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from engine._native import ffi, lib
from engine.client.client import DEFAULT_TIMEOUT_S, Client
from engine.errors import LeaseError
from engine.io.buffers import PAGE_BYTES, aligned_array
from engine.nixl.agent import NixlAgent, Region, TransferError
from engine.server.protocol import (
    U64,
    LeaseGrant,
    Opcode,
    Status,
    pack_commit,
    pack_key,
)

DEFAULT_ARENA_BYTES = 64 << 20
# A transfer may not start with less than this share of its lease left: the client's
# clock started before the request, the server's after the read, so the client ends
# first, and this margin keeps one-sided bytes from landing after the server took the
# buffers back.
LEASE_MARGIN = 0.25


@dataclass(frozen=True)
class Lease:
    """A lease the server granted, and the client's own deadline for its transfers."""

    grant: LeaseGrant
    deadline: float  # time.monotonic()

    @property
    def lease_id(self) -> int:
        return self.grant.lease_id

    @property
    def value_bytes(self) -> int:
        return self.grant.value_bytes


class NixlClient(Client):
    """A Client whose get/get_into/put go through NIXL; the rest stays on TCP. It
    registers one page-aligned arena of its own memory (arena_bytes) with its NIXL agent
    at connect: get() and put() stage through it, and get_into()/put() move the bytes
    straight from or to a buffer that lies inside it (.arena) or inside memory
    added with register()."""

    def __init__(
        self, address: str, *, token: str | bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT_S, arena_bytes: int = DEFAULT_ARENA_BYTES,
    ):  # fmt: skip
        if arena_bytes <= 0 or arena_bytes % PAGE_BYTES:
            raise ValueError(
                f"arena_bytes must be a positive multiple of {PAGE_BYTES}, got {arena_bytes}"
            )
        super().__init__(address, token=token, timeout=timeout)
        try:
            self._agent = NixlAgent("client", progress_thread=False)
            self.arena = aligned_array(arena_bytes)
            self._agent.register((self.arena.ctypes.data, arena_bytes))
            _header, metadata = self._request(Opcode.NIXL_CONNECT, b"")
            self._peer = self._agent.add_peer(metadata)
        except BaseException:
            super().close()
            raise

    def register(self, array: np.ndarray) -> None:
        """Registers more memory (kept alive by the caller) for get_into() and put()."""
        self._agent.register((array.ctypes.data, array.nbytes))

    # ---- the NIXL data path ------------------------------------------------------------

    def lease_get(self, key: bytes) -> Lease | None:
        """Asks the server to read key into pool buffers and lend them; None on a miss."""
        started = time.monotonic()
        header, body = self._request(Opcode.NIXL_GET_LEASE, pack_key(key))
        if header.status == Status.NOT_FOUND:
            return None
        return self._granted(body, started)

    def read(self, lease: Lease, destination: np.ndarray, *, verify: bool = True) -> None:
        """READs a get lease's value into destination (registered memory), then (verify)
        checks it."""
        self._transfer("READ", lease, self._local_regions(destination, lease))
        if verify:
            self.verify(lease, destination)

    def verify(self, lease: Lease, destination: np.ndarray) -> None:
        """Checks each part READ into destination against the crc32c the server read it
        with; TransferError names the first part that differs."""
        regions = self._local_regions(destination, lease)
        for index, ((address, nbytes), part) in enumerate(
            zip(regions, lease.grant.parts, strict=True)
        ):
            crc = lib.ctxkv_crc32c(0, ffi.cast("char *", address), nbytes)
            if crc != part.crc32c:
                raise TransferError(
                    f"part {index} of lease {lease.lease_id} arrived damaged: crc32c "
                    f"{crc:#010x}, the store has {part.crc32c:#010x}"
                )

    def release(self, lease: Lease) -> None:
        """Gives a get lease's buffers back (or abandons a put lease)."""
        header, body = self._request(Opcode.NIXL_RELEASE, U64.pack(lease.lease_id))
        _check_lease(header.status, body)

    def lease_put(self, value_bytes: int) -> Lease:
        """Pool buffers for a value of value_bytes, to write() and then commit()."""
        started = time.monotonic()
        _header, body = self._request(Opcode.NIXL_PUT_LEASE, U64.pack(value_bytes))
        return self._granted(body, started)

    def write(self, lease: Lease, source: np.ndarray) -> list[int]:
        """WRITEs source (registered memory) into a put lease's buffers; returns each
        part's crc32c, for commit()."""
        regions = self._local_regions(source, lease)
        crcs = [lib.ctxkv_crc32c(0, ffi.cast("char *", a), n) for a, n in regions]
        self._transfer("WRITE", lease, regions)
        return crcs

    def commit(self, lease: Lease, key: bytes, crcs: list[int]) -> None:
        """Stores what write() put in the lease's buffers under key; ends the lease."""
        header, body = self._request(Opcode.NIXL_COMMIT, pack_commit(lease.lease_id, crcs, key))
        _check_lease(header.status, body)

    # ---- the Store's names -------------------------------------------------------------

    def get_into(self, key: bytes, destination: np.ndarray) -> int | None:
        """READs the value straight into destination (a uint8 array in registered
        memory); its length, or None on a miss. ValueError if destination is too small."""
        lease = self.lease_get(key)
        if lease is None:
            return None
        try:
            if destination.nbytes < lease.value_bytes:
                raise ValueError(
                    f"destination of {destination.nbytes} bytes is too small for a value "
                    f"of {lease.value_bytes}"
                )
            self.read(lease, destination[: lease.value_bytes])
        finally:
            self.release(lease)
        return lease.value_bytes

    def get(self, key: bytes) -> bytes | None:
        """The value, READ through the arena and copied out of it."""
        lease = self.lease_get(key)
        if lease is None:
            return None
        try:
            staging = self._staging(lease.value_bytes)
            self.read(lease, staging)
            return staging.tobytes()
        finally:
            self.release(lease)

    def put(self, key: bytes, value: bytes | bytearray | memoryview | np.ndarray) -> None:
        """WRITEs the value from where it lies when that is registered memory, otherwise
        from a copy in the arena, then commits it under key."""
        source = (
            np.frombuffer(value, dtype=np.uint8) if not isinstance(value, np.ndarray) else value
        )
        source = source.reshape(-1).view(np.uint8)
        if not self._agent.covers(source.ctypes.data, source.nbytes):
            staging = self._staging(source.nbytes)
            staging[:] = source
            source = staging
        lease = self.lease_put(source.nbytes)
        try:
            crcs = self.write(lease, source)
        except BaseException:
            self.release(lease)
            raise
        self.commit(lease, key, crcs)

    def close(self) -> None:
        agent = getattr(self, "_agent", None)
        if agent is not None:
            agent.close()
        super().close()

    # ---- plumbing ----------------------------------------------------------------------

    def _granted(self, body: bytes, started: float) -> Lease:
        grant = LeaseGrant.unpack(body)
        return Lease(grant, started + grant.timeout_ms / 1000 * (1 - LEASE_MARGIN))

    def _staging(self, nbytes: int) -> np.ndarray:
        if nbytes > self.arena.nbytes:
            raise ValueError(
                f"a value of {nbytes} bytes does not fit the client's arena of "
                f"{self.arena.nbytes} (arena_bytes)"
            )
        return self.arena[:nbytes]

    def _local_regions(self, array: np.ndarray, lease: Lease) -> list[Region]:
        if array.nbytes != lease.value_bytes or not array.flags.c_contiguous:
            raise ValueError(
                f"a contiguous buffer of {lease.value_bytes} bytes is needed, got {array.nbytes}"
            )
        address = array.ctypes.data
        if not self._agent.covers(address, array.nbytes):
            raise ValueError(
                f"buffer at {address:#x} ({array.nbytes} bytes) is not in registered memory: "
                f"use the client's arena (.arena) or register() it"
            )
        regions, offset = [], 0
        for part in lease.grant.parts:
            regions.append((address + offset, part.nbytes))
            offset += part.nbytes
        return regions

    def _transfer(self, operation: str, lease: Lease, local: list[Region]) -> None:
        deadline = lease.deadline
        if time.monotonic() >= deadline:
            raise LeaseError(f"lease {lease.lease_id} is too close to expiry to start a transfer")
        remote = [(part.address, part.nbytes) for part in lease.grant.parts]
        self._agent.transfer(operation, local, remote, self._peer, deadline)


def _check_lease(status: int, body: bytes) -> None:
    """Client._request raised for every other failure already."""
    if status == Status.NOT_FOUND:
        raise LeaseError(body.decode(errors="replace"))
