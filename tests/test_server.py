"""`ctxkv serve` and its client over 127.0.0.1: identical values, concurrent clients,
tokens, hostile bytes, and a clean SIGTERM. The server runs as a real subprocess."""

import asyncio
import json
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.client.aio import AsyncClient
from engine.client.client import AuthenticationError, Client, ClientPool, RequestError
from engine.server.protocol import (
    HEADER,
    HELLO,
    HELLO_MAGIC,
    PROTOCOL_VERSION,
    Header,
    Opcode,
    pack_key,
)
from engine.store.store import Store

MIB = 1 << 20
EXTENT = 1 * MIB
CTXKV = [sys.executable, "-m", "engine.cli.main"]


class Served:
    def __init__(self, target: str, process: subprocess.Popen, address: str):
        self.target, self.process, self.address = target, process, address
        self.metrics_url = ""

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def serve(tmp_path):
    """Factory: serve(token=None) formats a file-backed store and serves it on a free port."""
    started: list[Served] = []

    def start(
        token: bytes | None = None, metrics: bool = False, arguments: tuple[str, ...] = (),
        size_bytes: int = 1024 * MIB,
    ) -> Served:  # fmt: skip
        """arguments: more for ctxkv serve. size_bytes: the default's ~1000 extents mean
        the 200 values of the tests here never wrap the log."""
        target = str(tmp_path / f"store-{len(started)}.img")
        with open(target, "wb") as file:
            file.truncate(size_bytes)
        Store.format([target], extent_size=EXTENT, pool_buffers=8).close()
        command = [*CTXKV, "serve", target, "--listen", "127.0.0.1:0", "--pool-buffers", "8"]
        command += arguments
        if token is not None:
            token_file = tmp_path / f"token-{len(started)}"
            token_file.write_bytes(token)
            command += ["--token-file", str(token_file)]
        if metrics:
            command += ["--metrics", "127.0.0.1:0"]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = process.stdout.readline()
        if "listening on" not in line:
            process.kill()
            pytest.fail(f"ctxkv serve did not start: {line!r} {process.stderr.read()[-2000:]}")
        served = Served(target, process, line.rsplit(" ", 1)[1].strip())
        if metrics:
            served.metrics_url = process.stdout.readline().rsplit(" ", 1)[1].strip()
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def value_of(seed: int) -> bytes:
    rng = random.Random(seed)
    return rng.randbytes(rng.choice([1, 100, 4096, 65537, EXTENT - 1, EXTENT, 2 * EXTENT + 7]))


def test_values_round_trip_through_the_server(serve):
    served = serve()
    with Client(served.address) as client:
        keys = [f"value-{i}".encode() for i in range(200)]
        for i, key in enumerate(keys):
            client.put(key, value_of(i))
        for i, key in enumerate(keys):
            assert client.get(key) == value_of(i), key
        expected = [value_of(i) for i in range(5)]
        assert client.get_many([*keys[:5], b"absent"]) == [*expected, None]
        assert client.contains(keys[0]) and not client.contains(b"absent")
        assert client.longest_prefix([keys[0], keys[1], b"absent", keys[2]]) == 2
        assert client.delete(keys[0]) and not client.delete(keys[0])
        assert client.get(keys[0]) is None
        buffer = bytearray(3 * EXTENT)
        assert client.get_into(keys[1], buffer) == len(value_of(1))
        stats = client.stats()
        assert stats["keys"] == 199 and stats["server"]["connections"] == 1
    assert served.stop() == 0
    with Store.open([served.target]) as store:  # SIGTERM checkpointed: nothing to replay
        assert store.replayed_records == 0
        assert store.get(keys[7]) == value_of(7)


def test_32_clients_for_30_seconds_see_no_errors(serve):
    served = serve()
    errors = []
    rounds = [0] * 32
    deadline = time.monotonic() + 30

    def worker(index: int) -> None:
        try:
            with Client(served.address) as client:
                while time.monotonic() < deadline:
                    key = f"client-{index}-{rounds[index]}".encode()
                    value = value_of(index * 100_000 + rounds[index])
                    client.put(key, value)
                    assert client.get(key) == value
                    rounds[index] += 1
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert min(rounds) > 0
    with Client(served.address) as client:
        stats = client.stats()
        assert stats["puts"] == sum(rounds) and stats["corrupt_reads"] == 0


def test_tokens_are_proved_not_sent(serve):
    served = serve(token=b"s3cret-token")
    with pytest.raises(AuthenticationError, match="requires a token"):
        Client(served.address)
    with pytest.raises(AuthenticationError, match="refused the token"):
        Client(served.address, token="wrong")
    with Client(served.address, token="s3cret-token") as client:
        client.put(b"k", b"v")
        assert client.get(b"k") == b"v"


def test_a_value_too_large_is_refused_and_the_connection_goes_on(serve):
    served = serve()
    with Client(served.address) as client:
        with pytest.raises(RequestError, match="needs 9 extents"):
            client.put(b"huge", bytes(9 * EXTENT))  # the pool holds 8 buffers
        client.put(b"small", b"ok")
        assert client.get(b"small") == b"ok"


