"""The NIXL data path (issue 4, acceptance 2): a real `ctxkv serve --nixl` subprocess on
a file-backed store, and a real NixlClient in a second process (tests/nixl_worker.py)
moving values by one-sided UCX READ/WRITE into and out of the server's pool. Leases are
also driven straight over TCP from this process, to check how they end: released,
committed, expired, dropped with their connection, or refused with a clear error."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine.client.client import Client, RequestError, ServerError
from engine.server.protocol import (
    U64,
    Header,
    LeaseGrant,
    Opcode,
    Status,
    pack_commit,
    pack_key,
)
from engine.store.store import Store
from tests.nixl_worker import digest, value
from tests.test_server import Served

MIB = 1 << 20
EXTENT = 1 * MIB
POOL_BUFFERS = 8  # NIXL leases may hold half: 4
LEASE_TIMEOUT_S = 3.0  # long enough for a test's steps on a loaded machine
CTXKV = [sys.executable, "-m", "engine.cli.main"]
WORKER = [sys.executable, str(Path(__file__).parent / "nixl_worker.py")]


class Worker:
    """The NixlClient process: call(op, ...) sends one command and returns its answer."""

    def __init__(self, address: str):
        self.process = subprocess.Popen(
            [*WORKER, address], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
        )  # fmt: skip
        line = self.process.stdout.readline()
        if '"ready"' not in line:
            self.process.kill()
            pytest.fail(f"the NIXL worker did not start: {line!r} {self.process.stderr.read()}")

    def call(self, op: str, **arguments: object) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the NIXL worker died: {self.process.stderr.read()[-3000:]}"
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write('{"op": "exit"}\n')
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        assert self.process.returncode == 0, self.process.stderr.read()[-3000:]


class NixlServer(Served):
    def __init__(self, tmp_path: Path):
        target = str(tmp_path / "store.img")
        with open(target, "wb") as file:
            file.truncate(256 * MIB)
        Store.format([target], extent_size=EXTENT, pool_buffers=POOL_BUFFERS).close()
        self.process = subprocess.Popen(
            [*CTXKV, "serve", target, "--listen", "127.0.0.1:0", "--pool-buffers",
             str(POOL_BUFFERS), "--metrics", "127.0.0.1:0", "--nixl",
             "--nixl-lease-timeout", str(LEASE_TIMEOUT_S)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.process.stdout.readline()
        if "listening on" not in line:
            self.process.kill()
            pytest.fail(f"ctxkv serve --nixl did not start: {line!r} {self.process.stderr.read()}")
        super().__init__(target, self.process, line.rsplit(" ", 1)[1].strip())
        self.metrics_url = self.process.stdout.readline().rsplit(" ", 1)[1].strip()

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, number = line.rsplit(" ", 1)
                samples[name] = float(number)
        return samples


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = NixlServer(tmp_path_factory.mktemp("nixl"))
    yield served
    assert served.stop() == 0, served.process.stderr.read()[-3000:]


@pytest.fixture(scope="module")
def worker(server):
    started = Worker(server.address)
    yield started
    started.close()


@pytest.fixture
def tcp(server):
    with Client(server.address) as client:
        yield client
        # Every test leaves the pool as it found it: no lease and no buffer still held.
        assert wait_for(lambda: server.metrics()["ctxkv_pool_buffers_leased"] == 0)


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def lease(client: Client, opcode: Opcode, body: bytes) -> LeaseGrant:
    header, answer = client._request(opcode, body)
    assert header.status == Status.OK, answer
    return LeaseGrant.unpack(answer)


def lease_call(client: Client, opcode: Opcode, body: bytes) -> tuple[int, str]:
    header, answer = client._request(opcode, body)
    return header.status, answer.decode()


SIZES = [100, EXTENT, 3 * EXTENT + 123]  # one partial extent, one whole, four extents


@pytest.mark.parametrize("nbytes", SIZES)
def test_nixl_put_reads_back_the_same_by_tcp_and_by_nixl(worker, tcp, nbytes):
    key = f"nixl-put-{nbytes}"
    assert worker.call("put", key=key, seed=nbytes, nbytes=nbytes) == {"result": "ok"}
    expected = value(nbytes, nbytes)
    assert tcp.get(key.encode()) == expected
    wanted = {"result": {"nbytes": nbytes, "sha256": digest(expected)}}
    assert worker.call("get", key=key) == wanted
    assert worker.call("get_into", key=key, offset=4096) == wanted


def test_nixl_put_straight_from_registered_memory(worker, tcp):
    nbytes = 2 * EXTENT + 7
    assert worker.call("put_from_arena", key="zero-copy", seed=7, nbytes=nbytes)["result"] == "ok"
    assert tcp.get(b"zero-copy") == value(7, nbytes)


@pytest.mark.parametrize("nbytes", [EXTENT - 1, 2 * EXTENT + 4096])
def test_tcp_put_reads_back_the_same_by_nixl(worker, tcp, nbytes):
    key = f"tcp-put-{nbytes}"
    data = value(nbytes + 1, nbytes)
    tcp.put(key.encode(), data)
    assert worker.call("get", key=key) == {"result": {"nbytes": nbytes, "sha256": digest(data)}}


def test_nixl_get_of_an_absent_key_is_a_miss(worker, tcp):
    assert worker.call("get", key="absent") == {"result": None}
    assert worker.call("get_into", key="absent") == {"result": None}


def test_a_lease_never_released_expires_and_its_buffers_return(server, tcp):
    tcp.put(b"held", value(1, 2 * EXTENT))
    before = server.metrics()
    grant = lease(tcp, Opcode.NIXL_GET_LEASE, pack_key(b"held"))
    assert len(grant.parts) == 2 and grant.timeout_ms == LEASE_TIMEOUT_S * 1000
    held = server.metrics()
    assert held["ctxkv_nixl_leases_active"] == 1
    assert held["ctxkv_nixl_lease_buffers"] == 2
    assert held["ctxkv_pool_buffers_leased"] == 2
    assert tcp.stats()["server"]["nixl"]["leases_active"] == 1
    time.sleep(LEASE_TIMEOUT_S * 0.8)
    assert server.metrics()["ctxkv_nixl_leases_active"] == 1, "the lease ended early"
    assert wait_for(lambda: server.metrics()["ctxkv_nixl_leases_active"] == 0)
    after = server.metrics()
    assert after["ctxkv_nixl_leases_active"] == 0
    assert after["ctxkv_pool_buffers_leased"] == 0
    expired = 'ctxkv_nixl_leases_ended_total{outcome="expired"}'
    assert after[expired] == before.get(expired, 0) + 1
    status, message = lease_call(tcp, Opcode.NIXL_RELEASE, U64.pack(grant.lease_id))
    assert status == Status.NOT_FOUND and message == f"lease {grant.lease_id} has ended: expired"


def test_bad_and_repeated_lease_ids_get_clear_errors_and_the_server_stays_up(server, tcp):
    status, message = lease_call(tcp, Opcode.NIXL_RELEASE, U64.pack(10**12))
    assert (status, message) == (Status.NOT_FOUND, f"lease {10**12} was never granted")
    tcp.put(b"twice", b"x" * 5000)
    grant = lease(tcp, Opcode.NIXL_GET_LEASE, pack_key(b"twice"))
    assert lease_call(tcp, Opcode.NIXL_RELEASE, U64.pack(grant.lease_id)) == (Status.OK, "")
    status, message = lease_call(tcp, Opcode.NIXL_RELEASE, U64.pack(grant.lease_id))
    assert (status, message) == (Status.NOT_FOUND, f"lease {grant.lease_id} has ended: released")
    # A get lease cannot be committed.
    grant = lease(tcp, Opcode.NIXL_GET_LEASE, pack_key(b"twice"))
    status, message = lease_call(tcp, Opcode.NIXL_COMMIT, pack_commit(grant.lease_id, [0], b"k"))
    assert (status, message) == (
        Status.NOT_FOUND,
        f"lease {grant.lease_id} is a get lease, not a put lease",
    )
    assert lease_call(tcp, Opcode.NIXL_RELEASE, U64.pack(grant.lease_id)) == (Status.OK, "")
    # Nor can another connection end someone's lease.
    grant = lease(tcp, Opcode.NIXL_GET_LEASE, pack_key(b"twice"))
    with Client(server.address) as other:
        status, message = lease_call(other, Opcode.NIXL_RELEASE, U64.pack(grant.lease_id))
        assert (status, message) == (
            Status.NOT_FOUND,
            f"lease {grant.lease_id} belongs to another connection",
        )
    assert lease_call(tcp, Opcode.NIXL_RELEASE, U64.pack(grant.lease_id)) == (Status.OK, "")
    assert tcp.get(b"twice") == b"x" * 5000
    assert tcp.stats()["server"]["protocol_errors"] == 0


def test_commit_of_an_expired_put_lease_is_refused_and_stores_nothing(server, tcp):
    grant = lease(tcp, Opcode.NIXL_PUT_LEASE, U64.pack(3 * EXTENT))
    assert [part.nbytes for part in grant.parts] == [EXTENT] * 3
    expired = wait_for(
        lambda: server.metrics()["ctxkv_nixl_leases_active"] == 0, LEASE_TIMEOUT_S + 5
    )
    assert expired
    status, message = lease_call(
        tcp, Opcode.NIXL_COMMIT, pack_commit(grant.lease_id, [0, 0, 0], b"late")
    )
    assert (status, message) == (Status.NOT_FOUND, f"lease {grant.lease_id} has ended: expired")
    assert tcp.get(b"late") is None


def test_a_commit_whose_bytes_did_not_arrive_is_refused(tcp):
    """Nothing was written into the lease: the client's checksums cannot match the pool."""
    tcp.put(b"kept", b"old value")
    grant = lease(tcp, Opcode.NIXL_PUT_LEASE, U64.pack(4096))
    with pytest.raises(ServerError, match="arrived damaged or incomplete"):
        tcp._request(Opcode.NIXL_COMMIT, pack_commit(grant.lease_id, [0x1234], b"kept"))
    assert tcp.get(b"kept") == b"old value"
    status, message = lease_call(tcp, Opcode.NIXL_RELEASE, U64.pack(grant.lease_id))
    assert status == Status.NOT_FOUND
    assert message.startswith(f"lease {grant.lease_id} has ended: failed: part 0")


