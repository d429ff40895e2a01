"""kill -9 of `ctxkv serve` under client load, on a real loop device (issue 5, acceptance 2).

Each round starts the server on the same store, checks every put acknowledged in all
earlier rounds, loads it from several client threads that record a key only once its put
was acknowledged, and SIGKILLs it at a random moment. Lost must stay 0, and no key may
return bytes that were not put under it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from engine.client.client import Client
from engine.store.store import Store

KIB, MIB = 1 << 10, 1 << 20
EXTENT = 64 * KIB
# `make test` runs a few rounds; `make test-crash` the 20 of the acceptance.
ROUNDS = int(os.environ.get("CTXKV_SERVER_KILL_ROUNDS", "5"))
CLIENTS = 4
CTXKV = [sys.executable, "-m", "engine.cli.main"]


def value_of(key: bytes) -> bytes:
    rng = random.Random(key)
    return rng.randbytes(rng.choice([1, 4096, EXTENT - 1, EXTENT + 1, rng.randint(1, 3 * EXTENT)]))


def start_server(target: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [*CTXKV, "serve", target, "--listen", "127.0.0.1:0", "--pool-buffers", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        pytest.fail(f"ctxkv serve did not start: {line!r} {process.stderr.read()[-2000:]}")
    return process, line.rsplit(" ", 1)[1].strip()


def load(address: str, prefix: str, acknowledged: list[bytes], attempted: list[bytes]) -> None:
    """Puts until the server goes away; records each key only after its put returned."""
    try:
        with Client(address, timeout=10) as client:
            for i in range(1_000_000):
                key = f"{prefix}-{i}".encode()
                attempted.append(key)
                client.put(key, value_of(key))
                acknowledged.append(key)
    except (OSError, EOFError):
        return  # the server was killed under us: this put is in flight, not acknowledged


def check(address: str, acknowledged: list[bytes], in_flight: list[bytes]) -> tuple[int, int]:
    """(lost, wrong) over every acknowledged key, and the in-flight ones (either outcome)."""
    lost = wrong = 0
    with Client(address, timeout=30) as client:
        for start in range(0, len(acknowledged), 32):
            batch = acknowledged[start : start + 32]
            for key, value in zip(batch, client.get_many(batch), strict=True):
                lost += value != value_of(key)
        for key in in_flight:
            value = client.get(key)
            wrong += value is not None and value != value_of(key)
        assert client.stats()["evictions"] == 0  # so every acknowledged key must be there
    return lost, wrong


def test_kill_9_of_the_server_under_load_loses_nothing(loop_device):
    device = loop_device(size_bytes=1024 * MIB)
    Store.format([device], extent_size=EXTENT).close()
    rng = random.Random(5)
    acknowledged: list[bytes] = []
    in_flight: list[bytes] = []
    lost = wrong = 0
    for round_index in range(ROUNDS + 1):
        process, address = start_server(device)
        try:
            round_lost, round_wrong = check(address, acknowledged, in_flight)
            lost, wrong = lost + round_lost, wrong + round_wrong
            if round_index == ROUNDS:
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=60) == 0
                break
            acked: list[list[bytes]] = [[] for _ in range(CLIENTS)]
            tried: list[list[bytes]] = [[] for _ in range(CLIENTS)]
            threads = [
                threading.Thread(
                    target=load, args=(address, f"r{round_index}-c{c}", acked[c], tried[c])
                )
                for c in range(CLIENTS)
            ]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.2, 0.8))
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
            for thread in threads:
                thread.join(timeout=30)
                assert not thread.is_alive()
            for client_acked, client_tried in zip(acked, tried, strict=True):
                acknowledged.extend(client_acked)
                in_flight.extend(client_tried[len(client_acked) :])
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    print(
        f"\nkill -9 of ctxkv serve: {ROUNDS} rounds, {len(acknowledged)} acknowledged puts "
        f"checked after every restart, {len(in_flight)} in flight at a kill; "
        f"lost = {lost}, wrong bytes = {wrong}"
    )
    assert len(acknowledged) > ROUNDS * CLIENTS
    assert lost == 0 and wrong == 0
