"""The buffer pool: aligned, locked, bounded, one region for RDMA, and clear errors."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from engine.errors import CtxkvError, PoolExhaustedError
from engine.io.buffers import BufferPool

MIB = 1 << 20


def test_leases_are_aligned_distinct_and_inside_the_region():
    with BufferPool(buffer_bytes=1 * MIB, count=8, hugepages=False) as pool:
        leases = [pool.lease() for _ in range(8)]
        [(region_address, region_bytes)] = pool.regions()
        addresses = [lease.address for lease in leases]
        assert len(set(addresses)) == 8
        assert sorted(lease.index for lease in leases) == list(range(8))
        for lease in leases:
            assert lease.address % 4096 == 0
            assert lease.nbytes == 1 * MIB
            assert region_address <= lease.address
            assert lease.address + lease.nbytes <= region_address + region_bytes
        assert pool.iovecs() == [(a, MIB) for a in sorted(addresses)]
        for lease in leases:
            lease.release()
        assert pool.leased == 0


def test_memoryview_and_numpy_views_share_the_buffer():
    with (
        BufferPool(buffer_bytes=64 * 1024, count=2, hugepages=False) as pool,
        pool.lease() as lease,
    ):
        lease.array[:5] = np.frombuffer(b"hello", dtype=np.uint8)
        assert bytes(lease.memoryview[:5]) == b"hello"
        lease.memoryview[5:10] = b"world"
        assert lease.array[5:10].tobytes() == b"world"
        assert lease.array.ctypes.data == lease.address


def test_pool_is_bounded_and_reuses_released_buffers():
    with BufferPool(buffer_bytes=4096, count=2, hugepages=False) as pool:
        first, second = pool.lease(), pool.lease()
        with pytest.raises(PoolExhaustedError, match=r"1 of 2 buffers .* 0 free"):
            pool.lease(timeout=0.01)
        first.release()
        first.release()  # idempotent
        third = pool.lease()
        assert third.index == first.index
        with pytest.raises(CtxkvError, match="released"):
            _ = first.memoryview
        second.release()
        third.release()


def test_close_refuses_while_buffers_are_leased():
    pool = BufferPool(buffer_bytes=4096, count=1, hugepages=False)
    lease = pool.lease()
    with pytest.raises(CtxkvError, match="still leased"):
        pool.close()
    lease.release()
    pool.close()
    with pytest.raises(CtxkvError, match="closed"):
        pool.lease()


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 4096"):
        BufferPool(buffer_bytes=1000, count=1)
    with pytest.raises(ValueError, match="at most"):
        BufferPool(buffer_bytes=2 << 30, count=1)
    with pytest.raises(ValueError, match="count"):
        BufferPool(buffer_bytes=4096, count=0)


@pytest.fixture
def reserved_hugepages():
    path = "/proc/sys/vm/nr_hugepages"
    with open(path) as file:
        before = int(file.read())
    with open(path, "w") as file:
        file.write(str(before + 8))
    with open(path) as file:
        assert int(file.read()) >= before + 8, "the kernel could not reserve 8 hugepages"
    yield
    with open(path, "w") as file:
        file.write(str(before))


def test_uses_hugetlb_pages_when_reserved(reserved_hugepages):
    with BufferPool(buffer_bytes=2 * MIB, count=4, hugepages=True) as pool:
        assert pool.backing == "hugetlb"
        with pool.lease() as lease:
            lease.array[:] = 7
            assert int(lease.array.sum()) == 7 * 2 * MIB


def test_falls_back_to_normal_pages_without_hugepages():
    with BufferPool(buffer_bytes=2 * MIB, count=4, hugepages=False) as pool:
        assert pool.backing == "thp"


def test_memlock_limit_error_names_the_limit_and_the_fix():
    # Without CAP_IPC_LOCK, even root is held to RLIMIT_MEMLOCK.
    script = textwrap.dedent(
        """
        from engine.io.buffers import BufferPool
        BufferPool(buffer_bytes=4 << 20, count=4)
        """
    )
    completed = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-ipc_lock",
            "--bounding-set=-ipc_lock",
            "prlimit",
            "--memlock=1048576",
            sys.executable,
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode != 0
    assert "MemlockLimitError" in completed.stderr
    assert "RLIMIT_MEMLOCK is 1048576 bytes" in completed.stderr
    assert "ulimit -l" in completed.stderr
    assert "CAP_IPC_LOCK" in completed.stderr
