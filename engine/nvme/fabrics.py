"""NVMe over Fabrics through libnvme: discover a target's subsystems, connect to one by
NQN (its namespaces then appear as /dev/nvmeXnY like local ones, and a store can span
them), disconnect."""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass

from engine._nvme import ffi, lib
from engine.nvme.discovery import Namespace, namespaces

TRANSPORTS = ("tcp", "loop", "rdma", "fc")
DEFAULT_SERVICE = {"tcp": "4420", "rdma": "4420"}
DISCOVERY_SUBTYPE = 1  # a referral to another discovery controller
NVM_SUBTYPE = 2  # an NVM subsystem: something to connect to
NAME_BYTES = 64


@dataclass(frozen=True)
class Connection:
    controller: str  # nvme1
    namespaces: list[Namespace]


@dataclass(frozen=True)
class DiscoveryEntry:
    transport: str
    address: str
    service: str
    subsystem_nqn: str
    subtype: int
    port_id: int

    @property
    def is_nvm_subsystem(self) -> bool:
        return self.subtype == NVM_SUBTYPE


# libnvme's code for "cannot open /dev/nvme-fabrics" (ENVME_CONNECT_OPEN).
CONNECT_OPEN_FAILED = 1005


def fabrics_error(result: int, what: str) -> OSError:
    """An OSError in words for a negative errno or libnvme connect code."""
    error_number = -result
    message = ffi.string(lib.ctxkv_nvme_strerror(error_number)).decode()
    if error_number == CONNECT_OPEN_FAILED:
        message += " (no NVMe-oF host driver: modprobe nvme-tcp or nvme-loop)"
    return OSError(error_number, f"{what}: {message}")


def _endpoint(transport: str, address: str | None, service: str | None) -> tuple:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    if transport != "loop" and not address:
        raise ValueError(f"a {transport} target needs an address (--address)")
    service = service or DEFAULT_SERVICE.get(transport)
    return (
        transport.encode(),
        address.encode() if address else ffi.NULL,
        service.encode() if service else ffi.NULL,
    )


def discover(
    transport: str, address: str | None = None, service: str | None = None
) -> list[DiscoveryEntry]:
    """The discovery log page of the target's discovery controller."""
    endpoint = _endpoint(transport, address, service)
    capacity = 64
    while True:
        table = ffi.new("struct ctxkv_nvme_discovery_entry[]", capacity)
        count = lib.ctxkv_nvme_discover(*endpoint, table, capacity)
        if count < 0:
            where = f"{transport} {address or ''}:{service or DEFAULT_SERVICE.get(transport, '')}"
            raise fabrics_error(count, f"NVMe-oF discovery at {where}")
        if count <= capacity:
            break
        capacity = count
    return [
        DiscoveryEntry(
            transport=ffi.string(entry.transport).decode(),
            address=ffi.string(entry.address).decode(),
            service=ffi.string(entry.service).decode(),
            subsystem_nqn=ffi.string(entry.subsystem_nqn).decode(),
            subtype=entry.subtype,
            port_id=entry.port_id,
        )
        for entry in table[0:count]
    ]


def connect(
    transport: str,
    subsystem_nqn: str,
    address: str | None = None,
    service: str | None = None,
    *,
    wait_s: float = 10.0,
) -> Connection:
    """Connects to subsystem_nqn; returns the new controller and its namespaces, once the
    kernel shows them (an empty list if none appeared within wait_s)."""
    if not subsystem_nqn:
        raise ValueError("connect needs the subsystem NQN (--nqn); `ctxkv discover` lists them")
    name = ffi.new("char[]", NAME_BYTES)
    result = lib.ctxkv_nvme_connect(
        *_endpoint(transport, address, service), subsystem_nqn.encode(), name, NAME_BYTES
    )
    if result < 0:
        raise fabrics_error(result, f"NVMe-oF connect to {subsystem_nqn} over {transport}")
    controller = ffi.string(name).decode()
    # The controller is live at once; its namespaces are scanned asynchronously.
    deadline = time.monotonic() + wait_s
    while True:
        found = [ns for ns in namespaces() if ns.subsystem_nqn == subsystem_nqn]
        if found or time.monotonic() > deadline:
            return Connection(controller, found)
        time.sleep(0.1)


def disconnect(controller: str) -> None:
    """Disconnects the fabrics controller named controller (nvme1)."""
    result = lib.ctxkv_nvme_disconnect(controller.encode())
    if result == -errno.ENODEV:
        raise OSError(errno.ENODEV, f"no NVMe controller named {controller} to disconnect")
    if result == -errno.EOPNOTSUPP:
        raise OSError(errno.EOPNOTSUPP, f"{controller} is a local (PCIe) controller, not NVMe-oF")
    if result < 0:
        raise fabrics_error(result, f"NVMe-oF disconnect of {controller}")


def controllers_of(subsystem_nqn: str) -> list[str]:
    """The controllers through which this host reaches subsystem_nqn now."""
    return sorted({ns.controller for ns in namespaces() if ns.subsystem_nqn == subsystem_nqn})
