"""The store end to end on real loop devices and files: values of every size survive
close and reopen, span members, are verified on read, and bad input is refused."""

import os
import random
import threading
from pathlib import Path

import pytest

from engine.alloc.log import StoreFullError
from engine.errors import CtxkvError
from engine.store.format import TargetInUseError
from engine.store.layout import EXTENT_HEADER_BYTES
from engine.store.recovery import StoreOpenError
from engine.store.store import RELAXED, Store, ValueTooLargeError

KIB, MIB = 1 << 10, 1 << 20
EXTENT = 64 * KIB


def value_of(seed: int, nbytes: int) -> bytes:
    return random.Random(seed).randbytes(nbytes)


@pytest.fixture
def two_loops(loop_device):
    return [loop_device(size_bytes=64 * MIB), loop_device(size_bytes=64 * MIB)]


def test_values_survive_reopen_across_two_loop_devices(two_loops):
    rng = random.Random(7)
    sizes = [1, 4095, 4096, 4097, EXTENT - 1, EXTENT, EXTENT + 1, 3 * EXTENT]
    sizes += [rng.randint(1, 3 * EXTENT) for _ in range(492)]
    expected = {f"key-{i}".encode(): value_of(i, size) for i, size in enumerate(sizes)}
    with Store.format(two_loops, extent_size=EXTENT) as store:
        for key, value in expected.items():
            store.put(key, value)
        assert store.get(b"key-0") == expected[b"key-0"]
    with Store.open(two_loops) as store:
        assert store.stats()["keys"] == 500
        for key, value in expected.items():
            assert store.get(key) == value, key
        assert store.get(b"absent") is None


def test_a_value_spanning_extents_lies_on_both_members(two_loops):
    with Store.format(two_loops, extent_size=EXTENT) as store:
        store.put(b"big", value_of(1, 3 * EXTENT))
        located = store._state.locate(store_digest(b"big"))
        assert {member for member, _slot in located.parts} == {0, 1}


def store_digest(key: bytes) -> bytes:
    from engine.index import key_digest

    return key_digest(key)


def test_overwrite_delete_and_contains(target_file):
    with Store.format([target_file(size_bytes=32 * MIB)], extent_size=EXTENT) as store:
        store.put(b"k", b"one")
        store.put(b"k", b"two" * 30000)
        assert store.get(b"k") == b"two" * 30000
        assert b"k" in store and b"x" not in store
        assert store.delete(b"k") is True
        assert store.delete(b"k") is False
        assert store.get(b"k") is None and b"k" not in store
        assert store.stats()["slots_live"] == 0


def test_deletes_and_overwrites_survive_reopen_without_checkpoint(target_file):
    target = target_file(size_bytes=32 * MIB)
    store = Store.format([target], extent_size=EXTENT)
    store.put(b"a", b"1")
    store.put(b"b", b"2")
    store.put(b"a", b"3")
    store.delete(b"b")
    # Crash-like: drop the store without close(), so reopen must replay the journal.
    store._closed = True
    for device in store._devices:
        device.close()
    with Store.open([target]) as reopened:
        assert reopened.replayed_records == 4
        assert reopened.get(b"a") == b"3"
        assert reopened.get(b"b") is None


def test_zero_copy_read_reserve_commit_and_get_into(target_file):
    with Store.format([target_file(size_bytes=32 * MIB)], extent_size=EXTENT) as store:
        lease = store.reserve(1000)
        lease.array[:] = 9
        store.commit(b"z", lease)
        with store.read(b"z") as value:
            assert value.nbytes == 1000 and bytes(value.memoryview) == b"\x09" * 1000
        buffer = bytearray(2000)
        assert store.get_into(b"z", buffer) == 1000 and buffer[:1000] == b"\x09" * 1000
        with pytest.raises(ValueError, match="too small"):
            store.get_into(b"z", bytearray(10))
        assert store.get_into(b"nope", buffer) is None


def test_put_many_get_many_and_longest_prefix(target_file):
    with Store.format([target_file(size_bytes=32 * MIB)], extent_size=EXTENT) as store:
        chain = [f"chunk-{i}".encode() for i in range(10)]
        store.put_many([(key, key * 100) for key in chain[:6]])
        assert store.get_many(chain[4:8]) == [chain[4] * 100, chain[5] * 100, None, None]
        assert store.longest_prefix(chain) == 6
        assert store.longest_prefix(chain[6:]) == 0
        assert store.longest_prefix([]) == 0


