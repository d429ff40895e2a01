"""The systems kvsim compares, behind one small interface: how many leading chunks are
stored, read one chunk, store some chunks. Every value carries its key in its first
bytes and every read checks it, so a tier that answers with the wrong bytes fails.

Puts to LMCache's backends are write-behind; a put here returns when the backend has
finished writing (no longer in its put tasks), as ctxkv's does, so both are timed alike.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.kvsim.models import Model
from bench.kvsim.workload import KEY_BYTES
from engine.bench.job import Job
from engine.bench.raw import run_raw
from engine.client.client import Client
from engine.store.store import Store

FILL_BLOCK_BYTES = 4 << 20
PUT_POLL_S = 0.001


class WrongValue(AssertionError):
    pass


def check_stamp(key: bytes, value: memoryview | np.ndarray, nbytes: int, chunk_bytes: int) -> None:
    if nbytes != chunk_bytes or bytes(value[:KEY_BYTES]) != key:
        raise WrongValue(f"a read of {key.hex()} returned another value ({nbytes} bytes)")


class Tier:
    name: str
    chunk_bytes: int

    def prefix(self, keys: list[bytes]) -> int:
        raise NotImplementedError

    def get(self, key: bytes, buffer: np.ndarray) -> None:
        """Reads key's value, checked; WrongValue if absent or wrong."""
        raise NotImplementedError

    def stage(self, buffers: list[np.ndarray]) -> list:
        """What put takes: the buffers themselves, or the tier's own copies (untimed)."""
        return buffers

    def put(self, keys: list[bytes], staged: list) -> None:
        raise NotImplementedError

    def holds(self, keys: list[bytes]) -> int:
        """How many of keys are stored."""
        raise NotImplementedError

    def restart(self) -> None:
        """Stops the system as an operator would (SIGTERM, close) and starts it again."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def format_store(target: Path, size_bytes: int, extent_bytes: int, chunk_bytes: int) -> int:
    """A fresh store file, every block of it written once, so that fio on the same file
    reads the device, never a hole the filesystem answers with zeros; its capacity."""
    with open(target, "wb") as file:
        file.truncate(size_bytes)
    run_raw(Job(targets=(str(target),), rw="write", block_bytes=FILL_BLOCK_BYTES, iodepth=8))
    pool_buffers = max(8, chunk_bytes // extent_bytes)
    with Store.format(
        [target], extent_size=extent_bytes, force=True, pool_buffers=pool_buffers
    ) as s:
        return int(s.stats()["capacity_bytes"])


class CtxkvInProcess(Tier):
    name = "ctxkv in-process"

    def __init__(self, target: Path, chunk_bytes: int, extent_bytes: int, durability: str):
        self.chunk_bytes = chunk_bytes
        pool_buffers = max(8, chunk_bytes // extent_bytes)
        self._open = lambda: Store.open([target], pool_buffers=pool_buffers, durability=durability)
        self.store = self._open()

    def holds(self, keys: list[bytes]) -> int:
        return sum(key in self.store for key in keys)

    def restart(self) -> None:
        self.store.close()
        self.store = self._open()

    def prefix(self, keys: list[bytes]) -> int:
        return self.store.longest_prefix(keys)

    def get(self, key: bytes, buffer: np.ndarray) -> None:
        """Into the store's pool buffers (pinned, hugepage-backed) without a copy: the
        stage from which an engine copies to the GPU, as LMCache's MemoryObjs are."""
        lease = self.store.read(key)
        if lease is None:
            raise WrongValue(f"{self.name} lost {key.hex()} between lookup and read")
        with lease:
            check_stamp(key, lease.views[0], lease.nbytes, self.chunk_bytes)

    def put(self, keys: list[bytes], buffers: list[np.ndarray]) -> None:
        self.store.put_many(list(zip(keys, buffers, strict=True)))

    def close(self) -> None:
        self.store.close()