def test_a_closed_connection_gives_its_leases_back(server, tcp):
    with Client(server.address) as other:
        lease(other, Opcode.NIXL_PUT_LEASE, U64.pack(2 * EXTENT))
        assert server.metrics()["ctxkv_nixl_leases_active"] == 1
    assert wait_for(lambda: server.metrics()["ctxkv_nixl_leases_active"] == 0)
    dropped = 'ctxkv_nixl_leases_ended_total{outcome="dropped"}'
    assert server.metrics()[dropped] >= 1


def test_leases_past_their_bound_wait_for_buffers(server, tcp):
    """NIXL leases may hold half the pool (4 buffers): a fifth waits until one ends."""
    grants = [lease(tcp, Opcode.NIXL_PUT_LEASE, U64.pack(2 * EXTENT)) for _ in range(2)]
    assert server.metrics()["ctxkv_nixl_lease_buffers"] == 4
    with Client(server.address) as other:
        body = U64.pack(EXTENT)
        other._socket.sendall(Header(Opcode.NIXL_PUT_LEASE, 0, 99, len(body)).pack() + body)
        waiting, _, _ = select.select([other._socket], [], [], 0.5)
        assert not waiting, "a lease past the bound was granted"
        assert lease_call(tcp, Opcode.NIXL_RELEASE, U64.pack(grants[0].lease_id))[0] == Status.OK
        response, answer = other._read_response()
        assert response.status == Status.OK and response.request_id == 99
        assert LeaseGrant.unpack(answer).value_bytes == EXTENT
    assert lease_call(tcp, Opcode.NIXL_RELEASE, U64.pack(grants[1].lease_id))[0] == Status.OK


