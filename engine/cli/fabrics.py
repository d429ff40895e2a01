"""`ctxkv discover | connect | disconnect`: NVMe over Fabrics targets (libnvme)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from engine.nvme.fabrics import TRANSPORTS, connect, controllers_of, disconnect, discover


def _add_endpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", "-t", choices=TRANSPORTS, default="tcp")
    parser.add_argument("--address", "-a", help="traddr: the target's IP address (tcp, rdma)")
    parser.add_argument("--service", "-s", help="trsvcid: the target's port (default 4420)")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("discover", help="list the subsystems an NVMe-oF target exports")
    _add_endpoint(parser)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run=run_discover)

    parser = commands.add_parser(
        "connect",
        help="connect to NVMe-oF subsystems: --nqn, or every NVM subsystem the target lists",
    )
    _add_endpoint(parser)
    parser.add_argument("--nqn", "-n", help="the subsystem NQN (default: all discovered)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run=run_connect)

    parser = commands.add_parser("disconnect", help="disconnect NVMe-oF controllers")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("controller", nargs="?", help="the controller (nvme1)")
    which.add_argument("--nqn", "-n", help="every controller of this subsystem")
    parser.set_defaults(run=run_disconnect)


def run_discover(arguments: argparse.Namespace) -> int:
    entries = discover(arguments.transport, arguments.address, arguments.service)
    if arguments.json:
        print(json.dumps([asdict(entry) for entry in entries], indent=2))
        return 0
    for entry in entries:
        kind = "subsystem" if entry.is_nvm_subsystem else "discovery referral"
        where = f"{entry.address}:{entry.service}" if entry.address else "(local)"
        print(f"{entry.transport} {where} {kind} {entry.subsystem_nqn}")
    return 0


def run_connect(arguments: argparse.Namespace) -> int:
    endpoint = (arguments.transport, arguments.address, arguments.service)
    if arguments.nqn:
        nqns = [arguments.nqn]
    else:
        nqns = [entry.subsystem_nqn for entry in discover(*endpoint) if entry.is_nvm_subsystem]
        if not nqns:
            raise ValueError(f"the {arguments.transport} target lists no NVM subsystem")
    connections = [
        connect(arguments.transport, nqn, arguments.address, arguments.service) for nqn in nqns
    ]
    if arguments.json:
        print(
            json.dumps(
                [
                    {
                        "controller": c.controller,
                        "subsystem_nqn": nqn,
                        "namespaces": [ns.as_dict() for ns in c.namespaces],
                    }
                    for nqn, c in zip(nqns, connections, strict=True)
                ],
                indent=2,
            )
        )
        return 0
    for nqn, connection in zip(nqns, connections, strict=True):
        paths = ", ".join(ns.block_path for ns in connection.namespaces) or "no namespaces yet"
        print(f"connected {connection.controller} to {nqn}: {paths}")
    return 0


def run_disconnect(arguments: argparse.Namespace) -> int:
    if arguments.nqn:
        names = controllers_of(arguments.nqn)
        if not names:
            raise ValueError(f"no controller is connected to {arguments.nqn}")
    else:
        names = [arguments.controller]
    for name in names:
        disconnect(name)
        print(f"disconnected {name}")
    return 0