class CtxkvServer(Tier):
    name = "ctxkv serve (TCP)"

    def __init__(self, target: Path, chunk_bytes: int, extent_bytes: int, durability: str):
        self.chunk_bytes = chunk_bytes
        self._command = [sys.executable, "-m", "engine.cli.main", "serve", str(target)]
        self._command += ["--listen", "127.0.0.1:0", "--durability", durability]
        self._command += ["--pool-buffers", str(max(16, 2 * chunk_bytes // extent_bytes))]
        self._start()

    def _start(self) -> None:
        self.process = subprocess.Popen(
            self._command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        line = self.process.stdout.readline()
        if "listening on" not in line:
            stop(self.process)
            raise RuntimeError(f"ctxkv serve did not start: {line!r}")
        self.address = line.rsplit(" ", 1)[1].strip()
        self.client = Client(self.address)

    def holds(self, keys: list[bytes]) -> int:
        return sum(self.client.contains(key) for key in keys)

    def restart(self) -> None:
        self.close()
        self._start()

    def prefix(self, keys: list[bytes]) -> int:
        return self.client.longest_prefix(keys)

    def get(self, key: bytes, buffer: np.ndarray) -> None:
        check_stamp(key, buffer, self.client.get_into(key, buffer) or 0, self.chunk_bytes)

    def put(self, keys: list[bytes], buffers: list[np.ndarray]) -> None:
        for key, buffer in zip(keys, buffers, strict=True):
            self.client.put(key, buffer)

    def close(self) -> None:
        self.client.close()
        stop(self.process)


class LMCacheTier(Tier):
    """One LMCache storage backend (local disk, lm://, a remote plugin), driven through
    the StorageBackendInterface its engine uses, in a real LMCacheEngine on the CPU."""

    def __init__(
        self,
        name: str,
        config: Callable[[], dict],
        model: Model,
        chunk_tokens: int,
        backing: CtxkvServer | LMCacheServerProcess | None = None,
    ):
        """config is called at every start (a restarted server may listen elsewhere);
        backing is the server process the backend talks to, restarted with it."""
        import torch
        from lmcache.utils import (
            CacheEngineKey,
            mock_up_broadcast_fn,
            mock_up_broadcast_object_fn,
        )
        from lmcache.v1.cache_engine import LMCacheEngineBuilder
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.gpu_connector.mock_gpu_connector import MockGPUConnector
        from lmcache.v1.memory_management import MemoryFormat
        from lmcache.v1.metadata import LMCacheMetadata

        self.name, self.chunk_bytes = name, model.chunk_bytes(chunk_tokens)
        self._key_type, self._dtype = CacheEngineKey, torch.bfloat16
        self._model_name = model.name
        kv_shape = (model.layers, 2, chunk_tokens, model.kv_heads, model.head_dim)
        metadata = LMCacheMetadata(
            model_name=model.name,
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=torch.bfloat16,
            kv_shape=kv_shape,
            chunk_size=chunk_tokens,
            role="worker",
        )
        self._builder, self._instance = LMCacheEngineBuilder, f"kvsim-{name}"
        self._backing = backing

        def start_engine() -> None:
            engine = LMCacheEngineBuilder.get_or_create(
                self._instance,
                LMCacheEngineConfig.from_dict(config()),
                metadata,
                MockGPUConnector(kv_shape),
                mock_up_broadcast_fn,
                mock_up_broadcast_object_fn,
            )
            engine.post_init()
            backends = engine.storage_manager.storage_backends
            self.allocator = backends["LocalCPUBackend"]
            (self.backend,) = [b for n, b in backends.items() if n != "LocalCPUBackend"]

        self._start_engine = start_engine
        start_engine()
        self._shapes, self._dtypes = metadata.get_shapes(), metadata.get_dtypes()
        self._fmt = MemoryFormat.KV_2LTD

    def _key(self, key: bytes):
        chunk_hash = int.from_bytes(key[:8], "little", signed=True)
        return self._key_type(self._model_name, 1, 0, chunk_hash, self._dtype)

    def prefix(self, keys: list[bytes]) -> int:
        return self.backend.batched_contains([self._key(key) for key in keys])

    def get(self, key: bytes, buffer: np.ndarray) -> None:
        memory_obj = self.backend.get_blocking(self._key(key))
        if memory_obj is None:
            raise WrongValue(f"{self.name} lost {key.hex()} between lookup and read")
        try:
            value = memoryview(memory_obj.byte_array).cast("B")
            check_stamp(key, value, len(value), self.chunk_bytes)
        finally:
            memory_obj.ref_count_down()

    def stage(self, buffers: list[np.ndarray]) -> list:
        """MemoryObjs holding the chunks, as LMCache's GPU connector would fill them
        (outside the timed put: ctxkv's put reads the caller's buffer in place)."""
        objects = []
        for buffer in buffers:
            memory_obj = self.allocator.allocate(self._shapes, self._dtypes, self._fmt)
            if memory_obj is None:
                raise MemoryError(f"{self.name}: LMCache's CPU buffer is full")
            memoryview(memory_obj.byte_array).cast("B")[:] = memoryview(buffer).cast("B")
            objects.append(memory_obj)
        return objects

    def put(self, keys: list[bytes], objects: list) -> None:
        engine_keys = [self._key(key) for key in keys]
        self.backend.batched_submit_put_task(engine_keys, objects)
        for memory_obj in objects:
            memory_obj.ref_count_down()
        # The batched remote path does not track put tasks, so wait until the backend
        # answers for every key (a key the backend evicted at once would not count: the
        # capacities here hold a request's chunks many times over).
        while any(self.backend.exists_in_put_tasks(key) for key in engine_keys) or (
            self.backend.batched_contains(engine_keys) < len(engine_keys)
        ):
            time.sleep(PUT_POLL_S)

    def holds(self, keys: list[bytes]) -> int:
        return sum(self.backend.contains(self._key(key)) for key in keys)

    def restart(self) -> None:
        self.close()
        if self._backing is not None:
            self._backing.restart()
        self._start_engine()

    def close(self) -> None:
        self._builder.destroy(self._instance)


def lmcache_config(chunk_tokens: int, cpu_buffer_bytes: int, **settings: object) -> dict:
    config = {
        "chunk_size": chunk_tokens,
        "local_cpu": False,  # a staging buffer only: every read comes from the tier
        "max_local_cpu_size": cpu_buffer_bytes / 2**30,
        "save_unfull_chunk": False,
        "remote_serde": "naive",
    }
    config.update(settings)
    return config


class LMCacheServerProcess:
    """LMCache's own remote server: `python -m lmcache.v1.server HOST PORT cpu`."""

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        self.port = free_port()  # a fresh port: the old one may linger in TIME_WAIT
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmcache.v1.server", "127.0.0.1", str(self.port), "cpu"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.process)

    def restart(self) -> None:
        self.close()
        self._start()

    def close(self) -> None:
        stop(self.process)
