"""The NVMe batch, run inside the QEMU guest (vm/run.sh) by tests/test_nvme_vm.py.

One interpreter start for every check: Python under TCG is slow to start. Each check
records what it measured (never a verdict the host cannot re-check) into a JSON file on
the writable 9p share after every step, so a guest that dies mid-way still reports how
far it got. The host test asserts on the results.

usage: guest_batch.py RESULTS_JSON CHECK...
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np

from engine.cli.devices import describe
from engine.io.buffers import BufferPool
from engine.io.ring import UNREGISTERED_BUFFER, Op, Ring
from engine.nvme import fabrics
from engine.nvme.device import Device
from engine.nvme.discovery import namespaces
from engine.store.store import Store

LOCAL_BLOCK = "/dev/nvme0n1"
LOCAL_GENERIC = "/dev/ng0n1"
MIB = 1 << 20
NQN_PREFIX = "nqn.2026-11.io.ctxkv.test"
NVMET = "/sys/kernel/config/nvmet"

results: dict = {"checks": {}, "order": []}


def save(path: str) -> None:
    with open(path + ".tmp", "w") as file:
        json.dump(results, file, indent=1, default=str)
    os.replace(path + ".tmp", path)


def log(message: str) -> None:
    print(f"[guest {time.monotonic():8.1f}s] {message}", flush=True)


def values_spanning_extents(extent_bytes: int) -> dict[bytes, bytes]:
    """Values of 1 to 3.5 extents, and one of a few bytes: parts land on several slots."""
    rng = np.random.default_rng(7)
    sizes = [extent_bytes * 3 + extent_bytes // 2, extent_bytes, 2 * extent_bytes + 4096, 17]
    return {f"key-{i}".encode(): rng.bytes(size) for i, size in enumerate(sizes)}


def store_round_trip(targets: list[str], io_path: str, extent_bytes: int) -> dict:
    """Format, put, get and verify; close, reopen (on the other path too), verify again;
    delete with discard of the freed extents."""
    values = values_spanning_extents(extent_bytes)
    with Store.format(
        targets, extent_size=extent_bytes, force=True, io_path=io_path, discard_freed=True
    ) as store:
        device_paths = [device.io_path for device in store._devices]
        store.put_many(list(values.items()))
        verified = sum(store.get(key) == value for key, value in values.items())
        stats = store.stats()
    largest = max(len(value) for value in values.values())
    log(f"store over {' '.join(targets)} on the {'/'.join(device_paths)} path: put and got "
        f"{verified}/{len(values)} values of up to {largest} bytes")  # fmt: skip
    # Reopened on the other path too: both see the same bytes. A /dev/ngXnY target has
    # only the passthrough path.
    other = {"passthru": "block", "block": "passthru", "auto": "passthru"}[io_path]
    reopened = {}
    for path in (io_path, other):
        with Store.open(targets, io_path=path) as store:
            reopened[path] = {
                "io_paths": [device.io_path for device in store._devices],
                "verified": sum(store.get(key) == value for key, value in values.items()),
            }
            log(f"  reopened on the {path} path: {reopened[path]['verified']} values verified")
    with Store.open(targets, io_path=io_path) as store:
        deleted = store.delete(b"key-0")
        after_delete = store.get(b"key-0")
        others_intact = sum(store.get(k) == v for k, v in values.items() if k != b"key-0")
    return {
        "targets": targets,
        "io_path_asked": io_path,
        "device_io_paths": device_paths,
        "values": len(values),
        "value_bytes": sum(len(v) for v in values.values()),
        "extent_bytes": extent_bytes,
        "verified": verified,
        "reopened": reopened,
        "deleted": deleted,
        "get_after_delete_is_none": after_delete is None,
        "others_intact_after_delete": others_intact,
        "slots": stats["slots"],
    }


def describe_namespace(ns) -> str:
    return (
        f"{ns.block_path} + {ns.generic_path}: {ns.model!r} serial {ns.serial} firmware "
        f"{ns.firmware} ({ns.transport}), nsid {ns.nsid}, LBA {ns.lba_bytes}+"
        f"{ns.metadata_bytes} bytes (format {ns.lba_format} of {ns.lba_format_count}), "
        f"MDTS {ns.mdts}, {ns.capacity_bytes} bytes"
    )


def check_identify() -> dict:
    found = []
    for ns in namespaces():
        log(f"identify {describe_namespace(ns)}")
        found.append(ns.as_dict())
    cli = {}
    for name, argv in (
        ("id_ctrl", ["nvme", "id-ctrl", "/dev/nvme0", "-o", "json"]),
        ("id_ns", ["nvme", "id-ns", LOCAL_GENERIC, "-o", "json"]),
    ):
        completed = subprocess.run(argv, capture_output=True, text=True, check=False)
        cli[name] = json.loads(completed.stdout) if completed.returncode == 0 else None
    id_ctrl, id_ns = cli["id_ctrl"] or {}, cli["id_ns"] or {}
    flbas = id_ns.get("flbas", 0)
    lbaf = (id_ns.get("lbafs") or [{}])[flbas & 0xF] if id_ns else {}
    return {
        "namespaces": found,
        "nvme_cli": {
            "serial": str(id_ctrl.get("sn", "")).strip(),
            "model": str(id_ctrl.get("mn", "")).strip(),
            "firmware": str(id_ctrl.get("fr", "")).strip(),
            "mdts": id_ctrl.get("mdts"),
            "nsze": id_ns.get("nsze"),
            "lba_bytes": 1 << lbaf["ds"] if "ds" in lbaf else None,
            "metadata_bytes": lbaf.get("ms"),
        },
    }


def check_devices_json() -> dict:
    from engine.cli.main import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(["devices", "--json"])
    return {"exit_status": status, "devices": json.loads(stdout.getvalue())}


def check_passthru_ring() -> dict:
    """Raw NVMe commands: writes and reads of 2 MiB (4 commands at MDTS 512 KiB) through
    registered and unregistered buffers, a flush, and a deallocate that reads back zeros."""
    with Device.open(LOCAL_BLOCK, io_path="passthru") as device:
        with BufferPool(2 * MIB, 4) as pool, Ring([device], pool) as ring:
            leases = pool.lease_many(4)
            try:
                return passthru_round_trips(device, ring, leases)
            finally:
                for lease in leases:
                    lease.release()


def passthru_round_trips(device: Device, ring: Ring, leases: list) -> dict:
    rng = np.random.default_rng(3)
    for lease in leases[:2]:
        lease.array[:] = rng.integers(0, 256, lease.nbytes, dtype=np.uint8)
    ring.write(0, 0, leases[0])
    # An unregistered buffer: the plain (not IORING_URING_CMD_FIXED) command.
    ios = Ring.batch(1)
    ios[0] = (8 * MIB, leases[1].address, 2 * MIB, UNREGISTERED_BUFFER, 0, Op.WRITE)
    ring.run(ios)
    ring.fsync(0)
    chunk_bytes = device.geometry.max_transfer_bytes
    log(f"passthru {device.passthru.path}: 2 MiB writes as NVMe commands of {chunk_bytes} "
        "bytes, registered and plain buffers, flush")  # fmt: skip
    ring.read(0, 0, leases[2])
    ios[0] = (8 * MIB, leases[3].address, 2 * MIB, UNREGISTERED_BUFFER, 0, Op.READ)
    ring.run(ios)
    fixed_ok = bool(np.array_equal(leases[0].array, leases[2].array))
    plain_ok = bool(np.array_equal(leases[1].array, leases[3].array))
    device.discard(0, 2 * MIB)
    ring.read(0, 0, leases[2])
    return {
        "io_path": device.io_path,
        "generic_path": device.passthru.path,
        "nsid": device.passthru.nsid,
        "fixed_buffers": device.passthru.fixed_buffers,
        "lba_shift": device.passthru.lba_shift,
        "chunk_bytes": device.geometry.max_transfer_bytes,
        "ring_setup_flags": ring.setup_flag_names,
        "registered_buffer_round_trip": fixed_ok,
        "plain_buffer_round_trip": plain_ok,
        "zeros_after_deallocate": not leases[2].array.any(),
    }


def write_configfs(path: str, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


def export_nvmet(name: str, port_id: int, port: dict[str, str], image_bytes: int) -> str:
    """An nvmet subsystem with one file-backed namespace, exported on a port."""
    nqn = f"{NQN_PREFIX}:{name}"
    # On tmpfs (vm/init mounts one on /run): nvmet's file backend takes its block size
    # from the backing inode, and on the overlay over 9p that comes out as 1 byte.
    image = f"/run/nvmet-{name}.img"
    with open(image, "wb") as file:
        file.truncate(image_bytes)
    subsystem = f"{NVMET}/subsystems/{nqn}"
    os.mkdir(subsystem)
    write_configfs(f"{subsystem}/attr_allow_any_host", "1")
    os.mkdir(f"{subsystem}/namespaces/1")
    write_configfs(f"{subsystem}/namespaces/1/device_path", image)
    # tmpfs has no O_DIRECT.
    write_configfs(f"{subsystem}/namespaces/1/buffered_io", "1")
    write_configfs(f"{subsystem}/namespaces/1/enable", "1")
    port_dir = f"{NVMET}/ports/{port_id}"
    os.mkdir(port_dir)
    for key, value in port.items():
        write_configfs(f"{port_dir}/{key}", value)
    os.symlink(subsystem, f"{port_dir}/subsystems/{nqn}")
    log(f"nvmet: {nqn} exports {image} on port {port_id} ({port['addr_trtype']})")
    return nqn


def check_fabrics() -> dict:
    tcp_nqn = export_nvmet(
        "tcp",
        1,
        {"addr_trtype": "tcp", "addr_adrfam": "ipv4", "addr_traddr": "127.0.0.1",
         "addr_trsvcid": "4420"},
        256 * MIB,
    )  # fmt: skip
    loop_nqn = export_nvmet("loop", 2, {"addr_trtype": "loop"}, 256 * MIB)
    discovered = fabrics.discover("tcp", "127.0.0.1", "4420")
    log(f"discover tcp 127.0.0.1:4420: {[entry.subsystem_nqn for entry in discovered]}")
    tcp = fabrics.connect("tcp", tcp_nqn, "127.0.0.1", "4420")
    loop = fabrics.connect("loop", loop_nqn)
    for connection in (tcp, loop):
        for ns in connection.namespaces:
            log(f"connected {connection.controller}: {describe_namespace(ns)}")
    targets = [tcp.namespaces[0].block_path, loop.namespaces[0].block_path]
    remote = {
        "tcp": [ns.as_dict() for ns in tcp.namespaces],
        "loop": [ns.as_dict() for ns in loop.namespaces],
    }
    store = {path: store_round_trip(targets, path, MIB) for path in ("passthru", "block")}
    fabrics.disconnect(tcp.controller)
    fabrics.disconnect(loop.controller)
    left = [ns.block_path for ns in namespaces() if ns.subsystem_nqn in (tcp_nqn, loop_nqn)]
    log(f"disconnected {tcp.controller} and {loop.controller}; namespaces left: {left}")
    return {
        "discovered": [entry.__dict__ for entry in discovered],
        "tcp_nqn": tcp_nqn,
        "loop_nqn": loop_nqn,
        "controllers": [tcp.controller, loop.controller],
        "remote_namespaces": remote,
        "store": store,
        "namespaces_left_after_disconnect": left,
    }


def check_holds_store() -> dict:
    """After the local store checks, `ctxkv devices` names the store on nvme0n1."""
    local = [ns for ns in namespaces() if ns.block_path == LOCAL_BLOCK]
    return {"holds": describe(local[0])["holds"] if local else None}


CHECKS = {
    "identify": check_identify,
    "devices_json": check_devices_json,
    "passthru_ring": check_passthru_ring,
    "store_block": lambda: store_round_trip([LOCAL_BLOCK], "block", 4 * MIB),
    "store_passthru": lambda: store_round_trip([LOCAL_BLOCK], "passthru", 4 * MIB),
    "store_generic_path": lambda: store_round_trip([LOCAL_GENERIC], "auto", 4 * MIB),
    "holds_store": check_holds_store,
    "fabrics": check_fabrics,
}


def main(argv: list[str]) -> int:
    results_path, names = argv[0], argv[1:] or list(CHECKS)
    failed = 0
    for name in names:
        log(f"check {name}: start")
        started = time.monotonic()
        entry: dict = {}
        try:
            entry["result"] = CHECKS[name]()
            entry["ok"] = True
        except BaseException as error:  # every check reports, even after one fails
            entry["ok"] = False
            entry["error"] = f"{type(error).__name__}: {error}"
            entry["traceback"] = traceback.format_exc()
            failed += 1
        entry["seconds"] = round(time.monotonic() - started, 1)
        results["checks"][name] = entry
        results["order"].append(name)
        save(results_path)
        log(f"check {name}: {'ran' if entry['ok'] else 'FAILED ' + entry['error']} "
            f"in {entry['seconds']}s")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
