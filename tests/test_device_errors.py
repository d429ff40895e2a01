"""Device errors beneath a real store (tests/fault_device.py): EIO on a read is a miss and
a quarantined extent; EIO on a write fails that put and nothing else, and the store (and
a server around it) goes on serving."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fault_device import FaultInjectionTestDevice

from engine.client.client import Client, ServerError
from engine.errors import DeviceIOError
from engine.journal.journal import JournalFailedError
from engine.server.server import Server
from engine.store.store import Store

MIB = 1 << 20
EXTENT = 64 << 10


@pytest.fixture
def faulty_store(tmp_path):
    """A store on a 64 MiB file with a fault device beneath it, holding keys a and b."""
    target = str(tmp_path / "store.img")
    with open(target, "wb") as file:
        file.truncate(64 * MIB)
    Store.format([target], extent_size=EXTENT).close()
    device = FaultInjectionTestDevice(seed=1)
    store = Store.open([target], ring_factory=device.ring_factory)
    store.put(b"a", b"A" * 100_000)  # two extents
    store.put(b"b", b"B" * 5000)
    yield target, store, device
    store.close()


def reopened(target: str) -> Store:
    return Store.open([target])


def test_eio_on_a_read_is_a_miss_and_quarantines_the_extent(faulty_store):
    _target, store, device = faulty_store
    device.fail_io = lambda op, member, offset, nbytes: op == "read" and nbytes > 4096
    assert store.get(b"a") is None
    device.fail_io = None
    stats = store.stats()
    assert stats["read_errors"] == 1 and stats["slots_quarantined"] == 1
    assert b"a" not in store  # never read again from that extent
    assert store.get(b"b") == b"B" * 5000
    store.put(b"a", b"new")  # the key itself is usable again
    assert store.get(b"a") == b"new"


@pytest.mark.parametrize("what", ["data write", "data flush", "journal write", "journal flush"])
def test_eio_on_a_write_fails_that_put_and_nothing_else(faulty_store, what):
    target, store, device = faulty_store
    # A put's I/Os: its extent write, a flush, the journal block, a flush. Fail one.
    failing = {"data write": 1, "data flush": 2, "journal write": 3, "journal flush": 4}[what]
    seen = []

    def fail(op: str, member: int, offset: int, nbytes: int) -> bool:
        seen.append(op)
        return len(seen) == failing

    device.fail_io = fail
    with pytest.raises(DeviceIOError):
        store.put(b"b", b"overwrite that fails" * 1000)
    device.fail_io = None
    assert store.stats()["failed_puts"] == 1
    assert store.get(b"b") == b"B" * 5000  # the old value stands
    assert store.get(b"a") == b"A" * 100_000
    store.put(b"c", b"C" * 7000)  # the store goes on
    assert store.get(b"c") == b"C" * 7000
    store.close()
    with reopened(target) as again:  # and the failed put never shows up later
        assert again.get(b"b") == b"B" * 5000
        assert again.get(b"c") == b"C" * 7000


def test_a_put_many_whose_ninth_write_fails_stores_none_of_it(tmp_path):
    """put_many streams its values' writes through a pool of 8 buffers, then flushes and
    journals them all at once: when the ninth value's write fails, none of its 12 values
    is visible, now or after a reopen, each counts as a failed put, their slots go back
    to the allocator, and a key put twice in one earlier put_many keeps its later value."""
    target = str(tmp_path / "store.img")
    with open(target, "wb") as file:
        file.truncate(64 * MIB)
    Store.format([target], extent_size=EXTENT).close()
    device = FaultInjectionTestDevice(seed=2)
    values = [(f"k{i % 9}".encode(), bytes([i]) * (EXTENT - i)) for i in range(12)]
    with Store.open([target], ring_factory=device.ring_factory, pool_buffers=8) as store:
        store.put_many(values)  # more values than the pool has buffers
        for key, value in values[3:]:  # k0..k2 were put twice; the later value won
            assert store.get(key) == value
        data_writes = []

        def fail_ninth_write(op: str, member: int, offset: int, nbytes: int) -> bool:
            if op == "write" and nbytes > 4096:
                data_writes.append(offset)
            return len(data_writes) > 8 and op == "write" and nbytes > 4096

        device.fail_io = fail_ninth_write
        renamed = [(f"new-{i}".encode(), value) for i, (_, value) in enumerate(values)]
        free_before = store.stats()["slots_free"]
        with pytest.raises(DeviceIOError):
            store.put_many(renamed)
        device.fail_io = None
        assert all(store.get(key) is None for key, _ in renamed)
        assert store.stats()["failed_puts"] == 12
        assert store.stats()["slots_free"] == free_before
        store.put_many(renamed)  # and the store takes them once the device behaves
        assert [store.get(key) for key, _ in renamed] == [v for _, v in renamed]
    with reopened(target) as again:
        assert [again.get(key) for key, _ in renamed] == [v for _, v in renamed]


def test_a_journal_that_cannot_even_be_voided_stops_acknowledging(faulty_store):
    target, store, device = faulty_store
    device.fail_io = lambda op, member, offset, nbytes: op == "write" and nbytes == 4096
    with pytest.raises(JournalFailedError, match="so did voiding its blocks"):
        store.put(b"c", b"c" * 10)
    device.fail_io = None
    with pytest.raises(JournalFailedError, match="reopen the store"):
        store.put(b"d", b"d" * 10)
    assert store.get(b"a") == b"A" * 100_000  # reads still work
    store.close()
    with reopened(target) as again:
        assert again.get(b"a") == b"A" * 100_000 and again.get(b"c") is None


def test_the_server_keeps_serving_through_device_errors(faulty_store):
    _target, store, device = faulty_store
    server = Server(store, "127.0.0.1", 0)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()
    thread = threading.Thread(
        target=lambda: loop.run_until_complete(
            server.serve(stop, ready=lambda host, port: started.set())
        )
    )
    thread.start()
    try:
        assert started.wait(10)
        with Client(f"127.0.0.1:{server.port}") as client:
            device.fail_io = lambda op, member, offset, nbytes: op == "write" and nbytes > 4096
            with pytest.raises(ServerError, match="Input/output error"):
                client.put(b"x", b"x" * 20_000)
            device.fail_io = lambda op, member, offset, nbytes: op == "read" and nbytes > 4096
            assert client.get(b"a") is None
            device.fail_io = None
            client.put(b"x", b"y" * 20_000)
            assert client.get(b"x") == b"y" * 20_000
            assert client.get(b"b") == b"B" * 5000
            stats = client.stats()
            assert stats["failed_puts"] == 1 and stats["read_errors"] == 1
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()
