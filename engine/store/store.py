"""The Store: a persistent KV-cache store over one or many raw targets (docs/format.md).

A put writes each part of the value as one slot (header + payload) on a different
member, in parallel; flushes those members; then group-commits a PUT record to the
journal and only then makes the key visible. A get reads every part in parallel and
verifies header and payload checksums before returning a byte: any mismatch is a miss.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from engine._native import ffi, lib
from engine.alloc.log import FREE, WRITING, Eviction, StoreFullError
from engine.closing import Closeable, Releasable
from engine.errors import CtxkvError, PoolExhaustedError
from engine.index import key_digest, key_digests
from engine.io.buffers import BufferPool, Lease, aligned_array
from engine.io.ring import EXTENT_CRC, UNREGISTERED_BUFFER, Op, Ring
from engine.io.writes import WriteStream
from engine.journal.journal import Journal, replay
from engine.nvme.device import Device
from engine.nvme.passthru import AUTO
from engine.store.checkpoint import newest_checkpoint, write_checkpoint
from engine.store.format import (
    TargetInUseError,
    existing_contents,
    plan_layout,
    round_up,
    write_fresh_store,
)
from engine.store.layout import (
    BLOCK_BYTES,
    DEFAULT_EXTENT_BYTES,
    EXTENT_HEADER_BYTES,
    EXTENT_PAYLOAD_BYTES_OFFSET,
    MAX_KEY_BYTES,
    RECORD_DELETE,
    RECORD_EVICT,
    RECORD_PIN,
    RECORD_PUT,
    RECORD_UNPIN,
    ExtentHeader,
    LayoutError,
    Record,
    Superblock,
    store_tag,
)
from engine.store.recovery import Damage, read_superblocks
from engine.store.state import MAX_VALUE_PARTS, Located, Part, StoreState
from engine.tenants.quotas import Quotas

# Extent reads checksum their payload in C as each lands, overlapping the other reads.
READ_EXTENT = Op.READ | EXTENT_CRC
assert lib.CTXKV_EXTENT_HEADER_BYTES == EXTENT_HEADER_BYTES
assert lib.CTXKV_EXTENT_PAYLOAD_BYTES_OFFSET == EXTENT_PAYLOAD_BYTES_OFFSET

# The pool is sized in bytes by default, so small extents get many buffers and large ones
# do not pin gigabytes: 256 MiB is 63 buffers of 4 MiB extents, 255 of 64 KiB ones.
DEFAULT_POOL_BYTES = 256 << 20
MIN_POOL_BUFFERS = 8

# A value ready to write: key, the pool buffers holding its payloads, its length, and its
# payloads' CRCs when the caller has them. _place hands _make_durable each value's
# placement (key, digest, sequence, length, buffers, parts, CRCs) and the journal records
# of the evictions that made room.
Staged = tuple[bytes, list[Lease], int, list[int] | None]
Written = tuple[list[tuple], list[Record]]


def merge_written(written: list[Written]) -> Written:
    return (
        [placement for placements, _ in written for placement in placements],
        [record for _, records in written for record in records],
    )


# Durability modes. strict: put returns once its extents and its journal record are on
# stable media (two device flushes). relaxed: put returns once both are written, and a
# flusher makes everything stable every flush_interval_ms, so a power loss forgets at
# most that window of puts (a kill -9 forgets nothing: the writes are in the kernel).
# Either way a read verifies checksums, so a lost write is a miss, never wrong bytes.
STRICT, RELAXED = "strict", "relaxed"

# Makes a ring over the store's devices (and its pool, None while opening). Stores use
# real rings; crash tests pass a fault-injection test device's (tests/fault_device.py).
RingFactory = Callable[[list[Device], BufferPool | None], Ring]


def shared_ring(devices: list[Device], pool: BufferPool | None) -> Ring:
    # Not SINGLE_ISSUER: close() frees every thread's ring from one thread, and the kernel
    # refuses to unregister a single-issuer ring's files from another task, which would
    # leave the devices held (EBUSY) until an async teardown.
    return Ring(devices, pool, entries=256, single_issuer=False)


logger = logging.getLogger("ctxkv.store")
DEFAULT_FLUSH_INTERVAL_MS = 100
# I/Os one call keeps in flight on a thread's ring. A get_many or put_many of more parts
# streams through this window, so a deep batch keeps the device busy without a pause
# between rounds; benchmarks set it to fio's iodepth to compare like with like.
DEFAULT_QUEUE_DEPTH = 64
MAX_QUEUE_DEPTH = 256  # the ring's entries (shared_ring)
# A stream of reads (read_iter, get_many, read_many) leases buffers for at most this many
# queue depths of parts beyond the value its caller waits for: enough to keep the queue
# full while the caller works, without one reader taking the whole pool from the others.
READ_AHEAD_DEPTHS = 2


def check_options(durability: str, flush_interval_ms: int, queue_depth: int) -> None:
    if durability not in (STRICT, RELAXED):
        raise ValueError(f"durability is {STRICT!r} or {RELAXED!r}, got {durability!r}")
    if flush_interval_ms <= 0:
        raise ValueError(f"flush_interval_ms must be positive, got {flush_interval_ms}")
    if not 1 <= queue_depth <= MAX_QUEUE_DEPTH:
        raise ValueError(f"queue_depth is 1..{MAX_QUEUE_DEPTH}, got {queue_depth}")


class ValueTooLargeError(CtxkvError, ValueError):
    """The value needs more extents than a value may span, or than the pool holds."""


class ValueLease(Releasable):
    """A value read into pool buffers, lent without a copy until release()."""

    def __init__(
        self, leases: list[Lease], part_bytes: list[int], payload_crcs: list[int] | None = None
    ):
        self._leases = leases
        self.part_bytes = part_bytes
        self.nbytes = sum(part_bytes)
        self._payload_crcs = payload_crcs

    @property
    def views(self) -> list[memoryview]:
        """The value's bytes, one view per extent (payloads, headers excluded)."""
        if not self._leases:
            raise CtxkvError("the value lease was released; its buffers belong to others")
        return [
            lease.memoryview[EXTENT_HEADER_BYTES : EXTENT_HEADER_BYTES + nbytes]
            for lease, nbytes in zip(self._leases, self.part_bytes, strict=True)
        ]

    @property
    def regions(self) -> list[tuple[int, int]]:
        """(address, nbytes) of each part's payload in the pool, for a NIXL peer to read
        or write in place."""
        if not self._leases:
            raise CtxkvError("the value lease was released; its buffers belong to others")
        return [
            (lease.address + EXTENT_HEADER_BYTES, nbytes)
            for lease, nbytes in zip(self._leases, self.part_bytes, strict=True)
        ]

    def payload_crcs(self) -> list[int]:
        """Each part's payload crc32c, as the read computed and its extent header records
        it: only for a lease from read()."""
        if self._payload_crcs is None:
            raise CtxkvError("only a value read from the store carries its payloads' crc32c")
        return self._payload_crcs

    @property
    def memoryview(self) -> memoryview:
        """The whole value as one view; only for values of one extent (see views)."""
        if len(self._leases) != 1:
            raise CtxkvError(f"the value spans {len(self._leases)} extents: use .views")
        return self.views[0]

    @property
    def array(self) -> np.ndarray:
        return np.frombuffer(self.memoryview, dtype=np.uint8)

    def release(self) -> None:
        for lease in self._leases:
            lease.release()
        self._leases = []