def test_read_iter_streams_more_values_than_the_pool_holds(two_loops):
    """80 values (1 to 3 extents, misses among them) through a pool of 8 buffers: in
    order, identical, read ahead only as far as the window, every buffer back at the end;
    a put on the same thread while the stream is open works (another ring)."""
    with Store.format(two_loops, extent_size=EXTENT, pool_buffers=8, queue_depth=2) as store:
        rng = random.Random(7)
        values = {}
        for i in range(80):
            if i % 7 != 3:  # every 7th key from 3 on is never put: a miss
                values[f"v{i}".encode()] = value_of(i, rng.randint(1, 3 * EXTENT))
        store.put_many(list(values.items()))
        keys = [f"v{i}".encode() for i in range(80)]
        stream = store.read_iter(keys)
        for i, (key, lease) in enumerate(zip(keys, stream, strict=True)):
            if key not in values:
                assert lease is None
                continue
            with lease:
                assert b"".join(map(bytes, lease.views)) == values[key]
                # the caller's parts plus at most two queue depths read ahead
                assert store.pool_leased <= len(lease.views) + 2 * 2 + 3
            if i == 40:
                store.put(b"during", b"x" * 100)
        assert store.pool_leased == 0
        assert store.get(b"during") == b"x" * 100
        stats = store.stats()
        assert stats["misses"] == 80 - len(values) and stats["corrupt_reads"] == 0


def test_read_iter_closed_early_or_hoarded_gives_every_buffer_back(target_file):
    with Store.format(
        [target_file(size_bytes=32 * MIB)], extent_size=EXTENT, pool_buffers=8
    ) as store:
        keys = [f"k{i}".encode() for i in range(20)]
        store.put_many([(key, key * 1000) for key in keys])
        stream = store.read_iter(keys)
        first = next(stream)
        assert bytes(first.memoryview) == keys[0] * 1000
        assert store.pool_leased > 1  # the next values are being read ahead
        stream.close()
        assert store.pool_leased == 1
        first.release()
        assert store.pool_leased == 0
        # A caller that keeps every value gets an error, not a wait with no end.
        held = []
        with pytest.raises(ValueTooLargeError, match="holds 8 of the pool's 8"):
            for lease in store.read_iter(keys):
                held.append(lease)
        assert len(held) == 8 and store.pool_leased == 8
        for lease in held:
            lease.release()
        assert store.pool_leased == 0
        with pytest.raises(ValueTooLargeError, match="read fewer keys"):
            store.read_many(keys)


