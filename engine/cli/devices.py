"""`ctxkv devices [--json]`: the NVMe namespaces ctxkv could use, and what each holds now."""

from __future__ import annotations

import argparse
import json
import sys

from engine.nvme.device import Device, holders_of
from engine.nvme.discovery import Namespace, absence_note, namespaces
from engine.store.format import existing_contents


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "devices", help="list NVMe namespaces (candidate targets) and what each holds now"
    )
    parser.add_argument("--json", action="store_true", help="a JSON list, one object a namespace")
    parser.set_defaults(run=run_devices)


def contents_of(path: str) -> list[str]:
    """What the block device at path holds: its users (mounts, holders, swap), else the
    filesystem, partition table or ctxkv store signatures on it. [] means nothing."""
    uses = holders_of(path)
    if uses:
        return [f"in use: {use}" for use in uses]
    with Device.open(path, writable=False, exclusive=False) as device:
        return existing_contents(device)


def describe(namespace: Namespace) -> dict:
    entry = namespace.as_dict()
    try:
        entry["holds"] = contents_of(namespace.block_path)
    except OSError as error:
        entry["holds"] = [f"unknown: {error}"]
    return entry


def run_devices(arguments: argparse.Namespace) -> int:
    entries = [describe(namespace) for namespace in namespaces()]
    if not entries:
        # Not an error: a machine without NVMe still runs ctxkv on block devices and files.
        print(f"ctxkv devices: {absence_note()}", file=sys.stderr)
    if arguments.json:
        print(json.dumps(entries, indent=2))
        return 0
    for entry in entries:
        holds = "; ".join(entry["holds"]) or "nothing"
        mdts = f"{entry['mdts_bytes'] // 1024} KiB" if entry["mdts_bytes"] else "no limit"
        print(
            f"{entry['block_path']} ({entry['generic_path'] or 'no generic device'}): "
            f"{entry['model']} serial {entry['serial']} firmware {entry['firmware']}, "
            f"{entry['transport']}, nsid {entry['nsid']}, "
            f"{entry['capacity_bytes'] / (1 << 30):.2f} GiB in {entry['lba_bytes']}+"
            f"{entry['metadata_bytes']}-byte blocks (LBA format {entry['lba_format']}), "
            f"MDTS {mdts}; holds: {holds}"
        )
    return 0