def raw_connection(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.recv(HELLO.size, socket.MSG_WAITALL)
    return connection


def recv_exactly(connection: socket.socket, nbytes: int) -> bytes:
    # MSG_WAITALL alone may return early on a socket with a timeout.
    data = bytearray()
    while len(data) < nbytes:
        chunk = connection.recv(nbytes - len(data))
        assert chunk, "the server hung up"
        data += chunk
    return bytes(data)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_hostile_bytes_leave_the_server_serving(serve):
    served = serve()
    rng = random.Random(5)
    for attempt in range(10_000):
        if attempt == 1000:  # past warm-up: allocator pools and caches have grown
            baseline_bytes = rss_bytes(served.process.pid)
        connection = raw_connection(served.address)
        try:
            kind = attempt % 5
            if kind == 0:  # garbage instead of a hello
                connection.sendall(rng.randbytes(rng.randint(1, 200)))
            elif kind == 1:  # a good hello, then garbage frames
                connection.sendall(HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, bytes(32)))
                connection.sendall(rng.randbytes(rng.randint(1, 500)))
            elif kind == 2:  # a header whose length lies far beyond any limit
                connection.sendall(HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, bytes(32)))
                connection.sendall(Header(Opcode.PUT, 0, 1, 0xFFFF_FFFF).pack())
            elif kind == 3:  # a PUT whose payload stops halfway, then a hang-up
                connection.sendall(HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, bytes(32)))
                body = struct.pack("<H", 1) + b"k"
                connection.sendall(Header(Opcode.PUT, 0, 1, len(body) + 100_000).pack() + body)
                connection.sendall(bytes(5000))
            else:  # a wrong protocol version
                connection.sendall(HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION + 7, 0, bytes(32)))
        finally:
            connection.close()
    with Client(served.address) as client:
        client.put(b"still", b"here")
        assert client.get(b"still") == b"here"
        server_counters = client.stats()["server"]
        assert server_counters["protocol_errors"] >= 2000  # at least every lying length
        assert client.stats()["slots_live"] == 1  # no torn PUT became a value
    assert rss_bytes(served.process.pid) < baseline_bytes + 16 * MIB
    assert served.stop() == 0


def test_pipelined_requests_are_answered_in_order_and_see_earlier_writes(serve):
    """Many requests sent before any answer is read: answers come back in request order,
    a GET after a PUT/DELETE of its key sees it, reads in between run in parallel. A
    client that hangs up mid-pipeline leaves no pool buffer taken."""
    served = serve()
    connection = raw_connection(served.address)
    connection.sendall(HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, bytes(32)))
    assert Header.unpack(connection.recv(HEADER.size, socket.MSG_WAITALL), 0).status == 0
    expected: list[tuple[int, bytes | None]] = []  # (status, body) per request
    requests = []
    values = {}
    rng = random.Random(11)
    for request_id in range(1, 121):
        key = f"k{rng.randrange(4)}".encode()
        roll = rng.random()
        if roll < 0.3:
            value = rng.randbytes(rng.choice([10, EXTENT + 3]))
            body = pack_key(key) + value
            requests.append(Header(Opcode.PUT, 0, request_id, len(body)).pack() + body)
            values[key] = value
            expected.append((0, b""))
        elif roll < 0.4:
            body = pack_key(key)
            requests.append(Header(Opcode.DELETE, 0, request_id, len(body)).pack() + body)
            expected.append((0 if values.pop(key, None) is not None else 1, b""))
        else:
            body = pack_key(key)
            requests.append(Header(Opcode.GET, 0, request_id, len(body)).pack() + body)
            expected.append((0, values[key]) if key in values else (1, b""))
    sender = threading.Thread(target=connection.sendall, args=(b"".join(requests),))
    sender.start()  # the server answers while we still send: read concurrently
    for request_id, (status, body) in enumerate(expected, 1):
        response = Header.unpack(recv_exactly(connection, HEADER.size), 1 << 30)
        assert (response.request_id, response.status) == (request_id, status), request_id
        assert recv_exactly(connection, response.body_bytes) == body, request_id
    sender.join()
    # Hang up with a pipeline full of GETs of a two-extent value.
    body = pack_key(b"big")
    with Client(served.address) as client:
        client.put(b"big", bytes(2 * EXTENT))
    frames = b"".join(Header(Opcode.GET, 0, i, len(body)).pack() + body for i in range(64))
    for _ in range(5):
        hasty = raw_connection(served.address)
        hasty.sendall(HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, bytes(32)) + frames)
        hasty.recv(HEADER.size + 100)
        hasty.close()
    connection.close()
    deadline = time.monotonic() + 30
    with Client(served.address) as client:
        while client.stats()["server"]["pool_leased"] != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.stats()["server"]["pool_leased"] == 0
        assert client.get(b"big") == bytes(2 * EXTENT)