def test_a_put_many_larger_than_a_journal_commit_or_the_store_goes_in_groups(target_file):
    """A put_many is durable at once up to half the journal's blocks of records and a
    quarter of the store's extents; past that it goes in groups, so one larger than the
    whole store still succeeds, its later values evicting its earlier ones in log order."""
    target = target_file(size_bytes=32 * MIB)
    with Store.format([target], extent_size=EXTENT, pool_buffers=16) as store:
        slots = store.stats()["slots"]
        values = [(f"g{i}".encode(), value_of(i, 1 + i % EXTENT)) for i in range(slots + 100)]
        commits = store.stats()["journal_commits"]
        store.put_many(values)
        assert store.stats()["journal_commits"] - commits >= 4
        assert store.stats()["failed_puts"] == 0
        for key, value in values[-slots // 2 :]:
            assert store.get(key) == value
        assert store.get(values[0][0]) is None  # evicted by the same call
    with Store.open([target]) as again:
        for key, value in values[-slots // 2 :]:
            assert again.get(key) == value


def test_a_put_many_checks_every_key_and_size_before_writing_any(target_file):
    """A bad key or an oversized value late in a put_many (a generator, here) refuses the
    whole call before a byte is written; a put_many of nothing commits nothing."""
    target = target_file(size_bytes=32 * MIB)
    with Store.format([target], extent_size=EXTENT, pool_buffers=8) as store:
        commits = store.stats()["journal_commits"]
        store.put_many([])
        store.put_many(iter([]))
        assert store.stats()["journal_commits"] == commits
        good = [(f"ok{i}".encode(), value_of(i, EXTENT)) for i in range(12)]
        for bad, error in (
            ((b"", b"x"), ValueError),
            (("text", b"x"), TypeError),
            ((b"huge", bytes(9 * EXTENT)), ValueTooLargeError),
        ):
            with pytest.raises(error):
                store.put_many(item for item in [*good, bad])
            assert all(store.get(key) is None for key, _ in good)
        stats = store.stats()
        assert stats["journal_commits"] == commits and stats["bytes_put"] == 0
        assert store.pool_leased == 0


def test_eviction_is_fifo_with_second_chance_and_pins(target_file):
    target = target_file(size_bytes=16 * MIB)
    with Store.format([target], extent_size=1 * MIB) as store:
        slots = store.stats()["slots"]
        for i in range(slots):
            store.put(f"v{i}".encode(), value_of(i, 1000))
        store.pin(b"v0")
        assert store.get(b"v1") is not None  # referenced: gets a second chance
        for i in range(slots, slots + 3):
            store.put(f"v{i}".encode(), value_of(i, 1000))
        assert store.get(b"v0") is not None  # pinned
        assert store.get(b"v1") is not None  # second chance
        assert store.get(b"v2") is None and store.get(b"v3") is None  # oldest went
        assert store.stats()["evictions"] >= 2


def test_a_member_full_of_pins_sends_puts_to_the_others(target_file):
    targets = [target_file(size_bytes=16 * MIB), target_file(size_bytes=16 * MIB)]
    with Store.format(targets, extent_size=1 * MIB) as store:
        slots = store.stats()["slots"]
        for i in range(slots):
            store.put(f"p{i}".encode(), value_of(i, 1000))
            store.pin(f"p{i}".encode())
        with pytest.raises(StoreFullError, match="every slot of all 2 members is pinned"):
            store.put(b"one too many", b"x")
        assert store.stats()["slots_free"] == 0  # the failed put gave back what it took
        assert store.unpin(b"p0")  # one slot may go: the next put, on either member, takes it
        store.put(b"fits", b"y" * 1000)
        assert store.get(b"fits") == b"y" * 1000 and store.get(b"p0") is None
        member_0_slots = store._superblocks[0].slot_count
        for i in range(1, member_0_slots):  # unpin member 0's values only...
            store.unpin(f"p{2 * i}".encode())
        for i in range(3):  # ...and puts still land, all on member 0
            store.put(f"after-{i}".encode(), b"z" * 1000)
            assert store.get(f"after-{i}".encode()) == b"z" * 1000


def test_corrupt_extent_is_a_miss_and_quarantined(target_file):
    target = target_file(size_bytes=32 * MIB)
    with Store.format([target], extent_size=EXTENT) as store:
        store.put(b"victim", value_of(3, 5000))
        member, slot = store._state.locate(store_digest(b"victim")).parts[0]
        offset = store._slot_offset((member, slot)) + EXTENT_HEADER_BYTES + 100
    with open(target, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))
    with Store.open([target]) as store:
        assert store.get(b"victim") is None
        stats = store.stats()
        assert stats["corrupt_reads"] == 1 and stats["slots_quarantined"] == 1
        assert b"victim" not in store


def test_one_damaged_superblock_copy_still_opens_and_says_so(target_file):
    target = target_file(size_bytes=32 * MIB)
    with Store.format([target], extent_size=EXTENT) as store:
        store.put(b"k", b"v")
    with open(target, "r+b") as file:
        file.seek(20)
        file.write(b"\xff\xff")
    with Store.open([target]) as store:
        assert store.get(b"k") == b"v"
        assert any("superblock A" in line for line in store.stats()["damage"])


def test_format_refuses_filesystems_and_stores_without_force(loop_device, tool):
    device = loop_device(size_bytes=64 * MIB)
    tool("mkfs.ext4", "-q", "-F", device)
    with pytest.raises(TargetInUseError, match="ext4 filesystem"):
        Store.format([device], extent_size=EXTENT)
    Store.format([device], extent_size=EXTENT, force=True).close()
    with pytest.raises(TargetInUseError, match="ctxkv store"):
        Store.format([device], extent_size=EXTENT)


def test_foreign_and_missing_members_are_refused(loop_device, target_file):
    a, b = target_file(size_bytes=32 * MIB), target_file(size_bytes=32 * MIB)
    other = target_file(size_bytes=32 * MIB)
    Store.format([a, b], extent_size=EXTENT).close()
    Store.format([other], extent_size=EXTENT).close()
    with pytest.raises(StoreOpenError, match="has 2 members, 1 targets"):
        Store.open([a])
    with pytest.raises(StoreOpenError, match="foreign member"):
        Store.open([a, other])
    with pytest.raises(StoreOpenError, match="member order"):
        Store.open([b, a])
    with pytest.raises(StoreOpenError, match="no valid ctxkv superblock"):
        Store.open([target_file(size_bytes=32 * MIB)])


def test_bad_input_gets_clear_errors(target_file):
    with Store.format(
        [target_file(size_bytes=8 * MIB)], extent_size=EXTENT, pool_buffers=4
    ) as store:
        with pytest.raises(ValueError, match=r"1\.\.1024 bytes"):
            store.put(b"", b"x")
        with pytest.raises(ValueError, match=r"1\.\.1024 bytes"):
            store.put(b"k" * 1025, b"x")
        with pytest.raises(TypeError, match="keys are bytes"):
            store.put("text", b"x")
        with pytest.raises(ValueTooLargeError, match="needs 5 extents"):
            store.put(b"k", bytes(5 * EXTENT))
    with pytest.raises(ValueError, match="extent size must be a power of two"):
        Store.format([target_file()], extent_size=3 * MIB)
    untouched = target_file()
    with pytest.raises(ValueError, match=r"queue_depth is 1\.\.256, got 0"):
        Store.format([untouched], extent_size=EXTENT, queue_depth=0, force=True)
    assert not Path(untouched).read_bytes().strip(b"\0"), "a refused format wrote"
    with pytest.raises(CtxkvError, match="closed"):
        store.put(b"k", b"v")


def test_concurrent_puts_and_gets(target_file):
    with Store.format([target_file(size_bytes=64 * MIB)], extent_size=EXTENT) as store:
        errors = []

        def worker(thread: int) -> None:
            try:
                for i in range(40):
                    key = f"t{thread}-{i}".encode()
                    value = value_of(thread * 1000 + i, 100 + i * 37)
                    store.put(key, value)
                    assert store.get(key) == value
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[0]
        assert store.stats()["keys"] == 160
        assert store.stats()["journal_commits"] <= 160  # group commit may merge some


def test_checkpoint_then_more_journal_then_reopen(target_file):
    target = target_file(size_bytes=32 * MIB)
    with Store.format([target], extent_size=EXTENT) as store:
        store.put(b"before", b"1")
        store.checkpoint()
        store.put(b"after", b"2")
        store.pin(b"before")
    with Store.open([target]) as store:
        assert store.get(b"before") == b"1" and store.get(b"after") == b"2"
        assert store._state.locate(store_digest(b"before")).pinned
    with Store.open([target]) as store:  # again: pins survive a checkpoint round trip
        assert store.replayed_records == 0
        assert store._state.locate(store_digest(b"before")).pinned
        assert not store._state.locate(store_digest(b"after")).pinned


def test_device_is_free_right_after_close_even_when_other_threads_did_io(loop_device):
    # Every thread gets its own ring; close() must release them all before returning, or
    # an immediate reopen of a block device (O_EXCL) fails with EBUSY.
    device = loop_device(size_bytes=64 * MIB)
    store = Store.format([device], extent_size=EXTENT)
    thread = threading.Thread(target=store.put, args=(b"from-thread", b"v"))
    thread.start()
    thread.join()
    store.close()
    with Store.open([device]) as reopened:
        assert reopened.get(b"from-thread") == b"v"


def test_journal_wraps_many_times_through_checkpoints(target_file):
    # 16 blocks of journal: a checkpoint every ~8 commits, the ring wrapping ~20 times.
    target = target_file(size_bytes=32 * MIB)
    store = Store.format([target], extent_size=EXTENT, journal_bytes=16 * 4096, durability=RELAXED)
    for i in range(300):
        store.put(f"k{i % 50}".encode(), f"value {i}".encode())
    assert store.stats()["checkpoints"] >= 30
    store._closed = True  # crash-like: no closing checkpoint, the tail must replay
    for device in store._devices:
        device.close()
    with Store.open([target]) as reopened:
        for i in range(250, 300):
            assert reopened.get(f"k{i % 50}".encode()) == f"value {i}".encode()
        assert reopened.stats()["keys"] == 50


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("discard", [False, True])
def test_freed_extents_are_discarded_on_request(loop_device, discard):
    device = loop_device(size_bytes=64 * MIB)
    backing = Path(f"/sys/block/{os.path.basename(device)}/loop/backing_file")
    image = backing.read_text().strip()
    with Store.format([device], extent_size=1 * MIB, discard_freed=discard) as store:
        store.put(b"a", value_of(1, 1 * MIB))
        store.put(b"b", value_of(2, 1 * MIB))
        before = allocated_bytes(image)
        store.delete(b"a")
        store.put(b"b", value_of(3, 1 * MIB))  # an overwrite frees b's first extent
        after = allocated_bytes(image)
        assert store.get(b"b") == value_of(3, 1 * MIB)
    if discard:
        # Two extents punched out of the image, one written: about one extent less.
        assert after <= before - 1 * MIB + 64 * 1024
    else:
        assert after >= before + 1 * MIB - 64 * 1024
