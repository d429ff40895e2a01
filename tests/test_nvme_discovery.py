"""NVMe discovery and `ctxkv devices` on this host. The host kernel has no NVMe driver,
so the namespaces themselves are checked inside the QEMU guest (tests/test_nvme_vm.py);
here: the empty case, the name mapping, and what a candidate holds, on loop devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.cli.devices import contents_of
from engine.nvme.discovery import SYSFS_NVME, block_name_of, generic_name_of, namespaces
from engine.store.store import Store

CTXKV = [sys.executable, "-m", "engine.cli.main"]


@pytest.mark.parametrize(
    ("block_name", "generic_name"),
    [("nvme0n1", "ng0n1"), ("nvme12n3", "ng12n3"), ("nvme1n10", "ng1n10")],
)
def test_generic_and_block_names_map_both_ways(block_name: str, generic_name: str) -> None:
    assert generic_name_of(block_name) == generic_name
    assert block_name_of(generic_name) == block_name


@pytest.mark.parametrize("name", ["nvme0n1p1", "nvme0c0n1", "nvme0", "sda", "loop0", "nvmeXn1"])
def test_names_that_are_not_namespace_disks_map_to_none(name: str) -> None:
    assert generic_name_of(name) is None
    assert block_name_of("ng" + name.removeprefix("nvme")) is None


def test_devices_json_without_nvme_is_an_empty_list_and_a_note() -> None:
    if os.path.isdir(SYSFS_NVME):
        pytest.fail(f"this host has {SYSFS_NVME}: the test assumes the CI machine kind")
    assert namespaces() == []
    completed = subprocess.run(
        [*CTXKV, "devices", "--json"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == []
    assert "no NVMe namespaces" in completed.stderr
    assert "no NVMe driver" in completed.stderr


def test_contents_of_names_nothing_a_filesystem_and_a_store(loop_device, tool) -> None:
    device = loop_device()
    assert contents_of(device) == []
    tool("mkfs.ext4", "-q", "-F", device)
    assert contents_of(device) == ["ext4 filesystem"]
    with Store.format([device], extent_size=1 << 20, force=True) as store:
        store_uuid = store.store_uuid
    holds = contents_of(device)
    assert any(f"ctxkv store {store_uuid}" in entry for entry in holds), holds


def test_contents_of_a_mounted_device_names_the_mount(loop_device, mount_fs, tool) -> None:
    device = loop_device()
    tool("mkfs.ext4", "-q", "-F", device)
    mount_point = mount_fs(device)
    holds = contents_of(device)
    assert holds == [f"in use: mounted at {mount_point} (ext4)"]