class Store(Closeable):
    """Use Store.format(...) or Store.open(...); both return an open store."""

    def __init__(
        self,
        devices: list[Device],
        superblocks: list[Superblock],
        damage: list[Damage],
        *,
        pool_buffers: int | None,
        durability: str = STRICT,
        flush_interval_ms: int = DEFAULT_FLUSH_INTERVAL_MS,
        discard_freed: bool = False,
        ring_factory: RingFactory = shared_ring,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
    ):
        check_options(durability, flush_interval_ms, queue_depth)
        self.durability = durability
        self.queue_depth = queue_depth
        unable = [device.path for device in devices if not device.geometry.discard_supported]
        if discard_freed and unable:
            raise ValueError(f"discard_freed: {', '.join(unable)} cannot discard")
        self.discard_freed = discard_freed
        self._devices = devices
        self._superblocks = superblocks
        self.store_uuid: uuid.UUID = superblocks[0].store_uuid
        self.extent_bytes = superblocks[0].extent_bytes
        self.slot_bytes = self.extent_bytes + EXTENT_HEADER_BYTES
        self.damage = damage
        for problem in damage:
            # The store opens on the good copy; whoever runs it should still hear of this.
            logger.warning("store %s: damaged %s", self.store_uuid, problem)
        if pool_buffers is None:
            pool_buffers = max(
                MIN_POOL_BUFFERS, min(MAX_VALUE_PARTS, DEFAULT_POOL_BYTES // self.slot_bytes)
            )
        self._pool = BufferPool(self.slot_bytes, pool_buffers)
        self._local = threading.local()
        self._ring_factory = ring_factory
        self._rings: list[Ring] = []
        self._rings_lock = threading.Lock()
        self._lock = threading.Lock()  # state, allocation, sequence numbers
        self._closed = False
        self._member_cursor = 0
        self._quotas: Quotas | None = None
        self._counters = dict.fromkeys(
            ("puts", "gets", "hits", "misses", "deletes", "corrupt_reads", "raced_reads",
             "read_errors", "failed_puts", "checkpoints", "bytes_put", "bytes_got",
             "flush_errors", "discard_errors"),
            0)  # fmt: skip
        try:
            self._recover()
            self._discard_freed()
        except BaseException:
            # The caller closes the devices; the rings and the pool are ours to release.
            self._release_memory()
            raise
        self._stop_flusher = threading.Event()
        self._flusher: threading.Thread | None = None
        if durability == RELAXED:
            self._flusher = threading.Thread(
                target=self._flush_periodically, args=(flush_interval_ms / 1000,),
                name="ctxkv-flusher", daemon=True,
            )  # fmt: skip
            self._flusher.start()

    def _flush_periodically(self, interval_s: float) -> None:
        while not self._stop_flusher.wait(interval_s):
            try:
                self._flush(range(len(self._devices)))
            except OSError:
                # A device that cannot flush also fails the next put; keep trying.
                with self._lock:
                    self._counters["flush_errors"] += 1

    # ---- opening and closing -------------------------------------------------------------

    @classmethod
    def format(
        cls,
        targets: Sequence[str | os.PathLike],
        *,
        extent_size: int = DEFAULT_EXTENT_BYTES,
        force: bool = False,
        journal_bytes: int | None = None,
        pool_buffers: int | None = None,
        durability: str = STRICT,
        flush_interval_ms: int = DEFAULT_FLUSH_INTERVAL_MS,
        discard_freed: bool = False,
        io_path: str = AUTO,
        ring_factory: RingFactory = shared_ring,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
    ) -> Store:
        """Makes a new, empty store over targets (in member order) and opens it.

        Refuses targets that hold a filesystem, partition table or store unless force;
        a mounted target is always refused. durability: see STRICT and RELAXED.
        discard_freed: discard (TRIM) the extents of deleted and overwritten values, so
        the device knows they hold nothing; evicted extents are rewritten at once anyway.
        io_path: how I/O reaches NVMe namespaces (engine.nvme.passthru.IO_PATHS).
        queue_depth: I/Os a call keeps in flight (DEFAULT_QUEUE_DEPTH)."""
        check_options(durability, flush_interval_ms, queue_depth)  # before anything is written
        devices = cls._open_devices(targets, io_path)
        try:
            if not force:
                for device in devices:
                    found = existing_contents(device)
                    if found:
                        raise TargetInUseError(
                            f"{device.path} holds {', '.join(found)}; format would destroy it "
                            f"(use force to overwrite)"
                        )
            superblocks = plan_layout(
                [d.geometry.capacity_bytes for d in devices],
                extent_size,
                journal_bytes=journal_bytes,
            )
            write_fresh_store(devices, superblocks)
            return cls(devices, superblocks, [], pool_buffers=pool_buffers,
                       durability=durability, flush_interval_ms=flush_interval_ms,
                       discard_freed=discard_freed, ring_factory=ring_factory,
                       queue_depth=queue_depth)  # fmt: skip
        except BaseException:
            for device in devices:
                device.close()
            raise

    @classmethod
    def open(
        cls,
        targets: Sequence[str | os.PathLike],
        *,
        pool_buffers: int | None = None,
        durability: str = STRICT,
        flush_interval_ms: int = DEFAULT_FLUSH_INTERVAL_MS,
        discard_freed: bool = False,
        io_path: str = AUTO,
        ring_factory: RingFactory = shared_ring,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
    ) -> Store:
        """Opens an existing store; targets in member order. Recovers after a crash."""
        devices = cls._open_devices(targets, io_path)
        try:
            with ring_factory(devices, None) as ring:
                superblocks, damage = read_superblocks(devices, lambda ios: ring.run(ios, depth=8))
            return cls(devices, superblocks, damage, pool_buffers=pool_buffers,
                       durability=durability, flush_interval_ms=flush_interval_ms,
                       discard_freed=discard_freed, ring_factory=ring_factory,
                       queue_depth=queue_depth)  # fmt: skip
        except BaseException:
            for device in devices:
                device.close()
            raise

    @staticmethod
    def _open_devices(targets: Sequence[str | os.PathLike], io_path: str) -> list[Device]:
        if not targets:
            raise ValueError("a store needs at least one target")
        devices: list[Device] = []
        try:
            for target in targets:
                devices.append(Device.open(target, io_path=io_path))
        except BaseException:
            for device in devices:
                device.close()
            raise
        return devices

    def _recover(self) -> None:
        """Newest valid checkpoint, then the journal after it; then a fresh checkpoint."""
        first = self._superblocks[0]
        checkpoint, damage = newest_checkpoint(self._run, self._superblocks)
        for problem in damage:
            logger.warning("store %s: damaged %s", self.store_uuid, problem)
        self.damage.extend(damage)
        self._checkpoint_slot = checkpoint.slot
        self._checkpoint_generation = checkpoint.header.generation
        self._state = StoreState(
            [sb.slot_count for sb in self._superblocks],
            checkpoint.header.log_heads,
            discard_freed=self.discard_freed,
        )
        self._state.load_checkpoint_entries(checkpoint.entries)
        self._next_sequence = checkpoint.header.next_sequence
        tag = store_tag(self.store_uuid)
        last_block = checkpoint.header.journal_sequence - 1
        self.replayed_records = 0
        # Per member, the newest allocation replayed: (sequence, slot of its last part
        # there). Records reach the journal in commit order, which concurrent puts make
        # differ from allocation order; sequence numbers follow allocation order.
        newest: dict[int, tuple[int, int]] = {}
        for block_sequence, records in replay(
            self._run, offset=first.journal_offset, nbytes=first.journal_bytes, tag=tag,
            start_sequence=checkpoint.header.journal_sequence,
        ):  # fmt: skip
            if records is None:
                problem = (
                    "fails its checksum, yet later blocks were written after it was durable: "
                    "its records are lost (their puts read as misses or earlier values)"
                )
                position = (
                    first.journal_offset
                    + ((block_sequence - 1) % (first.journal_bytes // BLOCK_BYTES)) * BLOCK_BYTES
                )
                broken = Damage(f"journal block {block_sequence}", position, 0, problem)
                logger.warning("store %s: damaged %s", self.store_uuid, broken)
                self.damage.append(broken)
                last_block = block_sequence
                continue
            for record in records:
                self._state.apply_record(record)
                self._next_sequence = max(self._next_sequence, record.sequence + 1)
                if record.kind == RECORD_PUT:
                    for member, slot in record.parts:
                        if record.sequence >= newest.get(member, (-1, 0))[0]:
                            newest[member] = (record.sequence, slot)
                self.replayed_records += 1
            last_block = block_sequence
        for member, (sequence, slot) in newest.items():
            # A put allocated before the checkpoint is already behind its log head.
            if sequence >= checkpoint.header.next_sequence:
                log = self._state.logs[member]
                log.head = (slot + 1) % log.slot_count
        block_count = first.journal_bytes // BLOCK_BYTES
        # Skip a whole lap: blocks of a torn batch may lie beyond the tail, valid but never
        # acknowledged, and must never match an expected sequence number (docs/format.md).
        next_block = (
            last_block
            + 1
            + (block_count if last_block >= checkpoint.header.journal_sequence else 0)
        )
        self._journal = Journal(
            self._run, offset=first.journal_offset, nbytes=first.journal_bytes, tag=tag,
            next_sequence=next_block, first_live_sequence=next_block,
            make_room=self.checkpoint, flush=self.durability == STRICT,
        )  # fmt: skip
        if next_block != checkpoint.header.journal_sequence:
            with self._lock:
                self._write_checkpoint()

    def close(self) -> None:
        """Checkpoints (so the next open replays nothing) and releases everything."""
        if self._closed:
            return
        if self._flusher is not None:
            self._stop_flusher.set()
            self._flusher.join()
        try:
            self._flush(range(len(self._devices)))
            if self._journal.live_blocks:
                with self._lock:
                    self._write_checkpoint()
        finally:
            self._closed = True
            self._release_memory()
            self._state.close()
            for device in self._devices:
                device.close()

    def _release_memory(self) -> None:
        with self._rings_lock:
            for ring in self._rings:
                ring.close()
            self._rings.clear()
        self._pool.close()

    # ---- I/O plumbing ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _borrowed_ring(self) -> Iterator[Ring]:
        """One of this thread's rings for one run or stream: threads never contend for a
        ring, and a stream left open (a read_iter the caller has not finished) leaves
        the thread's next operation another ring."""
        idle = getattr(self._local, "idle_rings", None)
        if idle is None:
            idle = self._local.idle_rings = []
        if idle:
            ring = idle.pop()
        else:
            if self._closed:
                raise CtxkvError("the store is closed")
            ring = self._ring_factory(self._devices, self._pool)
            with self._rings_lock:
                self._rings.append(ring)
        try:
            yield ring
        finally:
            idle.append(ring)

    def _run(self, ios: np.ndarray, *, raise_errors: bool = True) -> np.ndarray:
        depth = max(1, min(len(ios), self.queue_depth))
        with self._borrowed_ring() as ring:
            return ring.run(ios, depth=depth, raise_errors=raise_errors)

    def _slot_offset(self, part: Part) -> int:
        member, slot = part
        superblock = self._superblocks[member]
        assert 0 <= slot < superblock.slot_count
        return superblock.extent_area_offset + slot * self.slot_bytes

    def _flush(self, members: Iterable[int]) -> None:
        members = sorted(set(members))
        journal_sequence = self._journal.next_sequence
        ios = Ring.batch(len(members))
        for i, member in enumerate(members):
            ios[i] = (0, 0, 0, UNREGISTERED_BUFFER, member, Op.FSYNC)
        self._run(ios)
        if 0 in members:  # the journal lives on member 0
            self._journal.flushed(journal_sequence)

    def _discard_freed(self) -> None:
        """Discards the slots that deletes and overwrites freed (when discard_freed), then
        lets the allocator have them. Runs after the journal made the change durable."""
        if self._state.to_discard is None:
            return
        with self._lock:
            parts, self._state.to_discard = self._state.to_discard, []
        try:
            for member, slot in parts:
                try:
                    self._devices[member].discard(
                        self._slot_offset((member, slot)), self.slot_bytes
                    )
                except (OSError, CtxkvError) as error:
                    # The change itself is durable; a discard is advice to the device.
                    logger.warning("discard of member %d slot %d failed: %s", member, slot, error)
                    with self._lock:
                        self._counters["discard_errors"] += 1
        finally:
            with self._lock:
                for member, slot in parts:
                    log = self._state.logs[member]
                    if log.state[slot] == WRITING:
                        log.state[slot] = FREE

    def sync(self) -> None:
        """Makes every put acknowledged so far durable: what relaxed durability's flusher
        does on its timer, now. (Strict puts are durable when they return.)"""
        if self._closed:
            raise CtxkvError("the store is closed")
        self._flush(range(len(self._devices)))

    # ---- checkpoints -----------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Writes the index to the other checkpoint slot so the journal can be reused."""
        with self._lock:
            self._write_checkpoint()

    def _write_checkpoint(self) -> None:
        assert self._lock.locked()
        slot = 1 - self._checkpoint_slot
        header = write_checkpoint(
            self._run,
            self._superblocks[0],
            slot,
            generation=self._checkpoint_generation + 1,
            journal_sequence=self._journal.next_sequence,
            next_sequence=self._next_sequence,
            log_heads=tuple(log.head for log in self._state.logs),
            entries=self._state.checkpoint_entries(),
        )
        self._checkpoint_slot = slot
        self._checkpoint_generation = header.generation
        self._journal.first_live_sequence = header.journal_sequence
        self._counters["checkpoints"] += 1

    # ---- writing ---------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes | bytearray | memoryview) -> None:
        """Stores value under key; returns once data and journal record are durable."""
        self.put_many([(key, value)])

    def put_many(self, items: Iterable[tuple[bytes, bytes | bytearray | memoryview]]) -> None:
        """Stores several values, durable together. Each value is copied into pool
        buffers and its writes handed to one ring stream at once, so the device writes
        earlier values (queue_depth extents in flight) while the caller copies later ones;
        once every value is written, one flush and one journal commit make them all
        durable and visible at once, as fio's end_fsync makes a whole job durable. A
        failure leaves none of them visible. A call too large for one journal commit or
        for a quarter of the store is made durable in groups that size, in order: a
        failure then leaves the groups before it stored."""
        values = list(self._checked_values(items))  # every key and size before a write
        # A record fits a journal block, and a part adds at most a put and an eviction.
        record_limit = max(1, self._journal.block_count // 2)
        part_limit = max(1, sum(sb.slot_count for sb in self._superblocks) // 4)
        group: list[Written] = []  # placed since the last durable group
        group_parts = 0
        leases: list[Lease] = []  # the value being copied, until the stream takes them
        ios = Ring.batch(sum(parts for _key, _view, parts in values))
        with (
            self._borrowed_ring() as ring,
            WriteStream(ring, ios, self.queue_depth, self._pool) as writes,
        ):
            placed = 0
            try:
                for key, view, parts in values:
                    if group and (
                        group_parts + parts > part_limit or 2 * (group_parts + parts) > record_limit
                    ):
                        writes.wait_all()
                        done, group, group_parts = merge_written(group), [], 0
                        self._make_durable(done)
                    leases = writes.lease(parts)
                    crcs = self._copy_in(view, leases)
                    written = self._place((key, leases, len(view), crcs))
                    group.append(written)
                    placed += 1
                    group_parts += parts
                    [placement] = written[0]
                    self._fill_writes(placement, writes.next_rows(parts))
                    taken, leases = leases, []
                    writes.hand_over(taken)
                writes.wait_all()
            except BaseException:
                for lease in leases:
                    lease.release()
                writes.close()  # before the slots go back: a write may still be landing
                for placements, _records in group:
                    self._forget_puts(placements)
                with self._lock:
                    self._counters["failed_puts"] += len(values) - placed  # never placed
                raise
        if group:
            self._make_durable(merge_written(group))

    def _checked_values(
        self, items: Iterable[tuple[bytes, bytes | bytearray | memoryview]]
    ) -> Iterator[tuple[bytes, memoryview, int]]:
        """(key, bytes, extents they take) for each item, checking each key and size."""
        for key, value in items:
            self._check_key(key)
            view = memoryview(value).cast("B")
            yield key, view, self._part_count(len(view))

    def _copy_in(self, view: memoryview, leases: list[Lease]) -> list[int]:
        """Copies a value into its leases' payloads; each payload's crc32c, computed on
        the way."""
        crcs = []
        # Released at once: a buffer still exported from a memoryview that a traceback
        # cycle keeps alive crashes CPython's collector when it frees both.
        with ffi.from_buffer(view) as source:
            for part_index, lease in enumerate(leases):
                start = part_index * self.extent_bytes
                nbytes = min(self.extent_bytes, len(view) - start)
                payload = ffi.cast("char *", lease.address + EXTENT_HEADER_BYTES)
                crcs.append(lib.ctxkv_copy_crc32c(payload, source + start, nbytes))
        return crcs

    def reserve(self, nbytes: int) -> ValueLease:
        """Pool buffers to fill with a value of nbytes, then hand to commit(): zero-copy put."""
        leases = self._stage(nbytes)
        part_bytes = [
            min(self.extent_bytes, nbytes - i * self.extent_bytes) for i in range(len(leases))
        ]
        return ValueLease(leases, part_bytes)

    def commit(self, key: bytes, lease: ValueLease, payload_crcs: list[int] | None = None) -> None:
        """Stores the bytes written into a lease from reserve() under key; releases it.
        payload_crcs: each part's crc32c, when the caller has computed them already."""
        try:
            self._check_key(key)
            written = self._place((key, lease._leases, lease.nbytes, payload_crcs))
            try:
                [placement] = written[0]
                ios = Ring.batch(len(lease._leases))
                self._fill_writes(placement, ios)
                self._run(ios)
            except BaseException:
                self._forget_puts(written[0])
                raise
            self._make_durable(written)
        finally:
            lease.release()

    @property
    def pool_leased(self) -> int:
        """Pool buffers lent out now (to puts, reads and callers' leases)."""
        return self._pool.leased

    def pool_regions(self) -> list[tuple[int, int]]:
        """The pool's memory, to register once with a NIXL/RDMA agent (BufferPool.regions)."""
        return self._pool.regions()

    @property
    def pool_buffers(self) -> int:
        """Extent buffers in the pool: what all puts and reads in flight share."""
        return self._pool.count

    def parts_for(self, nbytes: int) -> int:
        """Extents (and pool buffers) a value of nbytes takes; ValueTooLargeError if too many."""
        return self._part_count(nbytes)

    def parts_of(self, key: bytes) -> int | None:
        """Extents the value of key takes now, or None when absent."""
        self._check_key(key)
        with self._lock:
            located = self._state.locate(key_digest(bytes(key)))
        return None if located is None else len(located.parts)

    def _part_count(self, nbytes: int) -> int:
        """Extents a value of nbytes takes; ValueTooLargeError past what one put can hold."""
        part_count = max(1, -(-nbytes // self.extent_bytes))
        limit = min(MAX_VALUE_PARTS, self._pool.count)
        if part_count > limit:
            raise ValueTooLargeError(
                f"a value of {nbytes} bytes needs {part_count} extents of {self.extent_bytes} "
                f"bytes; at most {limit} fit (the lesser of extents per value and pool buffers)"
            )
        return part_count

    def _stage(self, nbytes: int) -> list[Lease]:
        if self._closed:
            raise CtxkvError("the store is closed")
        return self._pool.lease_many(self._part_count(nbytes), timeout=None)

    def _check_key(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray):
            raise TypeError(f"keys are bytes, got {type(key).__name__}")
        if not 0 < len(key) <= MAX_KEY_BYTES:
            raise ValueError(f"keys are 1..{MAX_KEY_BYTES} bytes, got {len(key)}")
        if self._closed:
            raise CtxkvError("the store is closed")

    def _place(self, staged: Staged) -> Written:
        """Allocates slots for a staged value: nothing is visible until _make_durable
        journals it. Evicts (and records the evictions) to make room."""
        key, leases, nbytes, crcs = staged
        digest = key_digest(bytes(key))
        records: list[Record] = []
        with self._lock:
            sequence = self._next_sequence
            self._next_sequence += 1
            parts: list[Part] = []
            try:
                for _ in leases:
                    part, eviction = self._allocate(digest)
                    parts.append(part)
                    if eviction is not None:
                        self._state.apply_evict(eviction)
                        records.append(self._evict_record(eviction))
            except StoreFullError:
                for member, slot in parts:
                    self._state.logs[member].release(slot)
                raise
        return [(key, digest, sequence, nbytes, leases, tuple(parts), crcs)], records

    def _fill_writes(self, placement: tuple, ios: np.ndarray) -> None:
        """Seals each part's extent header into its buffer and describes its write in ios."""
        key, digest, sequence, nbytes, leases, parts, crcs = placement
        assert len(ios) == len(leases) == len(parts)
        for part_index, (lease, part) in enumerate(zip(leases, parts, strict=True)):
            payload_bytes = self._payload_bytes(nbytes, part_index)
            if crcs is None:
                payload = ffi.cast("char *", lease.address + EXTENT_HEADER_BYTES)
                payload_crc = lib.ctxkv_crc32c(0, payload, payload_bytes)
            else:
                payload_crc = crcs[part_index]
            header = ExtentHeader(
                self.store_uuid, sequence, nbytes, payload_bytes, payload_crc,
                part_index, len(parts), digest, bytes(key),
            )  # fmt: skip
            lease.memoryview[:EXTENT_HEADER_BYTES] = header.pack()
            write_bytes = EXTENT_HEADER_BYTES + round_up(payload_bytes, BLOCK_BYTES)
            ios[part_index] = (
                self._slot_offset(part), lease.address, write_bytes, lease.index, part[0], Op.WRITE,
            )  # fmt: skip

    def _make_durable(self, written: Written) -> None:
        """Flushes what was written for placements (strict), then journals them, making
        them visible."""
        placements, records = written
        try:
            if self.durability == STRICT:
                self._flush(part[0] for p in placements for part in p[5])
            for _key, digest, sequence, nbytes, _leases, parts, _crcs in placements:
                records.append(Record(RECORD_PUT, digest, sequence, nbytes, parts))

            def apply() -> None:
                with self._lock:
                    for _key, digest, sequence, nbytes, _leases, parts, _crcs in placements:
                        self._state.apply_put(digest, sequence, nbytes, parts)
                        self._counters["puts"] += 1
                        self._counters["bytes_put"] += nbytes

            self._journal.commit(records, apply)
        except BaseException:
            self._forget_puts(placements)
            raise
        self._discard_freed()

    def _forget_puts(self, placements: list[tuple]) -> None:
        """The write, the flush or the journal failed: these puts are not visible and
        their slots go back to the allocator (the evictions that made room stay done)."""
        with self._lock:
            for *_, parts, _crcs in placements:
                for member, slot in parts:
                    self._state.logs[member].release(slot)
            self._counters["failed_puts"] += len(placements)

    def _allocate(self, digest: bytes) -> tuple[Part, Eviction | None]:
        """A slot on the next member in turn, or on the one after it when every slot of
        that one is pinned or being written."""
        assert self._lock.locked()
        if self._quotas is not None:
            return self._allocate_claimed(digest, self._quotas)
        for _ in range(len(self._devices)):
            member = self._member_cursor % len(self._devices)
            self._member_cursor += 1
            try:
                slot, eviction = self._state.logs[member].allocate(self._state.keep_on_lap)
            except StoreFullError:
                continue
            return (member, slot), eviction
        raise StoreFullError(
            f"every slot of all {len(self._devices)} members is pinned or being written"
        )

    def _allocate_claimed(self, digest: bytes, quotas: Quotas) -> tuple[Part, Eviction | None]:
        """_allocate under tenant quotas: only a slot the put's claim allows, on the next
        member in turn that has one; failing that, the tenant's own oldest value."""
        first = claim = quotas.claim(digest)
        while claim is not None:
            for _ in range(len(self._devices)):
                member = self._member_cursor % len(self._devices)
                self._member_cursor += 1
                log = self._state.logs[member]
                try:
                    slot, eviction = log.allocate_claimed(self._state.keep_on_lap, claim, digest)
                except StoreFullError:
                    continue
                if eviction is not None:
                    quotas.count_eviction(eviction.digest)
                return (member, slot), eviction
            claim = quotas.fallback(claim)
        raise StoreFullError(quotas.full_message(first))

    def enforce_quotas(self, quota_bytes: dict[str, int]) -> Quotas:
        """From now on each named tenant's values (engine.tenants.keys) take at most its
        quota and no other tenant's put evicts them (engine.tenants.quotas). QuotaError
        when the quotas add up to more than the store holds."""
        with self._lock:
            counts = self._state.counts()
            quotas = Quotas(
                quota_bytes, self.extent_bytes, counts["slots"] - counts["slots_quarantined"]
            )
            quotas.attach(self._state.logs)
            self._quotas = quotas
        return quotas

    def _evict_record(self, eviction: Eviction) -> Record:
        return Record(
            RECORD_EVICT,
            eviction.digest,
            eviction.sequence,
            parts=((eviction.member, eviction.slot),),
        )

    def delete(self, key: bytes) -> bool:
        """Removes key; True if it was there."""
        return self._journal_key_change(key, RECORD_DELETE, self._state.apply_delete)

    def pin(self, key: bytes) -> bool:
        """Keeps key from eviction until unpin; True if the key is present."""
        return self._journal_key_change(key, RECORD_PIN, lambda d: self._state.apply_pin(d, True))

    def unpin(self, key: bytes) -> bool:
        return self._journal_key_change(
            key, RECORD_UNPIN, lambda d: self._state.apply_pin(d, False)
        )

    def _journal_key_change(self, key: bytes, kind: int, change: Callable[[bytes], bool]) -> bool:
        """Journals a DELETE, PIN or UNPIN of key, then applies it; False if key is absent."""
        self._check_key(key)
        digest = key_digest(bytes(key))
        with self._lock:
            if self._state.locate(digest) is None:
                return False
            sequence = self._next_sequence
            self._next_sequence += 1
        outcome = []

        def apply() -> None:
            with self._lock:
                outcome.append(change(digest))
                if kind == RECORD_DELETE:
                    self._counters["deletes"] += 1

        self._journal.commit([Record(kind, digest, sequence)], apply)
        self._discard_freed()
        return bool(outcome[0])

    # ---- reading ---------------------------------------------------------------------------

    def __contains__(self, key: bytes) -> bool:
        digest = key_digest(bytes(key))
        with self._lock:
            return self._state.locate(digest) is not None

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are present: the prefix-cache lookup, one batched probe."""
        if not keys:
            return 0
        with self._lock:
            found, _locations, _metas = self._state.index.lookup_many(key_digests(list(keys)))
        missing = np.flatnonzero(~found)
        return int(missing[0]) if len(missing) else len(keys)

    def read(self, key: bytes) -> ValueLease | None:
        """The value in pool buffers, verified, without a copy; release() it when done."""
        [lease] = self.read_many([key])
        return lease

    def read_many(self, keys: Sequence[bytes]) -> list[ValueLease | None]:
        """read() for many keys, all parts read in parallel; release every lease. The
        leases are held at once, so they must fit in the pool (get_many has no limit)."""
        plans = self._plan_reads(keys)
        needed = sum(len(plan[2].parts) for plan in plans if plan)
        if needed > self._pool.count:
            raise ValueTooLargeError(
                f"read_many would hold {needed} pool buffers at once but the pool has "
                f"{self._pool.count}: read fewer keys at a time, or use read_iter or get_many"
            )
        results: list[ValueLease | None] = []
        try:
            with contextlib.closing(self._read_stream(plans)) as leases:
                results.extend(leases)
        except BaseException:
            for lease in results:
                if lease is not None:
                    lease.release()
            raise
        return results

    def read_iter(self, keys: Sequence[bytes]) -> Iterator[ValueLease | None]:
        """read() for each key, in order, as one stream: queue_depth parts in flight and
        the next values read ahead while the caller works on earlier ones, so a long
        prefix streams at the device's speed with no pause between batches. Release each
        lease when done with it: a caller holding so many that the next value's parts no
        longer fit in the pool gets ValueTooLargeError rather than a wait with no end.
        Closing the iterator early releases what it read ahead."""
        return self._read_stream(self._plan_reads(keys))

    def get(self, key: bytes) -> bytes | None:
        [value] = self.get_many([key])
        return value

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values (or None) for keys, streamed as read_iter reads them: each value is
        copied out and its buffers released before the next is taken."""
        values: list[bytes | None] = []
        with contextlib.closing(self._read_stream(self._plan_reads(keys))) as leases:
            for lease in leases:
                if lease is None:
                    values.append(None)
                    continue
                with lease:
                    values.append(b"".join(lease.views))  # one copy, however many parts
        return values

    def get_into(self, key: bytes, buffer: bytearray | memoryview | np.ndarray) -> int | None:
        """Copies the value into buffer; its length, or None on a miss. ValueError if
        buffer is too small (nothing is copied then)."""
        lease = self.read(key)
        if lease is None:
            return None
        with lease:
            target = memoryview(buffer).cast("B")
            if len(target) < lease.nbytes:
                raise ValueError(
                    f"buffer of {len(target)} bytes is too small for a value of {lease.nbytes}"
                )
            offset = 0
            for view in lease.views:
                target[offset : offset + len(view)] = view
                offset += len(view)
            return lease.nbytes

    def _plan_reads(self, keys: Sequence[bytes]) -> list[tuple[bytes, bytes, Located] | None]:
        for key in keys:
            self._check_key(key)
        keys = [bytes(key) for key in keys]
        digests = [key_digest(key) for key in keys]
        with self._lock:
            located = self._state.locate_many(digests, mark_referenced=True)
            self._counters["gets"] += len(keys)
        return [
            (key, digest, where) if where else None
            for key, digest, where in zip(keys, digests, located, strict=True)
        ]

    def _read_stream(
        self, plans: list[tuple[bytes, bytes, Located] | None]
    ) -> Iterator[ValueLease | None]:
        """The verified values of plans, in order, read through one ring stream. Checks
        that every value fits in the pool before the first read."""
        parts = self._parts_that_fit(plans)
        return self._verified_values(plans, parts)

    def _parts_that_fit(self, plans: list[tuple[bytes | None, bytes, Located] | None]) -> list[int]:
        parts = [len(plan[2].parts) if plan else 0 for plan in plans]
        for plan, count in zip(plans, parts, strict=True):
            if count > self._pool.count:
                what = repr(plan[0]) if plan[0] is not None else f"digest {plan[1].hex()}"
                raise ValueTooLargeError(
                    f"the value of {what} spans {count} extents but the pool holds "
                    f"{self._pool.count} buffers: open the store with more pool_buffers"
                )
        return parts

    def _verified_values(
        self, plans: list[tuple[bytes, bytes, Located] | None], parts: list[int]
    ) -> Iterator[ValueLease | None]:
        with contextlib.closing(self._stream_extents(plans, parts)) as extents:
            for plan, (leases, crcs, failures) in zip(plans, extents, strict=True):
                yield self._finish_read(plan, leases, crcs, failures)

    def _stream_extents(
        self, plans: list[tuple[bytes | None, bytes, Located] | None], parts: list[int]
    ) -> Iterator[tuple[list[Lease], list[int], list[str | None]]]:
        """Each plan's extents read into leased buffers through one ring stream, in order:
        (buffers, payload CRCs, why each read failed or None). The buffers are the
        caller's from then on, to release."""
        first_row = list(itertools.accumulate(parts, initial=0))  # value k: rows [k, k+1)
        ios = Ring.batch(first_row[-1])
        leases: list[list[Lease]] = [[] for _ in plans]
        handed_out: list[Lease] = []  # to tell what the caller still holds
        filled = 0  # values whose rows are filled in, their buffers leased
        with self._borrowed_ring() as ring:
            stream = ring.stream(ios, depth=self.queue_depth)
            try:
                for k in range(len(plans)):
                    filled = self._fill_reads(
                        plans, parts, first_row, ios, leases, filled, k, handed_out
                    )
                    rows = slice(first_row[k], first_row[k + 1])
                    stream.advance(first_row[filled], rows.stop)
                    crcs, failures = self._outcomes(ios[rows], stream.results[rows])
                    value_leases, leases[k] = leases[k], []
                    handed_out.extend(value_leases)
                    yield value_leases, crcs, failures
            finally:
                stream.finish()  # first: the kernel may still be reading into buffers
                for value_leases in leases:
                    for lease in value_leases:
                        lease.release()

    def _fill_reads(
        self,
        plans: list[tuple[bytes, bytes, Located] | None],
        parts: list[int],
        first_row: list[int],
        ios: np.ndarray,
        leases: list[list[Lease]],
        filled: int,
        wanted: int,
        handed_out: list[Lease],
    ) -> int:
        """Leases buffers for and fills in the rows of the values after the first
        `filled`, as far as the read-ahead window and free buffers allow; value `wanted`
        (the caller's next) even if that means waiting for buffers. Returns the new filled."""
        window = max(1, min(self._pool.count, READ_AHEAD_DEPTHS * self.queue_depth))
        while filled < len(plans):
            count = parts[filled]
            if filled > wanted and first_row[filled] + count - first_row[wanted] > window:
                break
            if count:
                try:
                    got = self._pool.lease_many(count, timeout=0)
                except PoolExhaustedError:
                    if filled > wanted:
                        break  # read ahead later, when buffers come back
                    handed_out[:] = [lease for lease in handed_out if not lease.released]
                    held = len(handed_out)
                    if held + count > self._pool.count:
                        raise ValueTooLargeError(
                            f"the next value needs {count} pool buffers but this reader still "
                            f"holds {held} of the pool's {self._pool.count}: release values "
                            f"before taking more"
                        ) from None
                    got = self._pool.lease_many(count, timeout=None)
                located = plans[filled][2]
                for part_index, (lease, part) in enumerate(zip(got, located.parts, strict=True)):
                    payload_bytes = self._payload_bytes(located.value_bytes, part_index)
                    read_bytes = EXTENT_HEADER_BYTES + round_up(payload_bytes, BLOCK_BYTES)
                    ios[first_row[filled] + part_index] = (
                        self._slot_offset(part), lease.address, read_bytes, lease.index,
                        part[0], READ_EXTENT,
                    )  # fmt: skip
                leases[filled] = got
            filled += 1
        return filled

    def _finish_read(
        self,
        plan: tuple[bytes, bytes, Located] | None,
        part_leases: list[Lease],
        crcs: list[int],
        failures: list[str | None],
    ) -> ValueLease | None:
        """The value read into part_leases, verified; or None (its buffers given back)."""
        value = None
        try:
            if plan is not None:
                value = self._verify(plan, part_leases, crcs, failures)
        finally:
            if value is None:
                for lease in part_leases:
                    lease.release()
        with self._lock:
            if value is None:
                self._counters["misses"] += 1
            else:
                self._counters["hits"] += 1
                self._counters["bytes_got"] += value.nbytes
        return value

    def _outcomes(self, ios: np.ndarray, done: np.ndarray) -> tuple[list[int], list[str | None]]:
        """Each READ_EXTENT's payload CRC, and why it failed (None if it did not)."""
        failures: list[str | None] = []
        for wanted, result in zip(ios["nbytes"].tolist(), done["result"].tolist(), strict=True):
            if result < 0:
                failures.append(f"read failed: {os.strerror(-result)}")
            elif result != wanted:
                failures.append(f"short read: {result} of {wanted} bytes")
            else:
                failures.append(None)
        return done["payload_crc32c"].tolist(), failures

    def _payload_bytes(self, value_bytes: int, part_index: int) -> int:
        return min(self.extent_bytes, value_bytes - part_index * self.extent_bytes)

    def _verify(
        self,
        plan: tuple[bytes, bytes, Located],
        leases: list[Lease],
        crcs: list[int],
        failures: list[str | None],
    ) -> ValueLease | None:
        """Checks every part against its header and checksum; a ValueLease or None."""
        key, digest, located = plan
        part_bytes, problem = self._inspect(digest, located, leases, crcs, failures, key)
        if problem is None:
            return ValueLease(leases, part_bytes, crcs)
        part, _reason = problem
        if part is None:
            # Parts of two different puts of this key: a read raced an overwrite.
            with self._lock:
                self._counters["raced_reads"] += 1
            return None
        failed_read = failures[located.parts.index(part)] is not None
        return self._reject(digest, part, "read_errors" if failed_read else "corrupt_reads")

    def _inspect(
        self,
        digest: bytes,
        located: Located,
        leases: list[Lease],
        crcs: list[int],
        failures: list[str | None],
        key: bytes | None,
    ) -> tuple[list[int], tuple[Part | None, str] | None]:
        """(payload bytes per part, None) when the value read into leases is intact, else
        ([], (the bad part or None when the parts disagree, what is wrong)). crcs are the
        payload checksums the reads computed (READ_EXTENT), failures why a read failed.
        With key None the header's key is checked against the digest instead."""
        sequences = set()
        part_bytes = []
        parts = zip(leases, located.parts, crcs, failures, strict=True)
        for part_index, (lease, part, payload_crc, failure) in enumerate(parts):
            if failure is not None:
                return [], (part, failure)
            view = lease.memoryview
            try:
                header = ExtentHeader.unpack(view[:EXTENT_HEADER_BYTES], "extent header")
            except LayoutError as error:
                return [], (part, str(error))
            expected = {
                "store": (header.store_uuid, self.store_uuid),
                "key digest": (header.key_digest, digest),
                "key": (header.key if key is not None else key_digest(header.key), key or digest),
                "part": ((header.part_index, header.part_count), (part_index, len(located.parts))),
                "value bytes": (header.value_bytes, located.value_bytes),
                "payload bytes": (
                    header.payload_bytes,
                    self._payload_bytes(located.value_bytes, part_index),
                ),
            }
            for what, (found, wanted) in expected.items():
                if found != wanted:
                    return [], (part, f"{what} in the extent header does not match the index")
            if payload_crc != header.payload_crc32c:
                return [], (part, "payload fails its crc32c")
            sequences.add(header.sequence)
            part_bytes.append(header.payload_bytes)
        if len(sequences) != 1:
            return [], (None, f"parts carry different put sequences {sorted(sequences)}")
        return part_bytes, None

    def _reject(self, digest: bytes, part: Part, counter: str) -> None:
        """A part that fails verification or whose read failed: a race with an overwrite
        (the index moved on) or damage (quarantine the slot, drop the value)."""
        with self._lock:
            located = self._state.locate(digest)
            if located is None or part not in located.parts:
                self._counters["raced_reads"] += 1
                return None
            self._state.quarantine(digest, part)
            self._counters[counter] += 1
        return None

    def verify_all(
        self, on_progress: Callable[[str, int, int], None] | None = None
    ) -> tuple[int, int, list[dict]]:
        """Reads and checks every live value, reporting (not repairing) what is wrong:
        (values checked, extents checked, problems with their location)."""
        with self._lock:
            values = [
                (log.digest[slot].tobytes(), self._state.locate(log.digest[slot].tobytes()))
                for log in self._state.logs
                for slot in log.live_slots()
                if log.part_index[slot] == 0
            ]
        plans = [(None, digest, located) for digest, located in values if located is not None]
        problems, extents = [], 0
        with contextlib.closing(self._stream_extents(plans, self._parts_that_fit(plans))) as reads:
            for done, (plan, (leases, crcs, failures)) in enumerate(
                zip(plans, reads, strict=True), 1
            ):
                _none, digest, located = plan
                try:
                    _sizes, problem = self._inspect(
                        digest, located, leases, crcs, failures, key=None
                    )
                finally:
                    for lease in leases:
                        lease.release()
                extents += len(located.parts)
                if problem is not None:
                    part, reason = problem
                    member, slot = part if part is not None else located.parts[0]
                    problems.append({
                        "where": f"extent member {member} slot {slot}",
                        "member": member,
                        "slot": slot,
                        "offset": self._slot_offset((member, slot)),
                        "key_digest": digest.hex(),
                        "problem": reason,
                    })  # fmt: skip
                if on_progress is not None:
                    on_progress("checking extents", done, len(plans))
        return len(plans), extents, problems

    def keys(self, batch_slots: int = 256) -> Iterator[bytes]:
        """Every key in the store. The index holds only digests, so this reads the extent
        header of each value's first part: a tool's operation, not a hot path."""
        with self._lock:
            firsts = [
                (log.member, int(slot), log.digest[slot].tobytes())
                for log in self._state.logs
                for slot in log.live_slots()
                if log.part_index[slot] == 0
            ]
        buffer = aligned_array(batch_slots * EXTENT_HEADER_BYTES)
        for start in range(0, len(firsts), batch_slots):
            chunk = firsts[start : start + batch_slots]
            ios = Ring.batch(len(chunk))
            for i, (member, slot, _digest) in enumerate(chunk):
                address = buffer.ctypes.data + i * EXTENT_HEADER_BYTES
                offset = self._slot_offset((member, slot))
                ios[i] = (
                    offset,
                    address,
                    EXTENT_HEADER_BYTES,
                    UNREGISTERED_BUFFER,
                    member,
                    Op.READ,
                )
            self._run(ios)
            for i, (_member, _slot, digest) in enumerate(chunk):
                block = buffer[i * EXTENT_HEADER_BYTES : (i + 1) * EXTENT_HEADER_BYTES].tobytes()
                try:
                    header = ExtentHeader.unpack(block)
                except LayoutError:
                    continue  # damaged: scrub reports it, a listing just skips it
                if header.key_digest == digest and key_digest(header.key) == digest:
                    yield header.key

    # ---- reporting -------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        with self._lock:
            counts = self._state.counts()
        return {
            "store_uuid": str(self.store_uuid),
            "members": [device.path for device in self._devices],
            "extent_bytes": self.extent_bytes,
            "capacity_bytes": counts["slots"] * self.extent_bytes,
            **counts,
            **self._counters,
            "journal_live_blocks": self._journal.live_blocks,
            "journal_blocks": self._journal.block_count,
            "journal_commits": self._journal.commits,
            "replayed_records": self.replayed_records,
            "index_bytes": self._state.index.memory_bytes,
            "durability": self.durability,
            "pool_backing": self._pool.backing,
            "damage": [str(d) for d in self.damage],
        }
