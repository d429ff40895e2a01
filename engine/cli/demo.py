"""`ctxkv demo`: the whole product in one command. Formats a file-backed store, starts
`ctxkv serve` on it, runs a KV-cache workload through the client (a prefix chain of
4 MiB chunks put, probed and read back), prints what happened and stops the server."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from engine.bench.job import parse_size
from engine.client.client import Client
from engine.store.store import Store

MiB = 1 << 20


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="format, serve and run a KV workload; print results")
    parser.add_argument("--dir", default="/var/tmp/ctxkv-demo", help="where the store file goes")
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="store file size")
    parser.add_argument("--chunks", type=int, default=64, help="4 MiB KV chunks to put and get")
    parser.set_defaults(run=run)


def percentiles_us(latencies_ns: list[int]) -> str:
    p50, p99, p999 = np.percentile(latencies_ns, [50, 99, 99.9]) / 1e3
    return f"p50 {p50:.0f} us, p99 {p99:.0f} us, p99.9 {p999:.0f} us"


def run(arguments: argparse.Namespace) -> int:
    directory = Path(arguments.dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "store.img"
    with open(target, "ab") as file:
        file.truncate(arguments.size)
    with Store.format([target], extent_size=4 * MiB, force=True, pool_buffers=8) as store:
        slots = store.stats()["slots"]
    chunks = min(arguments.chunks, slots)
    print(f"formatted {target}: {slots} extents of 4 MiB")

    log_path = directory / "serve.log"
    with open(log_path, "w") as log:
        command = [sys.executable, "-m", "engine.cli.main", "serve", str(target)]
        server = subprocess.Popen(
            [*command, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=log, text=True
        )
    try:
        line = server.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"ctxkv serve did not start (exit {server.poll()})")
        address = line.rsplit(" ", 1)[1].strip()
        print(f"ctxkv serve (pid {server.pid}) listening on {address}, log in {log_path}")
        report = workload(address, chunks)
    finally:
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=60)
    print(report)
    print(f"server stopped with exit code {exit_code} (SIGTERM: drained, checkpointed)")
    return 0 if exit_code == 0 else 1


def workload(address: str, chunks: int) -> str:
    """A prefix chain of chunks, as an inference engine offloads one long context."""
    base = np.random.default_rng(1).integers(0, 256, 4 * MiB, dtype=np.uint8)
    keys = [f"model/llama-3-8b/prefix-{i:05d}".encode() for i in range(chunks)]

    def chunk(i: int) -> bytes:
        value = base.copy()
        value[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)
        return value.tobytes()

    with Client(address) as client:
        put_ns, get_ns = [], []
        started = time.monotonic()
        for i, key in enumerate(keys):
            value = chunk(i)
            began = time.monotonic_ns()
            client.put(key, value)
            put_ns.append(time.monotonic_ns() - began)
        put_s = time.monotonic() - started
        probe = [*keys, b"model/llama-3-8b/prefix-not-computed-yet"]
        prefix = client.longest_prefix(probe)
        started = time.monotonic()
        wrong = 0
        for i, key in enumerate(keys):
            began = time.monotonic_ns()
            value = client.get(key)
            get_ns.append(time.monotonic_ns() - began)
            wrong += value != chunk(i)
        get_s = time.monotonic() - started
        stats = client.stats()
    megabytes = chunks * 4
    return "\n".join(
        [
            f"put {chunks} chunks of 4 MiB: {megabytes / put_s:.0f} MiB/s, {percentiles_us(put_ns)}"
            " (strict: each on stable media before the reply)",
            f"longest_prefix of {len(probe)} keys: {prefix} present",
            f"get {chunks} chunks: {megabytes / get_s:.0f} MiB/s, {percentiles_us(get_ns)}; "
            f"{chunks - wrong} identical, {wrong} wrong",
            f"store: {stats['keys']} keys, {stats['hits']} hits, {stats['misses']} misses, "
            f"{stats['evictions']} evictions, {stats['journal_commits']} journal commits",
        ]
    )