def test_too_large_for_a_lease_is_refused_and_the_connection_goes_on(tcp):
    with pytest.raises(RequestError, match="NIXL leases may hold at most 4"):
        tcp._request(Opcode.NIXL_PUT_LEASE, U64.pack(5 * EXTENT))
    tcp.put(b"after", b"fine")
    assert tcp.get(b"after") == b"fine"


def test_the_client_starts_no_transfer_late_in_its_lease(worker, tcp):
    """NixlClient counts a lease as over at three quarters of its timeout, before the
    server takes the buffers back: a READ it would start later is refused, not run."""
    tcp.put(b"late", value(5, EXTENT))
    answer = worker.call("late_read", key="late", seconds=LEASE_TIMEOUT_S * 0.8)
    assert answer["error"] == "LeaseError"
    assert "too close to expiry to start a transfer" in answer["message"]
    assert worker.call("get", key="late")["result"]["sha256"] == digest(value(5, EXTENT))


def test_metrics_name_the_nixl_leases(server, worker, tcp):
    samples = server.metrics()
    for name in ("ctxkv_nixl_leases_active", "ctxkv_nixl_lease_buffers",
                 "ctxkv_nixl_lease_buffers_max", "ctxkv_nixl_lease_timeout_seconds",
                 'ctxkv_nixl_leases_granted_total{kind="get"}',
                 'ctxkv_nixl_leases_granted_total{kind="put"}',
                 'ctxkv_nixl_leases_ended_total{outcome="released"}',
                 'ctxkv_nixl_leases_ended_total{outcome="committed"}'):  # fmt: skip
        assert name in samples, name
    assert samples["ctxkv_nixl_lease_buffers_max"] == POOL_BUFFERS // 2
    assert worker.call("stats")["result"]["leases_active"] == 0
