"""The NIXL side of tests/test_nixl.py and bench/nixl_get.py's client: a NixlClient in
its own process, driven by JSON lines on stdin, one JSON answer per line on stdout.

    python tests/nixl_worker.py HOST:PORT

Values are drawn from a seed (value(seed, nbytes)), so the test process can check what
came back by digest without moving it twice. A process that made a NIXL agent can crash
at interpreter exit (NIXL's teardown), so the worker leaves with os._exit."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np

from engine.client.nixl import NixlClient


def value(seed: int, nbytes: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def digest(data: bytes | np.ndarray) -> str:
    return hashlib.sha256(data).hexdigest()


def serve(client: NixlClient, command: dict) -> object:
    """The answer to one command; errors come back as {"error": type, "message": text}."""
    op = command["op"]
    key = command.get("key", "").encode()
    if op == "put":
        client.put(key, value(command["seed"], command["nbytes"]))
        return "ok"
    if op == "put_from_arena":  # the zero-copy put: the value already in registered memory
        nbytes = command["nbytes"]
        client.arena[:nbytes] = np.frombuffer(value(command["seed"], nbytes), np.uint8)
        client.put(key, client.arena[:nbytes])
        return "ok"
    if op == "get":
        data = client.get(key)
        return None if data is None else {"nbytes": len(data), "sha256": digest(data)}
    if op == "get_into":
        destination = client.arena[command.get("offset", 0) :]
        nbytes = client.get_into(key, destination)
        return (
            None if nbytes is None else {"nbytes": nbytes, "sha256": digest(destination[:nbytes])}
        )
    if op == "late_read":  # a READ started only after the client's share of the lease
        lease = client.lease_get(key)
        time.sleep(command["seconds"])
        try:
            client.read(lease, client.arena[: lease.value_bytes])
        finally:
            client.release(lease)
        return "read"
    if op == "stats":
        return client.stats()["server"]["nixl"]
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    client = NixlClient(sys.argv[1])
    print(json.dumps({"ready": client._agent.name}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "exit":
            break
        try:
            answer = {"result": serve(client, command)}
        except Exception as error:  # the test asserts on the error the client raised
            answer = {"error": type(error).__name__, "message": str(error)}
        print(json.dumps(answer), flush=True)
    client.close()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
