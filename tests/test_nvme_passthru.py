"""The passthrough path's choices and refusals on this host (no NVMe here: the commands
themselves run in the QEMU guest, tests/test_nvme_vm.py), and SQE128/CQE32 rings doing
ordinary I/O, which is what a store mixing NVMe and other targets relies on."""

from __future__ import annotations

import numpy as np
import pytest

from engine._native import ffi, lib
from engine.bench.fio import fio_arguments
from engine.bench.job import Job
from engine.errors import UnsupportedTargetError
from engine.io.buffers import BufferPool
from engine.io.ring import RESULT_DTYPE, UNREGISTERED_BUFFER, Op, Ring
from engine.nvme.device import Device
from engine.nvme.passthru import (
    generic_path_of,
    kernel_supports_passthru,
    kernel_version,
    max_command_bytes,
    split_target,
)

SQE128, CQE32 = 1 << 10, 1 << 11
BIG_RING = SQE128 | CQE32


def test_this_kernel_makes_passthrough_rings() -> None:
    # Linux 5.19+; the CI machine runs 6.x. auto falls back to block where this is False.
    assert kernel_supports_passthru()


@pytest.mark.parametrize("io_path", ["auto", "block"])
def test_a_loop_device_takes_the_block_path(loop_device, io_path: str) -> None:
    device_path = loop_device()
    assert split_target(device_path, io_path) == (device_path, False)
    with Device.open(device_path, io_path=io_path) as device:
        assert device.io_path == "block" and device.passthru is None


def test_passthru_on_a_loop_device_is_refused_by_name(loop_device) -> None:
    device_path = loop_device()
    with pytest.raises(UnsupportedTargetError, match=f"{device_path} has no NVMe generic"):
        Device.open(device_path, io_path="passthru")


def test_an_unknown_io_path_is_refused(target_file) -> None:
    with pytest.raises(ValueError, match="io path must be one of auto, block, passthru"):
        Device.open(target_file(), io_path="spdk")


def test_generic_path_of() -> None:
    assert generic_path_of("/dev/nvme3n2") == "/dev/ng3n2"
    assert generic_path_of("/dev/ng3n2") == "/dev/ng3n2"
    with pytest.raises(UnsupportedTargetError, match="not an NVMe namespace"):
        generic_path_of("/dev/loop0")


def test_set_passthru_needs_a_big_sqe_ring(target_file) -> None:
    with Device.open(target_file()) as device, Ring([device]) as ring:
        assert lib.ctxkv_ring_set_passthru(ring._ring, 0, 1, 12, 0) == -22  # EINVAL


def test_kernel_version_reads_the_release() -> None:
    assert kernel_version() >= (5, 19)  # this machine: 6.x


def test_a_passthrough_ring_still_does_plain_io(target_file) -> None:
    """A SQE128|CQE32 ring carries ordinary reads and writes of a file unchanged (a store
    may mix NVMe namespaces on passthrough with other targets in one ring)."""
    with Device.open(target_file()) as device, BufferPool(1 << 20, 2) as pool:
        written, read = pool.lease_many(2)
        written.array[:] = np.random.default_rng(1).integers(0, 256, written.nbytes)
        ring_out = ffi.new("struct ctxkv_ring **")
        assert lib.ctxkv_ring_new(8, lib.CTXKV_RING_NVME_PASSTHRU, ring_out) == 0
        native = ring_out[0]
        try:
            assert lib.ctxkv_ring_setup_flags(native) & BIG_RING == BIG_RING
            fds = ffi.new("int32_t[]", [device.fd])
            chunks = ffi.new("uint32_t[]", [device.geometry.max_transfer_bytes])
            assert lib.ctxkv_ring_register_files(native, fds, chunks, 1) == 0
            ios = Ring.batch(2)
            ios[0] = (0, written.address, written.nbytes, UNREGISTERED_BUFFER, 0, Op.WRITE)
            ios[1] = (0, read.address, read.nbytes, UNREGISTERED_BUFFER, 0, Op.READ)
            results = np.zeros(2, dtype=RESULT_DTYPE)
            for i in range(2):  # one at a time: the read must follow the write
                ran = lib.ctxkv_ring_run(
                    native,
                    ffi.cast("struct ctxkv_io *", ffi.from_buffer(ios[i : i + 1])),
                    1, 1, 0,
                    ffi.cast("struct ctxkv_io_result *", ffi.from_buffer(results[i : i + 1])),
                    ffi.NULL,
                )  # fmt: skip
                assert ran == 1
            assert list(results["result"]) == [written.nbytes, read.nbytes]
            assert np.array_equal(written.array, read.array)
        finally:
            lib.ctxkv_ring_free(native)
            written.release()
            read.release()


def test_fio_on_passthru_runs_io_uring_cmd_on_the_char_devices() -> None:
    job = Job(targets=("/dev/nvme0n1", "/dev/ng1n1"), block_bytes=512 << 10, io_path="passthru")
    arguments = fio_arguments(job)
    assert "--filename=/dev/ng0n1:/dev/ng1n1" in arguments
    assert {"--ioengine=io_uring_cmd", "--cmd_type=nvme", "--fixedbufs=1"} <= set(arguments)
    # O_DIRECT means nothing on a char device, and open() refuses it there.
    assert "--direct=1" not in arguments
    block = fio_arguments(Job(targets=("/dev/nvme0n1",), io_path="block"))
    assert {"--ioengine=io_uring", "--direct=1", "--filename=/dev/nvme0n1"} <= set(block)


def test_a_passthrough_command_fits_the_queue_segment_limit(loop_device) -> None:
    """Checked on a loop device's queue: the limit reads the same sysfs files."""
    device_path = loop_device()
    name = device_path.rsplit("/", 1)[1]
    with open(f"/sys/block/{name}/queue/max_segments") as file:
        max_segments = int(file.read())
    limit = max_segments * 4096
    assert max_command_bytes(device_path, limit * 4, 4096) == limit
    assert max_command_bytes(device_path, 8192, 4096) == 8192
    assert max_command_bytes("/dev/no-such-disk", 1 << 20, 4096) == 1 << 20
