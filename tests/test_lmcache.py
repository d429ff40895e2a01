"""ctxkv as LMCache's remote tier, end to end: real LMCacheEngines (on the CPU, one per
process) load engine.integrations.lmcache through LMCache's remote_storage_plugins config
and talk to a real `ctxkv serve`. One process stores, a fresh one retrieves bit-exact,
then the server restarts on the same file and a third process still retrieves."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_server import Served  # the stop (SIGTERM, then kill) of the server tests

from engine.client.client import Client
from engine.integrations.lmcache import CtxkvConnectorAdapter, address_of
from engine.store.store import Store

MIB = 1 << 20
WORKER = Path(__file__).with_name("lmcache_worker.py")
# 6 full chunks of 256 tokens and a partial one: the header must carry its shorter shape.
TOKENS = 6 * 256 + 100
TOKEN_BYTES = 2 * 4 * 2 * 64 * 2  # K and V, 4 layers, 2 KV heads of 64, bf16 (the worker's)
CHUNK_BYTES = 256 * TOKEN_BYTES
TRAILER_BYTES = 28  # LMCache's RemoteMetadata for one group: 7 int32
CONFIG = """\
chunk_size: 256
local_cpu: false
max_local_cpu_size: 0.1
save_unfull_chunk: true
remote_serde: naive
remote_storage_plugins: [ctxkv]
extra_config:
  remote_storage_plugin.ctxkv.module_path: engine.integrations.lmcache
  remote_storage_plugin.ctxkv.class_name: CtxkvConnectorAdapter
  remote_storage_plugin.ctxkv.url: ctxkv://{address}
"""


class Restartable(Served):
    """`ctxkv serve` on a file, restartable on the same file and port."""

    def __init__(self, target: Path):
        super().__init__(str(target), None, "127.0.0.1:0")

    def start(self) -> None:
        command = [sys.executable, "-m", "engine.cli.main", "serve", self.target]
        command += ["--listen", self.address, "--pool-buffers", "8"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.process.stdout.readline().decode()
        if "listening on" not in line:
            self.process.kill()
            pytest.fail(f"ctxkv serve did not start: {line!r} {self.process.stderr.read()[-2000:]}")
        self.address = line.rsplit(" ", 1)[1].strip()


@pytest.fixture
def server(tmp_path):
    target = tmp_path / "store.img"
    with open(target, "wb") as file:
        file.truncate(256 * MIB)
    Store.format([target], extent_size=1 * MIB, pool_buffers=8).close()
    served = Restartable(target)
    served.start()
    yield served
    served.stop()


def run_worker(config: Path, action: str, seed: int = 7) -> dict:
    environment = dict(os.environ, PYTHONHASHSEED="0", LMCACHE_TRACK_USAGE="false")
    result = subprocess.run(
        [sys.executable, str(WORKER), str(config), action, str(seed), str(TOKENS)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"LMCache {action} failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_lmcache_store_retrieve_across_processes_and_a_server_restart(server, tmp_path):
    config = tmp_path / "lmcache.yaml"
    config.write_text(CONFIG.format(address=server.address))

    stored = run_worker(config, "store")
    assert stored["backends"] == ["LocalCPUBackend", "RemoteBackend-ctxkv"]
    assert stored["chunks"] == 7
    with Client(server.address) as client:
        stats = client.stats()
    # Full chunks are stored bare (whole extents); only the partial one carries a trailer.
    assert stats["keys"] == 7
    assert stats["bytes_put"] == 6 * CHUNK_BYTES + 100 * TOKEN_BYTES + TRAILER_BYTES

    fresh = run_worker(config, "retrieve")
    assert fresh["retrieved_tokens"] == TOKENS
    assert fresh["bit_exact"]

    assert server.stop() == 0
    server.start()  # same file, same port
    after_restart = run_worker(config, "retrieve")
    assert after_restart["retrieved_tokens"] == TOKENS
    assert after_restart["bit_exact"]
    assert fresh["other_retrieved_tokens"] == after_restart["other_retrieved_tokens"] == 0


def test_adapter_matches_its_urls_only():
    adapter = CtxkvConnectorAdapter()
    assert adapter.can_parse("ctxkv://127.0.0.1:7420")
    assert adapter.can_parse("plugin://ctxkv")
    assert adapter.can_parse("plugin://ctxkv.secondary")
    assert not adapter.can_parse("plugin://ctxkvx")
    assert not adapter.can_parse("lm://127.0.0.1:7420")


@pytest.mark.parametrize(
    ("url", "problem"),
    [("lm://127.0.0.1:7420", "starts with ctxkv://"), ("ctxkv://127.0.0.1", "HOST:PORT")],
)
def test_bad_urls_are_named(url, problem):
    with pytest.raises(ValueError, match=problem):
        address_of(url)


def test_client_sends_parts_and_scatters_a_value_across_buffers(server):
    header, payload = b"H" * 28, bytes(range(256)) * 4096
    with Client(server.address) as client:
        client.put(b"scattered", header, memoryview(payload))
        head, body = bytearray(28), bytearray(len(payload) + 100)
        assert client.get_into(b"scattered", head, body) == len(header) + len(payload)
        assert bytes(head) == header and bytes(body[: len(payload)]) == payload
        with pytest.raises(ValueError, match="too small"):
            client.get_into(b"scattered", bytearray(28), bytearray(len(payload) - 1))
        assert client.get(b"scattered") == header + payload  # still in step after the error


def test_a_plugin_config_without_a_url_is_refused_by_name():
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.storage_backend.connector import ConnectorContext

    config = LMCacheEngineConfig.from_dict({"remote_storage_plugins": ["ctxkv"]})
    context = ConnectorContext("plugin://ctxkv", None, None, config, None, plugin_name="ctxkv")
    with pytest.raises(ValueError, match=r"remote_storage_plugin\.ctxkv\.url"):
        CtxkvConnectorAdapter().create_connector(context)
