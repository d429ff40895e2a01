"""NVMe-oF commands on this host, which has no NVMe-oF driver: each refusal names its
cause. Discover, connect and disconnect against real nvmet targets run in the QEMU
guest (tests/test_nvme_vm.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.nvme import fabrics

CTXKV = [sys.executable, "-m", "engine.cli.main"]


def ctxkv(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CTXKV, *argv], capture_output=True, text=True, check=False)


def test_tcp_needs_an_address() -> None:
    completed = ctxkv("connect", "-t", "tcp", "--nqn", "nqn.2026-11.io.ctxkv.test:x")
    assert completed.returncode == 1
    assert "a tcp target needs an address (--address)" in completed.stderr


def test_an_unknown_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="transport must be one of tcp, loop, rdma, fc"):
        fabrics.discover("iwarp", "127.0.0.1")


def test_without_the_host_driver_discover_says_what_to_load() -> None:
    if os.path.exists("/dev/nvme-fabrics"):
        pytest.fail("this host has /dev/nvme-fabrics: the test assumes the CI machine kind")
    completed = ctxkv("discover", "-t", "tcp", "-a", "127.0.0.1", "-s", "4420")
    assert completed.returncode == 1
    assert "failed to open nvme-fabrics device" in completed.stderr
    assert "modprobe nvme-tcp" in completed.stderr


def test_disconnect_of_an_unknown_controller_names_it() -> None:
    completed = ctxkv("disconnect", "nvme97")
    assert completed.returncode == 1
    assert "no NVMe controller named nvme97" in completed.stderr
