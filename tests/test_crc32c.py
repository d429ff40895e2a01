"""The native CRC32C must agree bit for bit with the `crc32c` package, in both its
SSE4.2 and portable forms, for every length, alignment and starting value."""

import random

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine._native import ffi, lib


def native(function, data: bytes, start: int = 0, crc: int = 0) -> int:
    view = ffi.from_buffer(data)
    return function(crc, view + start, len(data) - start)


def test_check_value():
    # The catalogued check value of CRC-32C (Castagnoli) for "123456789".
    assert lib.ctxkv_crc32c(0, b"123456789", 9) == 0xE3069283
    assert lib.ctxkv_crc32c_portable(0, b"123456789", 9) == 0xE3069283


def test_hardware_path_is_used_on_this_cpu():
    with open("/proc/cpuinfo") as cpuinfo:
        has_sse42 = " sse4_2" in cpuinfo.read()
    assert lib.ctxkv_crc32c_hardware() == int(has_sse42)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=5000),
    start=st.integers(min_value=0, max_value=15),
    crc=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_matches_crc32c_package(data: bytes, start: int, crc: int):
    start = min(start, len(data))  # a start inside the data exercises unaligned heads
    expected = crc32c.crc32c(data[start:], crc)
    assert native(lib.ctxkv_crc32c, data, start, crc) == expected
    assert native(lib.ctxkv_crc32c_portable, data, start, crc) == expected


def test_large_buffer_and_continuation():
    data = bytes(range(256)) * 16384 + b"tail"  # 4 MiB and 4 bytes
    whole = crc32c.crc32c(data)
    assert lib.ctxkv_crc32c(0, data, len(data)) == whole
    head = lib.ctxkv_crc32c(0, data, 1 << 20)
    rest = ffi.from_buffer(data) + (1 << 20)
    assert lib.ctxkv_crc32c(head, rest, len(data) - (1 << 20)) == whole


def test_detects_a_single_bit_flip():
    data = bytearray(b"x" * 4096)
    before = lib.ctxkv_crc32c(0, bytes(data), len(data))
    data[1234] ^= 0x10
    assert lib.ctxkv_crc32c(0, bytes(data), len(data)) != before


@pytest.mark.parametrize("nbytes", [24575, 24576, 24577, 3 * 8192 * 5 + 7, (4 << 20) + 4])
@pytest.mark.parametrize("start", [0, 3])
def test_three_stream_path_around_its_block_boundaries(nbytes: int, start: int):
    # 3 x 8 KiB is where the interleaved SSE4.2 path takes over from the single stream.
    data = random.Random(nbytes).randbytes(nbytes + start)
    expected = crc32c.crc32c(data[start:], 0xABCDEF)
    assert native(lib.ctxkv_crc32c, data, start, 0xABCDEF) == expected
