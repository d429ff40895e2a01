"""`ctxkv serve`: the store behind a TCP server until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from engine.cli.store import add_io_path_argument
from engine.client.client import parse_address
from engine.server.leases import DEFAULT_LEASE_TIMEOUT_S
from engine.server.server import Server
from engine.store.store import RELAXED, STRICT, Store
from engine.tenants.config import load_tenants


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="serve a store over TCP (see docs/protocol.md)")
    parser.add_argument("targets", nargs="+", metavar="TARGET")
    parser.add_argument(
        "--listen", default="127.0.0.1:7420", help="HOST:PORT (default 127.0.0.1:7420; port 0: any)"
    )
    parser.add_argument(
        "--metrics", help="HOST:PORT to serve Prometheus /metrics on (e.g. 127.0.0.1:9420)"
    )
    access = parser.add_mutually_exclusive_group()
    access.add_argument("--token-file", help="clients must prove they know this file's token")
    access.add_argument(
        "--tenants", metavar="FILE",
        help="a tenant table (.json or .toml: name, token or token_file, quota_bytes): each "
        "client proves one tenant's token and sees only that tenant's keys",
    )  # fmt: skip
    parser.add_argument("--durability", choices=[STRICT, RELAXED], default=STRICT)
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument(
        "--log-format", choices=["text", "json"], default="text",
        help="json: one object per line on stderr, for log collectors",
    )  # fmt: skip
    parser.add_argument(
        "--discard-freed", action="store_true", help="discard extents of deleted values"
    )
    parser.add_argument(
        "--pool-buffers",
        type=int,
        default=None,
        help="extent buffers in the pool: bounds memory and the largest value (default ~256 MiB)",
    )
    parser.add_argument(
        "--nixl", action="store_true",
        help="also serve values over NIXL: the pool is registered with a NIXL agent (UCX) "
        "and clients READ/WRITE it under leases (needs ctxkv[nixl])",
    )  # fmt: skip
    parser.add_argument(
        "--nixl-lease-timeout", type=float, default=DEFAULT_LEASE_TIMEOUT_S, metavar="SECONDS",
        help=f"a NIXL lease not released or committed by then is taken back "
        f"(default {DEFAULT_LEASE_TIMEOUT_S:g})",
    )  # fmt: skip
    parser.add_argument(
        "--nixl-lease-buffers", type=int, default=None,
        help="pool buffers NIXL leases may hold at once (default half the pool)",
    )  # fmt: skip
    add_io_path_argument(parser)
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> int:
    handler = logging.StreamHandler()
    if arguments.log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    host, port = parse_address(arguments.listen)
    token = None
    if arguments.token_file:
        with open(arguments.token_file, "rb") as file:
            token = file.read().strip()
        if not token:
            raise ValueError(f"{arguments.token_file} holds no token")
    tenants = load_tenants(arguments.tenants) if arguments.tenants else []
    with Store.open(
        arguments.targets,
        durability=arguments.durability,
        pool_buffers=arguments.pool_buffers,
        discard_freed=arguments.discard_freed,
        io_path=arguments.io_path,
    ) as store:
        server = Server(
            store, host, port, token=token, tenants=tenants,
            max_connections=arguments.max_connections,
            nixl=arguments.nixl, nixl_lease_timeout_s=arguments.nixl_lease_timeout,
            nixl_lease_buffers=arguments.nixl_lease_buffers,
        )  # fmt: skip
        metrics = parse_address(arguments.metrics) if arguments.metrics else None
        asyncio.run(_serve_until_signal(server, metrics))
    # Leaving the with block checkpointed the store: the next open replays nothing.
    logging.getLogger("ctxkv.server").info("stopped cleanly")
    if arguments.nixl:
        # NIXL's libraries can crash the interpreter's own exit after their teardown;
        # everything is closed and flushed by now, so leave without it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


async def _serve_until_signal(server: Server, metrics: tuple[str, int] | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    await server.serve(
        stop, ready=_announce, metrics_address=metrics, metrics_ready=_announce_metrics
    )


def _announce(host: str, port: int) -> None:
    # On stdout, one line, so a supervisor (or a test) that asked for port 0 learns it.
    print(f"ctxkv serve: listening on {host}:{port}", flush=True)


def _announce_metrics(host: str, port: int) -> None:
    print(f"ctxkv serve: metrics on http://{host}:{port}/metrics", flush=True)
