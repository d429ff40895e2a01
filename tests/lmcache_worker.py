"""One LMCache process for tests/test_lmcache.py: a real LMCacheEngine on the CPU whose
remote tier is ctxkv, loaded through LMCache's remote_storage_plugins config.

    python tests/lmcache_worker.py CONFIG.yaml store|retrieve SEED TOKENS

`store` fills a CPU KV cache with values drawn from SEED, stores it and waits until every
chunk is in ctxkv; `retrieve` starts from a zeroed KV cache, retrieves, and reports
whether every token came back and the KV cache equals the stored one bit for bit. Both
print one JSON line. PYTHONHASHSEED must be the same in every process (LMCache hashes
token chunks with Python's hash)."""

from __future__ import annotations

import json
import sys
import time

import torch
from lmcache.utils import mock_up_broadcast_fn, mock_up_broadcast_object_fn
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.gpu_connector.mock_gpu_connector import MockGPUConnector
from lmcache.v1.metadata import LMCacheMetadata

NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE, CHUNK_TOKENS = 4, 2, 64, 256
DTYPE = torch.bfloat16
INSTANCE = "ctxkv-test"


class CPUConnector(MockGPUConnector):
    """The serving engine's KV cache as one CPU tensor [2, layers, tokens, hidden], the
    layout of LMCache's KV_2LTD MemoryObjs, so a chunk copies as one slice."""

    def __init__(self, kv: torch.Tensor):
        super().__init__((NUM_LAYERS, 2, CHUNK_TOKENS, NUM_KV_HEADS, HEAD_SIZE))
        self.kv = kv

    def from_gpu(self, memory_obj, start: int, end: int, **kwargs) -> None:
        memory_obj.tensor.copy_(self.kv[:, :, start:end, :])

    def to_gpu(self, memory_obj, start: int, end: int, **kwargs) -> None:
        self.kv[:, :, start:end, :].copy_(memory_obj.tensor)

    def batched_from_gpu(self, memory_objs, starts, ends, **kwargs) -> None:
        for memory_obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.from_gpu(memory_obj, start, end)

    def batched_to_gpu(self, memory_objs, starts, ends, **kwargs) -> None:
        for memory_obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.to_gpu(memory_obj, start, end)


def workload(seed: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, 32000, (tokens,), generator=generator)
    kv = torch.randn(2, NUM_LAYERS, tokens, NUM_KV_HEADS * HEAD_SIZE, generator=generator)
    return token_ids, kv.to(DTYPE)


def main(config_path: str, action: str, seed: int, tokens: int) -> dict:
    config = LMCacheEngineConfig.from_file(config_path)
    metadata = LMCacheMetadata(
        model_name="ctxkv-test-model",
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=DTYPE,
        kv_shape=(NUM_LAYERS, 2, CHUNK_TOKENS, NUM_KV_HEADS, HEAD_SIZE),
        chunk_size=CHUNK_TOKENS,
        role="worker",
    )
    token_ids, expected = workload(seed, tokens)
    kv = expected.clone() if action == "store" else torch.zeros_like(expected)
    connector = CPUConnector(kv)
    engine = LMCacheEngineBuilder.get_or_create(
        INSTANCE, config, metadata, connector, mock_up_broadcast_fn, mock_up_broadcast_object_fn
    )
    engine.post_init()
    backends = engine.storage_manager.storage_backends
    remote = next(b for name, b in backends.items() if name.startswith("RemoteBackend"))
    report: dict = {"action": action, "backends": sorted(backends)}
    try:
        if action == "store":
            engine.store(token_ids)
            keys = list(engine.token_database.process_tokens(token_ids))
            report["chunks"] = len(keys)
            # Remote puts are asynchronous: wait until ctxkv holds every chunk.
            deadline = time.monotonic() + 60
            chunk_keys = [key for _start, _end, key in keys]
            while remote.connection.batched_contains(chunk_keys) < len(chunk_keys):
                if time.monotonic() > deadline:
                    raise TimeoutError("LMCache did not put every chunk into ctxkv in 60 s")
                time.sleep(0.05)
            report["stored"] = True
        else:
            report["lookup_tokens"] = engine.lookup(token_ids)
            retrieved = engine.retrieve(token_ids)
            report["retrieved_tokens"] = int(retrieved.sum())
            # Compared as integers: bit for bit, whatever the floats hold.
            report["bit_exact"] = torch.equal(kv.view(torch.int16), expected.view(torch.int16))
            # Tokens never stored are a miss, not someone else's KV.
            other_ids, _ = workload(seed + 1, tokens)
            report["other_retrieved_tokens"] = int(engine.retrieve(other_ids).sum())
    finally:
        LMCacheEngineBuilder.destroy(INSTANCE)
    return report


if __name__ == "__main__":
    path, verb, seed_text, tokens_text = sys.argv[1:5]
    print(json.dumps(main(path, verb, int(seed_text), int(tokens_text))), flush=True)
