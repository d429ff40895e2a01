"""Issue 4, acceptance 3: TCP get bandwidth of 4 MiB values against in-process store get,
same store file, same run, interleaved rounds, medians and their ratio.

    .venv/bin/python bench/serve_vs_store.py [--rounds 5] [--values 64] [--batch 8] [--loop]

Both sides fetch the values as an inference engine fetches a prefix: get_many of
--batch keys at a time (pipelined requests over TCP, one call in process), and both
return each value as bytes (one copy out of the pool or the socket). --batch 1 measures
one get after another. --loop serves a loop device over the image instead of the file:
a faster device, against which the network's cost shows more.

The server runs as `ctxkv serve` in a subprocess on 127.0.0.1; the in-process side opens
the same store while the server is stopped (a store has one owner at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import hugepages_reserved, loop_device, make_image

from engine.client.client import Client
from engine.store.store import Store

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results" / "serve_vs_store.json"


def in_process(target: str, keys: list[bytes], batch: int) -> float:
    with Store.open([target]) as store:
        store.get_many(keys[-batch:])  # as warm as a server that has served before
        started = time.monotonic()
        for start in range(0, len(keys), batch):
            assert None not in store.get_many(keys[start : start + batch])
        return len(keys) * 4 * MiB / (time.monotonic() - started)


def over_tcp(target: str, keys: list[bytes], batch: int) -> float:
    server = subprocess.Popen(
        [sys.executable, "-m", "engine.cli.main", "serve", str(target), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        address = server.stdout.readline().rsplit(" ", 1)[1].strip()
        with Client(address) as client:
            # Warms the server's worker threads, each of which sets up its own io_uring
            # (registering the pool) on its first request: a running server has done so.
            client.get_many(keys[-batch:] * 2)
            started = time.monotonic()
            for start in range(0, len(keys), batch):
                assert None not in client.get_many(keys[start : start + batch])
            return len(keys) * 4 * MiB / (time.monotonic() - started)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--values", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="keys per get_many")
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--loop", action="store_true", help="serve a loop device over the image")
    arguments = parser.parse_args()
    image = Path(arguments.dir) / f"ctxkv-serve-bench-{os.getpid()}.img"
    make_image(image, (arguments.values + 64) * 5 * MiB)
    keys = [f"chunk-{i}".encode() for i in range(arguments.values)]
    with contextlib.ExitStack() as stack:
        target = str(image)
        if arguments.loop:
            target = stack.enter_context(loop_device(image))
            stack.enter_context(hugepages_reserved(2 * 64 * 2 + 8))  # two stores' pools
        stack.callback(image.unlink, missing_ok=True)
        runs = measure(target, keys, arguments.rounds, arguments.batch)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    ratio = medians["tcp get"] / medians["in-process get"]
    print(f"medians: in-process {medians['in-process get'] / MiB:.0f} MiB/s, "
          f"tcp {medians['tcp get'] / MiB:.0f} MiB/s; tcp/in-process {ratio:.3f}")  # fmt: skip
    report = {"target": "loop device" if arguments.loop else "file", "batch": arguments.batch,
              "runs_bytes_per_s": runs, "ratio": ratio}  # fmt: skip
    RESULTS.write_text(json.dumps(report, indent=2))
    return 0


def measure(target: str, keys: list[bytes], rounds: int, batch: int) -> dict[str, list[float]]:
    """Fills the store, then alternates in-process and TCP rounds."""
    with Store.format([target], extent_size=4 * MiB, force=True) as store:
        value = os.urandom(4 * MiB)
        for start in range(0, len(keys), 8):
            store.put_many([(key, value) for key in keys[start : start + 8]])
    runs: dict[str, list[float]] = {"in-process get": [], "tcp get": []}
    for round_index in range(rounds):
        runs["in-process get"].append(in_process(target, keys, batch))
        runs["tcp get"].append(over_tcp(target, keys, batch))
        print(f"round {round_index + 1}: " + ", ".join(
            f"{name} {values[-1] / MiB:.0f} MiB/s" for name, values in runs.items()
        ), flush=True)  # fmt: skip
    return runs


if __name__ == "__main__":
    sys.exit(main())
