"""`ctxkv format | info | put | get | del | ls`: a store from the shell."""

from __future__ import annotations

import argparse
import json
import sys

from engine.bench.job import parse_size
from engine.nvme.passthru import AUTO, IO_PATHS
from engine.store.scrub import scrub
from engine.store.store import Store


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("format", help="make a new store over targets (in member order)")
    parser.add_argument("targets", nargs="+", metavar="TARGET")
    parser.add_argument(
        "--extent-size",
        type=parse_size,
        default=4 << 20,
        help="payload bytes per extent, a power of two from 64K to 64M (default 4M)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite a filesystem, partition table or store found on a target",
    )
    add_io_path_argument(parser)
    parser.set_defaults(run=run_format)

    parser = commands.add_parser("info", help="describe a store")
    parser.add_argument("targets", nargs="+", metavar="TARGET")
    parser.add_argument("--json", action="store_true")
    add_io_path_argument(parser)
    parser.set_defaults(run=run_info)

    for name, help_text, runner in (
        ("put", "store a value (from --file or standard input) under --key", run_put),
        ("get", "write the value of --key to --file or standard output", run_get),
        ("del", "delete --key", run_del),
    ):
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("targets", nargs="+", metavar="TARGET")
        parser.add_argument("--key", required=True, help="the key, as UTF-8 text")
        if name != "del":
            parser.add_argument("--file", help="read the value from / write it to this file")
        add_io_path_argument(parser)
        parser.set_defaults(run=runner)

    parser = commands.add_parser(
        "scrub",
        help="check superblocks, checkpoints, journal and every live extent; exit 1 on damage",
    )
    parser.add_argument("targets", nargs="+", metavar="TARGET")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--rebuild-index",
        action="store_true",
        help="first rebuild the index from a scan of every extent header",
    )
    parser.set_defaults(run=run_scrub)

    parser = commands.add_parser("ls", help="list the keys of a store")
    parser.add_argument("targets", nargs="+", metavar="TARGET")
    add_io_path_argument(parser)
    parser.set_defaults(run=run_ls)


def add_io_path_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--io-path",
        choices=IO_PATHS,
        default=AUTO,
        help="NVMe namespaces: io_uring passthrough on /dev/ngXnY (passthru) or the block "
        "layer (block); auto: passthru where the kernel can (default)",
    )


def run_format(arguments: argparse.Namespace) -> int:
    with Store.format(arguments.targets, extent_size=arguments.extent_size, force=arguments.force,
                      pool_buffers=2, io_path=arguments.io_path) as store:  # fmt: skip
        stats = store.stats()
    print(f"formatted store {stats['store_uuid']}: {len(arguments.targets)} member(s), "
          f"{stats['slots']} extents of {stats['extent_bytes']} bytes "
          f"({stats['capacity_bytes'] / (1 << 30):.2f} GiB)")  # fmt: skip
    return 0


def run_info(arguments: argparse.Namespace) -> int:
    with Store.open(arguments.targets, pool_buffers=2, io_path=arguments.io_path) as store:
        stats = store.stats()
    if arguments.json:
        print(json.dumps(stats, indent=2))
        return 0
    for name, value in stats.items():
        print(f"{name:>20}: {value}")
    return 0


def run_put(arguments: argparse.Namespace) -> int:
    if arguments.file:
        with open(arguments.file, "rb") as file:
            value = file.read()
    else:
        value = sys.stdin.buffer.read()
    with Store.open(arguments.targets, io_path=arguments.io_path) as store:
        store.put(arguments.key.encode(), value)
    return 0


def run_get(arguments: argparse.Namespace) -> int:
    with Store.open(arguments.targets, io_path=arguments.io_path) as store:
        value = store.get(arguments.key.encode())
    if value is None:
        print(f"ctxkv get: no key {arguments.key!r}", file=sys.stderr)
        return 1
    if arguments.file:
        with open(arguments.file, "wb") as file:
            file.write(value)
    else:
        sys.stdout.buffer.write(value)
    return 0


def run_del(arguments: argparse.Namespace) -> int:
    with Store.open(arguments.targets, pool_buffers=2, io_path=arguments.io_path) as store:
        deleted = store.delete(arguments.key.encode())
    if not deleted:
        print(f"ctxkv del: no key {arguments.key!r}", file=sys.stderr)
        return 1
    return 0


def run_ls(arguments: argparse.Namespace) -> int:
    with Store.open(arguments.targets, pool_buffers=2, io_path=arguments.io_path) as store:
        for key in sorted(store.keys()):
            print(key.decode(errors="backslashreplace"))
    return 0


def run_scrub(arguments: argparse.Namespace) -> int:
    progress = _terminal_progress() if not arguments.json else None
    report = scrub(arguments.targets, rebuild_index=arguments.rebuild_index, on_progress=progress)
    if progress is not None:
        sys.stderr.write("\r\033[K")
    if arguments.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        if report.rebuilt_values is not None:
            print(f"rebuilt the index from extent headers: {report.rebuilt_values} values")
        print(f"checked {report.values_checked} values in {report.extents_checked} extents; "
              f"replayed {report.journal_records_replayed} journal records")  # fmt: skip
        for problem in report.problems:
            print(f"DAMAGE {problem['where']}: {problem['problem']}")
        print("ok" if report.ok else f"{len(report.problems)} problem(s) found")
    return 0 if report.ok else 1


def _terminal_progress():
    if not sys.stderr.isatty():
        return None

    def show(what: str, done: int, total: int) -> None:
        sys.stderr.write(f"\r{what}: {done}/{total} ")
        sys.stderr.flush()

    return show
