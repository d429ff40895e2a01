"""The io_uring path end to end on real loop devices and files: what is written reads
back identical at every size and depth, and every bad request gets a clear error."""

import errno
import os
import threading

import numpy as np
import pytest

from engine.errors import (
    AlignmentError,
    CtxkvError,
    DeviceIOError,
    OutOfRangeError,
    ReadOnlyDeviceError,
    ShortTransferError,
)
from engine.io.buffers import BufferPool
from engine.io.ring import EXTENT_CRC, UNREGISTERED_BUFFER, Op, Progress, Ring
from engine.nvme.device import Device

KIB, MIB = 1 << 10, 1 << 20
SIZES = [4 * KIB, 64 * KIB, 1 * MIB, 1280 * KIB + 4 * KIB, 4 * MIB, 16 * MIB]
DEPTHS = [1, 8, 64]
DATA_BYTES = 64 * MIB  # per case: enough I/Os to fill the queue at the smaller sizes


@pytest.fixture(params=["loop", "file"])
def target(request, loop_device, target_file) -> str:
    if request.param == "loop":
        return loop_device(size_bytes=DATA_BYTES + 16 * MIB)
    return target_file(size_bytes=DATA_BYTES + 16 * MIB)


def fill_random(pool: BufferPool, indexes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for index in indexes:
        view = np.frombuffer(_buffer_view(pool, index), dtype=np.uint8)
        view[:] = rng.integers(0, 256, pool.buffer_bytes, dtype=np.uint8)


def _buffer_view(pool: BufferPool, index: int) -> memoryview:
    from engine._native import ffi

    return memoryview(ffi.buffer(ffi.cast("char *", pool.buffer_address(index)), pool.buffer_bytes))


def describe(
    pool: BufferPool, indexes: list[int], offsets: list[int], op: Op, nbytes: int
) -> np.ndarray:
    ios = Ring.batch(len(indexes))
    ios["offset"] = offsets
    ios["addr"] = [pool.buffer_address(i) for i in indexes]
    ios["buf_index"] = indexes
    ios["nbytes"] = nbytes
    ios["file_index"] = 0
    ios["opcode"] = op
    return ios


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("nbytes", SIZES)
def test_written_data_reads_back_identical(target: str, nbytes: int, depth: int):
    count = min(64, DATA_BYTES // nbytes)
    with Device.open(target) as device, BufferPool(nbytes, 2 * count, hugepages=False) as pool:
        with Ring([device], pool) as ring:
            written, read = list(range(count)), list(range(count, 2 * count))
            # Reverse order on the device, so a read that ignored offsets would not pass.
            offsets = [(count - 1 - i) * nbytes for i in range(count)]
            fill_random(pool, written, seed=nbytes + depth)
            fill_random(pool, read, seed=1)
            results = ring.run(describe(pool, written, offsets, Op.WRITE, nbytes), depth=depth)
            assert list(results["result"]) == [nbytes] * count
            ring.fsync(0)
            results = ring.run(describe(pool, read, offsets, Op.READ, nbytes), depth=depth)
            assert list(results["result"]) == [nbytes] * count
            assert (results["complete_ns"] >= results["submit_ns"]).all()
            for w, r in zip(written, read, strict=True):
                assert bytes(_buffer_view(pool, w)) == bytes(_buffer_view(pool, r)), (w, r)


def test_splits_io_at_the_device_max_transfer(loop_device):
    with Device.open(loop_device(size_bytes=32 * MIB)) as device:
        assert device.geometry.max_transfer_bytes < 4 * MIB  # so 4 MiB needs several chunks
        with BufferPool(4 * MIB, 2, hugepages=False) as pool, Ring([device], pool) as ring:
            fill_random(pool, [0], seed=3)
            ring.run(describe(pool, [0], [8 * MIB], Op.WRITE, 4 * MIB))
            ring.run(describe(pool, [1], [8 * MIB], Op.READ, 4 * MIB))
            assert bytes(_buffer_view(pool, 0)) == bytes(_buffer_view(pool, 1))


def test_prefers_single_issuer_and_defer_taskrun(target_file):
    with Device.open(target_file()) as device:
        with Ring([device]) as ring:
            assert {"SINGLE_ISSUER", "DEFER_TASKRUN"} <= set(ring.setup_flag_names)
        with Ring([device], single_issuer=False) as ring:
            assert "SINGLE_ISSUER" not in ring.setup_flag_names
            assert "COOP_TASKRUN" in ring.setup_flag_names


@pytest.fixture
def ring_on_loop(loop_device):
    with Device.open(loop_device(size_bytes=16 * MIB)) as device:
        with BufferPool(64 * KIB, 4, hugepages=False) as pool, Ring([device], pool) as ring:
            yield ring


def test_misaligned_offset_length_and_buffer_are_refused(ring_on_loop):
    ring, pool = ring_on_loop, ring_on_loop.pool
    path = ring.devices[0].path
    with pytest.raises(AlignmentError, match=f"offset 512 is not a multiple of .* 4096 of {path}"):
        ring.run(describe(pool, [0], [512], Op.READ, 4096))
    with pytest.raises(AlignmentError, match="length 1000"):
        ring.run(describe(pool, [0], [0], Op.READ, 1000))
    ios = describe(pool, [0], [0], Op.READ, 4096)
    ios["addr"] += 512
    with pytest.raises(AlignmentError, match="buffer address"):
        ring.run(ios)


def test_a_refused_io_is_named_with_what_is_wrong_and_nothing_runs(ring_on_loop):
    ring, pool = ring_on_loop, ring_on_loop.pool
    lease = pool.lease()
    lease.array[:8] = 7
    ok = describe(pool, [lease.index], [0], Op.WRITE, 4096)[0]
    cases = [
        ("file_index", 1, ValueError, "names file 1, but the ring has 1"),
        ("opcode", 9, ValueError, "unknown opcode 9"),
        ("opcode", Op.WRITE | EXTENT_CRC, ValueError, "EXTENT_CRC goes with reads"),
        ("nbytes", 0, AlignmentError, "has length 0"),
        ("buf_index", pool.count, OutOfRangeError, "inside pool buffer"),
    ]
    for field, value, error, message in cases:
        ios = Ring.batch(2)
        ios[:] = ok
        ios[1][field] = value
        with pytest.raises(error, match=f"I/O (1 )?.*{message}"):
            ring.run(ios)
    # Rows are checked before any is sent: the good first row was not written either.
    check = describe(pool, [lease.index], [0], Op.READ, 4096)
    lease.array[:8] = 0
    ring.run(check)
    assert not lease.array[:8].any()
    lease.release()
    with Ring(ring.devices) as bare:
        with pytest.raises(ValueError, match="registered buffer, but the ring has no buffer pool"):
            bare.run(describe(pool, [0], [0], Op.READ, 4096))


def test_kernel_errors_come_back_as_errno_exceptions(ring_on_loop, monkeypatch):
    # With the Python checks bypassed, the run refuses in C what the kernel would (it
    # never sends an I/O outside the rules), and the error must still name the device,
    # the offset and the errno.
    ring, pool = ring_on_loop, ring_on_loop.pool
    monkeypatch.setattr(ring, "validate", lambda ios: None)
    with pytest.raises(DeviceIOError) as caught:
        ring.run(describe(pool, [0], [512], Op.READ, 4096))
    assert caught.value.errno == errno.EINVAL
    assert ring.devices[0].path in str(caught.value) and "offset 512" in str(caught.value)
    results = ring.run(describe(pool, [0, 1], [512, 0], Op.READ, 4096), raise_errors=False)
    assert list(results["result"]) == [-errno.EINVAL, 4096]  # one failure spares the other


def test_io_past_the_end_is_refused(ring_on_loop):
    ring, pool = ring_on_loop, ring_on_loop.pool
    with pytest.raises(OutOfRangeError, match="past the end"):
        ring.run(describe(pool, [0], [16 * MIB - 4096], Op.READ, 8192))
    with pytest.raises(OutOfRangeError, match="inside pool buffer"):
        ring.run(describe(pool, [0], [0], Op.READ, 128 * KIB))


def test_short_read_past_end_of_file_is_an_error(target_file, monkeypatch):
    with Device.open(target_file(size_bytes=1 * MIB)) as device:
        with BufferPool(64 * KIB, 1, hugepages=False) as pool, Ring([device], pool) as ring:
            monkeypatch.setattr(ring, "validate", lambda ios: None)
            os.truncate(device.path, 1 * MIB - 4096)  # the file shrank under us
            with pytest.raises(ShortTransferError, match="moved only 61440 bytes"):
                ring.run(describe(pool, [0], [1 * MIB - 64 * KIB], Op.READ, 64 * KIB))


def test_write_to_read_only_device_is_refused(target_file):
    with Device.open(target_file(), writable=False) as device:
        with BufferPool(4096, 1, hugepages=False) as pool, Ring([device], pool) as ring:
            with pytest.raises(ReadOnlyDeviceError, match="read-only"):
                ring.run(describe(pool, [0], [0], Op.WRITE, 4096))


@pytest.mark.parametrize("depth", [1, 3, 16])
def test_extent_reads_carry_each_payloads_crc(loop_device, depth: int):
    """The ring checksums an extent read after refilling the queue; each result must
    still carry its own extent's CRC, with plain reads in between."""
    from engine.io.ring import EXTENT_CRC
    from engine.store.layout import EXTENT_PAYLOAD_BYTES_OFFSET, crc32c

    extent_bytes, count = 64 * KIB + 4 * KIB, 24
    with Device.open(loop_device(size_bytes=8 * MIB)) as device:
        with (
            BufferPool(extent_bytes, 2 * count, hugepages=False) as pool,
            Ring([device], pool) as ring,
        ):
            rng = np.random.default_rng(depth)
            payload_bytes = [int(n) for n in rng.integers(1, 64 * KIB, count)]
            for i, nbytes in enumerate(payload_bytes):
                view = _buffer_view(pool, i)
                view[:] = rng.integers(0, 256, extent_bytes, dtype=np.uint8).tobytes()
                view[EXTENT_PAYLOAD_BYTES_OFFSET : EXTENT_PAYLOAD_BYTES_OFFSET + 4] = (
                    nbytes.to_bytes(4, "little")
                )
            offsets = [i * extent_bytes for i in range(count)]
            ring.run(describe(pool, list(range(count)), offsets, Op.WRITE, extent_bytes))
            reads = describe(pool, list(range(count, 2 * count)), offsets, Op.READ, extent_bytes)
            reads["opcode"][::2] |= EXTENT_CRC
            progress = Progress()
            results = ring.run(reads, depth=depth, progress=progress)
            assert progress.ops_done == count
            for i, nbytes in enumerate(payload_bytes):
                assert results[i]["result"] == extent_bytes and results[i]["chunks_pending"] == 0
                payload = bytes(_buffer_view(pool, count + i))[4096 : 4096 + nbytes]
                expected = crc32c(payload) if i % 2 == 0 else 0
                assert results[i]["payload_crc32c"] == expected, i


def test_a_stream_runs_rows_as_they_are_handed_over(loop_device):
    """Rows handed over a few at a time (extent reads among them): each advance returns
    with at least the wanted prefix finished and its results final; the ring refuses
    another run while the stream is open, and a stream may not take back rows."""
    from engine.io.ring import EXTENT_CRC
    from engine.store.layout import EXTENT_PAYLOAD_BYTES_OFFSET, crc32c

    extent_bytes, count = 64 * KIB + 4 * KIB, 40
    with Device.open(loop_device(size_bytes=8 * MIB)) as device:
        with (
            BufferPool(extent_bytes, 2 * count, hugepages=False) as pool,
            Ring([device], pool) as ring,
        ):
            rng = np.random.default_rng(3)
            for i in range(count):
                view = _buffer_view(pool, i)
                view[:] = rng.integers(0, 256, extent_bytes, dtype=np.uint8).tobytes()
                view[EXTENT_PAYLOAD_BYTES_OFFSET : EXTENT_PAYLOAD_BYTES_OFFSET + 4] = (
                    64 * KIB
                ).to_bytes(4, "little")
            offsets = [i * extent_bytes for i in range(count)]
            ring.run(describe(pool, list(range(count)), offsets, Op.WRITE, extent_bytes))
            reads = describe(pool, list(range(count, 2 * count)), offsets, Op.READ, extent_bytes)
            reads["opcode"][1::3] |= EXTENT_CRC
            with ring.stream(reads, depth=4) as stream:
                with pytest.raises(CtxkvError, match="stream is open"):
                    ring.run(reads[:1])
                ready = 0
                for wanted in range(count + 1):
                    ready = min(count, max(ready, wanted + int(rng.integers(0, 6))))
                    finished = stream.advance(ready, wanted)
                    assert wanted <= finished <= ready
                    if wanted:
                        i = wanted - 1
                        assert stream.results[i]["result"] == extent_bytes
                        assert stream.results[i]["chunks_pending"] == 0
                        got = bytes(_buffer_view(pool, count + i))
                        assert got == bytes(_buffer_view(pool, i)), i
                        expected = crc32c(got[4096:]) if i % 3 == 1 else 0
                        assert stream.results[i]["payload_crc32c"] == expected, i
                with pytest.raises(ValueError, match="ready not shrinking"):
                    stream.advance(count - 1, 0)
            stream.finish()  # again: nothing
            ring.run(reads[:1])  # the ring is free once the stream is finished


def test_unregistered_memory_works_too(target_file):
    with Device.open(target_file()) as device, Ring([device]) as ring:
        buffer = np.zeros(8192 + 4096, dtype=np.uint8)
        start = (-buffer.ctypes.data) % 4096  # numpy gives no page alignment: find it
        data = buffer[start : start + 8192]
        data[:] = np.arange(8192) % 251
        ios = Ring.batch(1)
        ios[0] = (4096, data.ctypes.data, 8192, UNREGISTERED_BUFFER, 0, Op.WRITE)
        ring.run(ios)
        expected = data.copy()
        data[:] = 0
        ios["opcode"] = Op.READ
        ring.run(ios)
        assert (data == expected).all()


def test_deadline_and_cancel_stop_a_run_early(ring_on_loop):
    ring, pool = ring_on_loop, ring_on_loop.pool
    ios = describe(pool, [0] * 100, [0] * 100, Op.READ, 4096)
    assert len(ring.run(ios, deadline_ns=1)) == 0  # a deadline long past
    progress = Progress()
    progress.cancel()
    assert len(ring.run(ios, progress=progress)) == 0
    progress = Progress()
    assert len(ring.run(ios, progress=progress)) == 100
    assert progress.ops_done == 100 and progress.bytes_done == 100 * 4096


def test_a_ring_belongs_to_its_thread(ring_on_loop):
    errors = []

    def use_from_other_thread():
        try:
            ring_on_loop.fsync(0)
        except CtxkvError as error:
            errors.append(error)

    thread = threading.Thread(target=use_from_other_thread)
    thread.start()
    thread.join()
    assert errors and "one Ring per thread" in str(errors[0])
