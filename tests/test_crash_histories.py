"""Simulated power loss beneath a real store (tests/fault_device.py), checked against the
crash model (tests/crash_model.py):

- exhaustive short histories: every sequence of up to EXHAUSTIVE_LENGTH ops from put /
  overwrite / delete / pin / eviction / checkpoint, crashed at every flush point of each;
- random histories: one seed picks the store (members, size, durability), the ops, the
  device errors, the crash point and the fate of every unflushed write; a third of them
  crash again during recovery, and about a third run two tenants' keys under quotas
  (engine/tenants), so the promises are held with quota-driven evictions too.

`make test` runs a quick slice; `make test-crash` the long one (CTXKV_CRASH_SEEDS=2000,
CTXKV_CRASH_EXHAUSTIVE_LENGTH=3). A failure names its seed: CTXKV_CRASH_ONLY_SEED=N
replays it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import zlib
from pathlib import Path

import pytest
from crash_model import Model, Tally
from fault_device import FaultInjectionTestDevice

from engine.alloc.log import StoreFullError
from engine.errors import CtxkvError
from engine.store.format import METADATA_START, MIN_JOURNAL_BYTES
from engine.store.layout import BLOCK_BYTES, EXTENT_HEADER_BYTES
from engine.store.store import RELAXED, STRICT, Store
from engine.tenants.keys import tenant_prefix

KIB, MIB = 1 << 10, 1 << 20
EXTENT = 64 * KIB
SLOT = EXTENT + EXTENT_HEADER_BYTES
SEEDS = int(os.environ.get("CTXKV_CRASH_SEEDS", "100"))
EXHAUSTIVE_LENGTH = int(os.environ.get("CTXKV_CRASH_EXHAUSTIVE_LENGTH", "2"))
ONLY_SEED = os.environ.get("CTXKV_CRASH_ONLY_SEED")
# Metadata of member 0: journal (the minimum) and two checkpoints of 1 MiB each.
MEMBER0_OVERHEAD = METADATA_START + MIN_JOURNAL_BYTES + 2 * MIB
POOL_BUFFERS = 8
FAILURES = (OSError, CtxkvError)


def member_bytes(member: int, slots: int) -> int:
    overhead = MEMBER0_OVERHEAD if member == 0 else METADATA_START
    return overhead + slots * SLOT + BLOCK_BYTES  # the last block holds superblock B


def value_for(rng: random.Random, max_parts: int) -> bytes:
    size = rng.choice(
        [1, 4095, 4097, EXTENT - 1, EXTENT, EXTENT + 1, rng.randint(1, max_parts * EXTENT)]
    )
    return rng.randbytes(min(size, max_parts * EXTENT))


class Template:
    """A formatted store copied fresh for each history (formatting each time is slow)."""

    def __init__(self, directory: Path, name: str, slots: list[int], durability: str):
        self.directory = directory
        self.durability = durability
        self.paths = [str(directory / f"{name}-{m}.img") for m in range(len(slots))]
        for path, (member, count) in zip(self.paths, enumerate(slots), strict=True):
            with open(path, "wb") as file:
                file.truncate(member_bytes(member, count))
        Store.format(self.paths, extent_size=EXTENT, pool_buffers=POOL_BUFFERS).close()

    def copy(self, run: Path) -> list[str]:
        run.mkdir(exist_ok=True)
        targets = []
        for path in self.paths:
            target = str(run / os.path.basename(path))
            shutil.copyfile(path, target)
            # Written back now, so the store's O_DIRECT reads never wait on dirty pages.
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            targets.append(target)
        return targets


def open_store(targets: list[str], durability: str, device: FaultInjectionTestDevice | None):
    kwargs = {"ring_factory": device.ring_factory} if device else {}
    # Relaxed: no flusher on a timer, so a seed replays exactly; histories call sync().
    return Store.open(
        targets, pool_buffers=POOL_BUFFERS, durability=durability,
        flush_interval_ms=1 << 40, **kwargs,
    )  # fmt: skip


class History:
    """Runs ops on a store under a fault device, keeping the model in step."""

    def __init__(self, store: Store, device: FaultInjectionTestDevice, model: Model):
        self.store, self.device, self.model = store, device, model
        self.fill_prefix = b""  # what evict()'s fill keys start with: a tenant's prefix
        self.quota_bytes: dict[str, int] = {}  # the tenants' quotas, if the history has them

    def put(self, key: bytes, value: bytes) -> None:
        was_present = key in self.store
        self.model.before_put(key, value)
        try:
            self.store.put(key, value)
        except FAILURES:
            self.model.put_failed(key, value, device_up=not self.device.crashed)
            return
        self.model.put_acknowledged(key, value, was_present=was_present)

    def delete(self, key: bytes) -> None:
        self.model.before_key_op(key)
        try:
            existed = self.store.delete(key)
        except FAILURES:
            return
        self.model.delete_acknowledged(key, existed)

    def pin(self, key: bytes, pinned: bool = True) -> None:
        self.model.before_key_op(key, pin=True)
        try:
            existed = self.store.pin(key) if pinned else self.store.unpin(key)
        except FAILURES:
            return
        self.model.pin_acknowledged(key, pinned, existed)

    def checkpoint(self) -> None:
        with contextlib.suppress(FAILURES):
            self.store.checkpoint()

    def sync(self) -> None:
        try:
            self.store.sync()
        except FAILURES:
            return
        self.model.synced()

    def get(self, key: bytes) -> None:
        try:
            value = self.store.get(key)
        except FAILURES:
            return
        assert value is None or value in self.model.attempted[key], key

    def evict(self, rng: random.Random, fresh_keys: itertools.count) -> None:
        """Puts new values until the store evicts one (bounded by its slot count)."""
        evictions = self.store.stats()["evictions"]
        for _ in range(self.store.stats()["slots"] + 1):
            self.put(self.fill_prefix + f"fill-{next(fresh_keys)}".encode(), value_for(rng, 1))
            if self.device.crashed or self.store.stats()["evictions"] > evictions:
                return


def crash_and_recover(
    history: History, targets: list[str], label: str, second_crash_at_io: int | None = None
) -> Tally:
    """Crashes (if the history has not), settles the unflushed writes, recovers and checks."""
    store, device, model = history.store, history.device, history.model
    device.crashed = True
    must, absent, pins = model.expectations(store)
    with contextlib.suppress(FAILURES):  # the power is out: close cannot flush or checkpoint
        store.close()
    device.power_loss()
    tally = Tally(histories=1, crashes=1, injected_errors=device.injected_errors)
    if second_crash_at_io is not None:
        # Power fails again while recovery writes its checkpoint.
        again = FaultInjectionTestDevice(seed=device.seed + 1, crash_at_io=second_crash_at_io)
        try:
            recovering = open_store(targets, model.durability, again)
        except FAILURES:
            recovering = None
        again.crashed = True
        if recovering is not None:
            with contextlib.suppress(FAILURES):
                recovering.close()
        again.power_loss()
        tally.crashes += 1
    try:
        store = open_store(targets, model.durability, None)
    except FAILURES as error:
        tally.recovery_failures += 1
        tally.failures.append(f"{label}: recovery failed: {error!r}")
        return tally
    with store:
        if history.quota_bytes:
            # Before the reads, which may quarantine torn extents and shrink the store.
            # Usage is recounted from the recovered slots: no tenant is over its quota,
            # unless a put failed with a device error after evicting (docs/guarantees.md).
            quotas = store.enforce_quotas(history.quota_bytes)
            for name in history.quota_bytes:
                report = quotas.report(name)
                if report["used_bytes"] > report["quota_bytes"] and not any(model.failed.values()):
                    tally.failures.append(f"{label}: tenant {name} over its quota: {report}")
        tally.add(model.check(store, must, absent, pins, label))
        # A power loss tears only unflushed writes: a torn checkpoint slot is expected,
        # a damaged journal block (one durable once) never.
        false_alarms = [str(d) for d in store.damage if d.where.startswith("journal")]
        if false_alarms:
            tally.failures.append(f"{label}: journal damage reported after a crash: {false_alarms}")
        # The recovered store takes new writes, unless pins hold every slot of a member.
        try:
            store.put(b"after-recovery", b"x" * 5000)
        except StoreFullError:
            assert store.stats()["slots_free"] == 0, label
        else:
            assert store.get(b"after-recovery") == b"x" * 5000, label
    return tally


# ---- exhaustive short histories ------------------------------------------------------------

OPS = ("put", "overwrite", "delete", "pin", "evict", "checkpoint")
BASE_KEYS = [f"base-{i}".encode() for i in range(4)]


def run_exhaustive(template: Template, run_dir: Path, ops: tuple[str, ...], crash_at_flush):
    """Runs ops on a store holding BASE_KEYS; returns the device (its flush count)."""
    targets = template.copy(run_dir)
    # The values depend on the ops alone, so every crash point replays the same history;
    # the fates of the unflushed writes depend on the crash point too.
    rng = random.Random(zlib.crc32(repr(ops).encode()))
    seed = zlib.crc32(repr((ops, crash_at_flush)).encode())
    device = FaultInjectionTestDevice(seed=seed, crash_at_flush=crash_at_flush)
    model = Model(STRICT)
    store = open_store(targets, STRICT, None)
    try:
        for key in BASE_KEYS:  # before the device: these are on disk, flushed
            value = rng.randbytes(rng.randint(1, EXTENT))
            model.before_put(key, value)
            store.put(key, value)
            model.put_acknowledged(key, value, was_present=False)
    finally:
        store.close()
    history = History(open_store(targets, STRICT, device), device, model)
    fresh = itertools.count()
    for op in ops:
        if device.crashed:
            break
        if op == "put":
            history.put(f"new-{next(fresh)}".encode(), value_for(rng, 2))
        elif op == "overwrite":
            history.put(BASE_KEYS[1], value_for(rng, 2))
        elif op == "delete":
            history.delete(BASE_KEYS[2])
        elif op == "pin":
            history.pin(BASE_KEYS[0])
        elif op == "evict":
            history.evict(rng, fresh)
        else:
            history.checkpoint()
    return history, targets


def exhaustive_histories(length: int) -> list[tuple[str, ...]]:
    return [ops for n in range(1, length + 1) for ops in itertools.product(OPS, repeat=n)]


def test_every_short_history_crashed_at_every_flush_point(tmp_path):
    template = Template(tmp_path, "exhaustive", [8], STRICT)
    total = Tally()
    histories = exhaustive_histories(EXHAUSTIVE_LENGTH)
    for ops in histories:
        # A dry run counts the history's flush points; then one crash at each.
        history, _targets = run_exhaustive(template, tmp_path / "run", ops, None)
        flush_points = history.device.flushes
        history.store.close()
        assert flush_points >= 1, ops
        for point in range(flush_points):
            history, targets = run_exhaustive(template, tmp_path / "run", ops, point)
            assert history.device.crashed, (ops, point)
            total.add(crash_and_recover(history, targets, f"{'/'.join(ops)} @flush {point}"))
    print(
        f"\nexhaustive: {len(histories)} histories of up to {EXHAUSTIVE_LENGTH} ops, {total.line()}"
    )
    assert not total.failures, total.failures[:20]
    assert total.lost == total.wrong_bytes == total.resurrected == 0
    assert total.crashes >= len(histories)


# ---- random histories ------------------------------------------------------------------

KEYS = [f"key-{i}".encode() for i in range(10)]


def random_history(seed: int, templates: dict, run_dir: Path) -> Tally:
    rng = random.Random(seed)
    template = templates[(rng.randrange(len(templates) // 2), rng.random() < 0.25)]
    targets = template.copy(run_dir)
    faults = random.Random(seed ^ 0x5EED)
    fail_rate = 0.04 if rng.random() < 0.25 else 0.0
    op_count = rng.randint(3, 24)
    device = FaultInjectionTestDevice(seed=seed)
    model = Model(template.durability)
    history = History(open_store(targets, template.durability, device), device, model)
    # Faults from here on: the history's ops, not the opening, are under test here.
    if rng.random() < 0.5:
        device.crash_at_flush = device.flushes + rng.randrange(3 * op_count)
    device.crash_at_io = device.ios + rng.randrange(8 * op_count)
    if fail_rate:
        device.fail_io = lambda *_: faults.random() < fail_rate
    # Its own generator, so the other seeds' histories stay what they were.
    tenancy = random.Random(seed ^ 0x7E4A47)
    prefixes = [b""]
    if tenancy.random() < 0.3:
        slots = history.store.stats()["slots"]
        history.quota_bytes = {"a": slots // 2 * EXTENT, "b": (slots + 1) // 2 * EXTENT}
        history.store.enforce_quotas(history.quota_bytes)
        prefixes = [tenant_prefix("a"), tenant_prefix("b")]
        history.fill_prefix = prefixes[0]
    fresh = itertools.count()
    for _ in range(op_count):
        if device.crashed:
            break
        op = rng.choices(
            ["put", "delete", "pin", "unpin", "checkpoint", "sync", "get", "evict"],
            weights=[10, 2, 2, 1, 1, 2, 2, 1],
        )[0]
        key = tenancy.choice(prefixes) + rng.choice(KEYS)
        if op == "put":
            history.put(key, value_for(rng, 3))
        elif op == "delete":
            history.delete(key)
        elif op in ("pin", "unpin"):
            history.pin(key, op == "pin")
        elif op == "checkpoint":
            history.checkpoint()
        elif op == "sync":
            history.sync()
        elif op == "get":
            history.get(key)
        else:
            history.evict(rng, fresh)
    second = rng.randrange(40) if rng.random() < 1 / 3 else None
    return crash_and_recover(history, targets, f"seed {seed}", second)


@pytest.fixture(scope="module")
def random_templates(tmp_path_factory):
    """(shape, relaxed) -> Template: one member or two, a few slots or more."""
    directory = tmp_path_factory.mktemp("templates")
    shapes = [[6], [12], [5, 7], [10, 10]]
    return {
        (i, relaxed): Template(
            directory,
            f"shape{i}-{'relaxed' if relaxed else 'strict'}",
            slots,
            RELAXED if relaxed else STRICT,
        )
        for i, slots in enumerate(shapes)
        for relaxed in (False, True)
    }


def test_random_histories_with_crashes_and_device_errors(random_templates, tmp_path):
    seeds = [int(ONLY_SEED)] if ONLY_SEED else range(SEEDS)
    total = Tally()
    for seed in seeds:
        total.add(random_history(seed, random_templates, tmp_path / "run"))
    print(f"\nrandom: seeds run {len(seeds)}, {total.line()}")
    assert not total.failures, total.failures[:20]
    assert total.lost == total.wrong_bytes == total.resurrected == total.recovery_failures == 0
    assert total.acknowledged_checked > len(seeds)  # the histories did acknowledge puts
