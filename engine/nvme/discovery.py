"""Which NVMe namespaces this machine has, and what they are (libnvme, via engine._nvme).

A namespace is reached two ways: /dev/nvmeXnY through the block layer, and /dev/ngXnY,
the generic char device that takes NVMe commands directly (io_uring passthrough). This
module names both, and what Identify says of the namespace and its controller.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from engine._nvme import ffi, lib
from engine.errors import native_error

DEV = "/dev"
SYSFS_BLOCK = "/sys/block"
SYSFS_NVME = "/sys/class/nvme"
# MDTS counts pages of the controller's minimum page size (CAP.MPSMIN); 4 KiB is the
# minimum the specification allows and what every controller we know reports.
MDTS_PAGE_BYTES = 4096


@dataclass(frozen=True)
class Namespace:
    """One NVMe namespace and the controller it is reached through."""

    controller: str  # nvme0
    block_path: str  # /dev/nvme0n1
    generic_path: str  # /dev/ng0n1, for passthrough
    model: str
    serial: str
    firmware: str
    transport: str  # pcie, tcp, loop, rdma, fc
    address: str
    subsystem_nqn: str
    nsid: int
    lba_bytes: int
    metadata_bytes: int
    lba_format: int  # index of the LBA format in use
    lba_format_count: int
    mdts: int  # Identify Controller MDTS exponent; 0 = no limit
    lba_count: int
    max_transfer_bytes: int  # what the kernel takes in one command (max_hw_sectors_kb)
    identify_error: int  # 0, or the -errno / NVMe status Identify answered

    @property
    def capacity_bytes(self) -> int:
        return self.lba_count * self.lba_bytes

    @property
    def mdts_bytes(self) -> int | None:
        """The controller's maximum data transfer size, or None if it sets no limit."""
        return MDTS_PAGE_BYTES << self.mdts if self.mdts else None

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "capacity_bytes": self.capacity_bytes,
            "mdts_bytes": self.mdts_bytes,
        }


def namespaces() -> list[Namespace]:
    """Every NVMe namespace the kernel shows, ordered by block device name. [] when the
    kernel has no NVMe driver loaded."""
    capacity = 16
    while True:
        table = ffi.new("struct ctxkv_nvme_namespace[]", capacity)
        count = lib.ctxkv_nvme_scan(table, capacity)
        if count < 0:
            raise native_error(count, "scan NVMe namespaces (libnvme)")
        if count <= capacity:
            break
        capacity = count  # more appeared than we made room for: once more, with room
    found = [_namespace(table[i]) for i in range(count)]
    return sorted(found, key=lambda ns: _natural_key(ns.block_path))


def _namespace(entry) -> Namespace:
    text = {
        name: ffi.string(getattr(entry, name)).decode(errors="replace")
        for name in (
            "controller",
            "block_name",
            "generic_name",
            "model",
            "serial",
            "firmware",
            "transport",
            "address",
            "subsystem_nqn",
        )
    }
    block_name = text["block_name"]
    generic_name = text["generic_name"] or generic_name_of(block_name)
    return Namespace(
        controller=text["controller"],
        block_path=os.path.join(DEV, block_name),
        generic_path=os.path.join(DEV, generic_name) if generic_name else "",
        model=text["model"],
        serial=text["serial"],
        firmware=text["firmware"],
        transport=text["transport"],
        address=text["address"],
        subsystem_nqn=text["subsystem_nqn"],
        nsid=entry.nsid,
        lba_bytes=entry.lba_bytes,
        metadata_bytes=entry.metadata_bytes,
        lba_format=entry.lba_format,
        lba_format_count=entry.lba_format_count,
        mdts=entry.mdts,
        lba_count=entry.lba_count,
        max_transfer_bytes=max_hw_transfer_bytes(block_name),
        identify_error=entry.identify_error,
    )


def generic_name_of(block_name: str) -> str | None:
    """ng0n1 for nvme0n1: the kernel names a namespace's char device after its disk
    (nvme_ns_add_cdev). None for anything that is not an NVMe namespace disk."""
    if not block_name.startswith("nvme") or "n" not in block_name[4:]:
        return None
    instance, _, namespace = block_name[4:].partition("n")
    if not (instance.isdigit() and namespace.isdigit()):
        return None  # a partition (nvme0n1p1) or a hidden path (nvme0c0n1)
    return f"ng{instance}n{namespace}"


def block_name_of(generic_name: str) -> str | None:
    """nvme0n1 for ng0n1: the inverse of generic_name_of."""
    if not generic_name.startswith("ng"):
        return None
    candidate = "nvme" + generic_name[2:]
    return candidate if generic_name_of(candidate) == generic_name else None


def max_hw_transfer_bytes(block_name: str) -> int:
    """The largest transfer the kernel passes to the namespace in one command (0 if
    unknown): the limit on a passthrough command, which nothing splits."""
    path = os.path.join(SYSFS_BLOCK, block_name, "queue", "max_hw_sectors_kb")
    try:
        with open(path) as file:
            return int(file.read().strip()) * 1024
    except (OSError, ValueError):
        return 0


def _natural_key(path: str) -> list:
    name = os.path.basename(path)
    parts, digits = [], ""
    for char in name + "\0":
        if char.isdigit():
            digits += char
            continue
        if digits:
            parts.append(int(digits))
            digits = ""
        parts.append(char)
    return parts


def absence_note() -> str:
    """Why namespaces() is empty, in words for an operator."""
    if not os.path.isdir(SYSFS_NVME):
        return (
            "no NVMe namespaces: this kernel has no NVMe driver loaded "
            f"({SYSFS_NVME} does not exist); ctxkv can still use block devices and files"
        )
    return "no NVMe namespaces: the NVMe driver is loaded but no controller shows a namespace"
