"""Issue 4, acceptance 2: NIXL get bandwidth through ctxkv against a bare NIXL transfer.

    .venv/bin/python bench/nixl_get.py [--rounds 10] [--values 32] [--dir /var/tmp]

A file-backed store of 4 MiB extents is served by `ctxkv serve --nixl` (a subprocess on
127.0.0.1); this process is the NixlClient. Each round runs, interleaved value by value
(C A B for one value, B C A for the next):
  A  bare NIXL: the client's agent READs 4 MiB from the pool buffer of B's latest lease,
     just filled again by C's device read, as B's source is by its own (the same agents,
     sizes and memory as B; no request, no lease, no store); then A' reads it again at
     once: a warm source, for scale (the ratios are against A);
  B  ctxkv NIXL get of each value: lease (the server reads the extent from the file into
     a pool buffer), READ, crc32c check, release. Two figures: (a) the READ alone,
     against A: the zero-copy claim; (b) end to end, lease request to value verified in
     client memory and released: what get_into costs, the device read included;
  C  ctxkv TCP get_into of the same values, for context.
Bandwidths are per round (values x 4 MiB / summed op time); ratios are of the medians
over rounds. Latencies are per op, all rounds pooled.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import make_image

from engine.client.client import Client
from engine.client.nixl import NixlClient
from engine.store.store import Store

MiB = 1 << 20
VALUE_BYTES = 4 * MiB
POOL_BUFFERS = 16
RESULTS = Path(__file__).resolve().parent / "results"


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def bare_read(client: NixlClient, destination: np.ndarray, remote_address: int) -> float:
    # The client's own agent and peer, with no lease around them.
    local = [(destination.ctypes.data, VALUE_BYTES)]
    started = time.perf_counter()
    client._agent.transfer(
        "READ", local, [(remote_address, VALUE_BYTES)], client._peer, time.monotonic() + 10
    )
    return time.perf_counter() - started


def ctxkv_get(
    client: NixlClient, key: bytes, destination: np.ndarray
) -> tuple[float, float, float, int]:
    """(lease seconds, READ seconds, end-to-end seconds, the pool buffer's address in
    the server) of one NIXL get."""
    started = time.perf_counter()
    lease = client.lease_get(key)
    read_started = time.perf_counter()
    client.read(lease, destination, verify=False)
    read_s = time.perf_counter() - read_started
    client.verify(lease, destination)
    client.release(lease)
    end_to_end_s = time.perf_counter() - started
    return read_started - started, read_s, end_to_end_s, lease.grant.parts[0].address


def ctxkv_get_timed(
    client: NixlClient, key: bytes, destination: np.ndarray, times: dict[str, list[float]]
) -> int:
    lease_s, read_s, end_to_end_s, remote_address = ctxkv_get(client, key, destination)
    times["lease"].append(lease_s)
    times["read"].append(read_s)
    times["end_to_end"].append(end_to_end_s)
    return remote_address


def tcp_get(client: Client, key: bytes, destination: bytearray) -> float:
    started = time.perf_counter()
    assert client.get_into(key, destination) == VALUE_BYTES
    return time.perf_counter() - started


def run(arguments: argparse.Namespace, directory: Path) -> dict:
    target = directory / "nixl-bench.img"
    make_image(target, (arguments.values + 64) * VALUE_BYTES)
    Store.format([target], extent_size=VALUE_BYTES, pool_buffers=POOL_BUFFERS).close()
    server = subprocess.Popen(
        [sys.executable, "-m", "engine.cli.main", "serve", str(target), "--listen",
         "127.0.0.1:0", "--pool-buffers", str(POOL_BUFFERS), "--nixl"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        address = server.stdout.readline().rsplit(" ", 1)[1].strip()
        keys = [f"bench-{i}".encode() for i in range(arguments.values)]
        rng = np.random.default_rng(0)
        with Client(address) as tcp:
            for key in keys:
                tcp.put(key, rng.integers(0, 256, VALUE_BYTES, dtype=np.uint8).tobytes())
            client = NixlClient(address, arena_bytes=VALUE_BYTES)
            destination = client.arena
            tcp_buffer = bytearray(VALUE_BYTES)
            samples = {
                "bare": [], "bare_warm": [], "lease": [], "read": [], "end_to_end": [], "tcp": []
            }  # fmt: skip
            rounds = {name: [] for name in samples}
            for _ in range(2):  # warm-up: connections, first registrations, page tables
                *_, remote_address = ctxkv_get(client, keys[0], destination)
                bare_read(client, destination, remote_address)
            for _round in range(arguments.rounds):
                times = {name: [] for name in samples}
                for index, key in enumerate(keys):
                    # C A B for one value, B C A for the next: A and B take turns going
                    # first, and each READs a pool buffer the device has just filled (B
                    # its lease's; A the one C's TCP get read into, which the pool's LIFO
                    # free list makes the buffer of B's last lease). A source that was
                    # just read instead is warm in the caches and reads faster.
                    if index % 2 == 1:
                        remote_address = ctxkv_get_timed(client, key, destination, times)
                    times["tcp"].append(tcp_get(tcp, key, tcp_buffer))
                    times["bare"].append(bare_read(client, destination, remote_address))
                    times["bare_warm"].append(bare_read(client, destination, remote_address))
                    if index % 2 == 0:
                        remote_address = ctxkv_get_timed(client, key, destination, times)
                for name, values in times.items():
                    samples[name].extend(values)
                    rounds[name].append(len(values) * VALUE_BYTES / sum(values))
            client.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        target.unlink()
    medians = {name: statistics.median(bandwidths) for name, bandwidths in rounds.items()}
    return {
        "load_average_1min": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "value_bytes": VALUE_BYTES,
        "values": arguments.values,
        "rounds": arguments.rounds,
        "round_bandwidth_bytes_per_s": rounds,
        "median_bandwidth_bytes_per_s": medians,
        "latency_us": {
            name: {
                "p50": percentile(values, 0.50) * 1e6,
                "p99": percentile(values, 0.99) * 1e6,
                "p999": percentile(values, 0.999) * 1e6,
            }
            for name, values in samples.items()
        },
        "ratio_read_to_bare": medians["read"] / medians["bare"],
        "ratio_read_to_warm_bare": medians["read"] / medians["bare_warm"],
        "ratio_end_to_end_to_bare": medians["end_to_end"] / medians["bare"],
        "ratio_tcp_to_bare": medians["tcp"] / medians["bare"],
    }


def describe(result: dict) -> str:
    labels = {
        "bare": "A   bare NIXL READ (same agents, same buffers)",
        "bare_warm": "A'  bare NIXL READ again at once (source warm in the caches)",
        "lease": "B.l ctxkv NIXL get, lease request (server reads the file)",
        "read": "B.a ctxkv NIXL get, READ phase",
        "end_to_end": "B.b ctxkv NIXL get, end to end (lease+device read+READ+crc+release)",
        "tcp": "C   ctxkv TCP get_into, end to end",
    }
    lines = [
        f"NIXL get of {result['values']} values of {result['value_bytes'] // MiB} MiB, "
        f"{result['rounds']} rounds interleaved value by value (C A B, B C A), 127.0.0.1, UCX "
        f"defaults; {result['cpus']} CPUs, load average {result['load_average_1min']:.1f}",
        f"{'path':70} {'MB/s med':>9} {'p50 us':>8} {'p99 us':>8} {'p999 us':>8}",
    ]
    for name, label in labels.items():
        latency = result["latency_us"][name]
        lines.append(
            f"{label:70} {result['median_bandwidth_bytes_per_s'][name] / 1e6:9.0f} "
            f"{latency['p50']:8.0f} {latency['p99']:8.0f} {latency['p999']:8.0f}"
        )
    lines += [
        f"ratio (a) READ phase / bare:      {result['ratio_read_to_bare']:.3f}",
        f"ratio (a') READ phase / warm A':  {result['ratio_read_to_warm_bare']:.3f}",
        f"ratio (b) end to end / bare:      {result['ratio_end_to_end_to_bare']:.3f}",
        f"ratio     TCP end to end / bare:  {result['ratio_tcp_to_bare']:.3f}",
        "A and B.a each READ a source the device has just filled (B its lease's read, A the",
        "same pool buffer refilled by C's read); A' reads A's source again at once (warm).",
        "B.b includes the extent's read from the file on every get: nothing is cached.",
        "per-round MB/s: "
        + "; ".join(
            f"{name} " + " ".join(f"{b / 1e6:.0f}" for b in bandwidths)
            for name, bandwidths in result["round_bandwidth_bytes_per_s"].items()
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--values", type=int, default=32)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=arguments.dir) as directory:
        result = run(arguments, Path(directory))
    text = describe(result)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nixl.txt").write_text(text + "\n")
    (RESULTS / "nixl.json").write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.flush()
    # This process made a NIXL UCX agent, and NIXL's teardown can crash interpreter exit.
    os._exit(0)


if __name__ == "__main__":
    main()