def test_unknown_opcode_is_a_bad_request(serve):
    served = serve()
    connection = raw_connection(served.address)
    connection.sendall(HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, bytes(32)))
    ok = connection.recv(HEADER.size, socket.MSG_WAITALL)
    assert Header.unpack(ok, 0).status == 0
    connection.sendall(Header(99, 0, 7, 0).pack())
    response = Header.unpack(connection.recv(HEADER.size, socket.MSG_WAITALL), 1 << 20)
    assert response.status == 2  # BAD_REQUEST
    assert b"unknown opcode 99" in connection.recv(response.body_bytes, socket.MSG_WAITALL)
    connection.close()


def test_nixl_opcodes_without_nixl_are_refused_by_name(serve):
    served = serve()
    with Client(served.address) as client:
        client._socket.sendall(Header(Opcode.NIXL_CONNECT, 0, 1, 0).pack())
        response, body = client._read_response()
    assert response.status == 2  # BAD_REQUEST, and the connection is closed
    assert body == b"opcode 16 is NIXL's, and this server was started without --nixl"


def test_demo_formats_serves_runs_and_stops_cleanly(tmp_path):
    completed = subprocess.run(
        [*CTXKV, "demo", "--dir", str(tmp_path), "--size", "128M", "--chunks", "6"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "6 identical, 0 wrong" in completed.stdout
    assert "longest_prefix of 7 keys: 6 present" in completed.stdout
    assert "exit code 0" in completed.stdout


def test_metrics_scrape_parses_and_counts_what_happened(serve):
    served = serve(metrics=True)
    with Client(served.address) as client:
        for i in range(5):
            client.put(f"m{i}".encode(), b"x" * 1000)
        client.get(b"m1")
        client.get(b"absent")
    with urllib.request.urlopen(served.metrics_url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    requests = {
        (s.labels["op"], s.labels["status"]): s.value for s in families["ctxkv_requests"].samples
    }
    assert requests[("put", "ok")] == 5
    assert requests[("get", "ok")] == 1 and requests[("get", "not_found")] == 1
    histogram = families["ctxkv_request_duration_seconds"]
    counts = {s.labels["op"]: s.value for s in histogram.samples if s.name.endswith("_count")}
    assert counts["put"] == 5
    assert families["ctxkv_store_keys"].samples[0].value == 5
    assert families["ctxkv_store_hits"].samples[0].value == 1
    assert families["ctxkv_store_misses"].samples[0].value == 1
    assert families["ctxkv_connections_active"].samples[0].value == 0
    not_found = urllib.request.Request(served.metrics_url.replace("/metrics", "/other"))
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(not_found, timeout=10)


def test_async_client_twin(serve):
    served = serve(token=b"tok")

    async def scenario() -> None:
        with pytest.raises(AuthenticationError):
            await AsyncClient.connect(served.address, token="bad")
        async with await AsyncClient.connect(served.address, token="tok") as client:
            await client.put_many([(b"a", value_of(1)), (b"b", value_of(2))])
            results = await asyncio.gather(client.get(b"a"), client.get(b"b"), client.get(b"c"))
            assert results == [value_of(1), value_of(2), None]
            assert await client.contains(b"a") and await client.longest_prefix([b"a", b"c"]) == 1
            assert await client.delete(b"a") and await client.get_many([b"a", b"b"]) == [
                None,
                value_of(2),
            ]
            assert (await client.stats())["keys"] == 1
            with pytest.raises(RequestError, match="needs 9 extents"):
                await client.put(b"huge", bytes(9 * EXTENT))

    asyncio.run(scenario())


def test_pool_retries_reads_across_a_server_restart(serve):
    served = serve()
    with ClientPool(served.address, size=4, retries=2) as pool:
        threads = [
            threading.Thread(target=pool.put, args=(f"p{i}".encode(), value_of(i)))
            for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert pool.get(b"p3") == value_of(3)  # leaves idle connections in the pool
        assert served.stop() == 0
        restarted = subprocess.Popen(
            [*CTXKV, "serve", served.target, "--listen", served.address, "--pool-buffers", "8"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert "listening on" in restarted.stdout.readline()
            assert pool.get(b"p5") == value_of(5)  # the stale connections were replaced
            assert pool.longest_prefix([b"p0", b"p1", b"nope"]) == 2
        finally:
            restarted.send_signal(signal.SIGTERM)
            assert restarted.wait(timeout=60) == 0


def test_json_logs_are_one_object_per_line(tmp_path):
    target = str(tmp_path / "store.img")
    with open(target, "wb") as file:
        file.truncate(64 * MIB)
    Store.format([target], extent_size=EXTENT, pool_buffers=8).close()
    command = [*CTXKV, "serve", target, "--listen", "127.0.0.1:0", "--log-format", "json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "listening on" in process.stdout.readline()
    process.send_signal(signal.SIGTERM)
    _stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0
    entries = [json.loads(line) for line in stderr.splitlines()]  # every line is an object
    assert any(e["logger"] == "ctxkv.server" and "serving store" in e["message"] for e in entries)
    assert entries[-1]["message"] == "stopped cleanly"
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
