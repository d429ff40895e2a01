"""The `ctxkv` command: one subcommand a module, dispatched from here."""

from __future__ import annotations

import argparse
import sys

from engine import __version__
from engine.cli import bench, demo, devices, fabrics, serve, store
from engine.errors import CtxkvError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctxkv", description="ctxkv: a KV-cache storage engine over raw NVMe namespaces"
    )
    parser.add_argument("--version", action="version", version=f"ctxkv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    store.add_parsers(commands)
    serve.add_parser(commands)
    demo.add_parser(commands)
    bench.add_parser(commands)
    devices.add_parser(commands)
    fabrics.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        return arguments.run(arguments)
    except KeyboardInterrupt:
        print("ctxkv: interrupted", file=sys.stderr)
        return 130
    except (CtxkvError, OSError, ValueError) as error:
        # Errors that explain themselves: the message, not a traceback.
        print(f"ctxkv {arguments.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
