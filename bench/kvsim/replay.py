"""Replays a trace on one tier and records what an inference engine would see."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from bench.kvsim.models import Model
from bench.kvsim.tiers import Tier
from bench.kvsim.workload import KEY_BYTES, Request


@dataclass
class TierRecord:
    name: str
    get_latency_ns: list[int] = field(default_factory=list)  # one per chunk read
    put_latency_ns: list[float] = field(default_factory=list)  # per chunk, batch / count
    lookup_latency_ns: list[int] = field(default_factory=list)  # one per request
    hit_chunks: int = 0
    context_chunks: int = 0
    bytes_served: int = 0
    bytes_written: int = 0
    busy_ns: int = 0  # lookups, reads and writes, summed over requests
    read_ns: int = 0
    write_ns: int = 0
    flops_avoided: float = 0.0
    held_before_restart: int = 0  # working-set chunks stored when the run ends
    held_after_restart: int = 0  # ... and after the system is stopped and started again
    restart_s: float = 0.0


class Payloads:
    """Chunk-sized buffers for one request, filled once with random bytes; each put
    stamps its key into the first bytes, and each get reads into `landing`."""

    def __init__(self, chunk_bytes: int, count: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.buffers = [rng.integers(0, 256, chunk_bytes, dtype=np.uint8) for _ in range(count)]
        self.landing = np.empty(chunk_bytes, dtype=np.uint8)

    def stamped(self, keys: list[bytes]) -> list[np.ndarray]:
        if len(keys) > len(self.buffers):
            raise ValueError(
                f"a request stores {len(keys)} chunks, buffers for {len(self.buffers)}"
            )
        for key, buffer in zip(keys, self.buffers, strict=False):
            buffer[:KEY_BYTES] = np.frombuffer(key, dtype=np.uint8)
        return self.buffers[: len(keys)]


def replay(
    tier: Tier,
    requests: list[Request],
    record: TierRecord,
    payloads: Payloads,
    model: Model,
    chunk_tokens: int,
) -> None:
    clock = time.perf_counter_ns
    for request in requests:
        keys = list(request.chunk_keys)
        started = clock()
        hits = tier.prefix(keys)
        looked_up = clock()
        record.lookup_latency_ns.append(looked_up - started)
        for key in keys[:hits]:
            before = clock()
            tier.get(key, payloads.landing)
            record.get_latency_ns.append(clock() - before)
        read_done = clock()
        # Chunks past the prefix that are still stored (an earlier link was evicted) are
        # not written again, as LMCache's engine skips chunks its backends contain; this
        # also keeps each put a first write, which the LMCache put timing relies on.
        missed = [key for key in keys[hits:] if not tier.holds([key])]
        checked = clock()
        record.lookup_latency_ns[-1] += checked - read_done
        put_ns = 0
        if missed:
            staged = tier.stage(payloads.stamped(missed))
            before_put = clock()
            tier.put(missed, staged)
            put_ns = clock() - before_put
            record.put_latency_ns.extend([put_ns / len(missed)] * len(missed))
        record.read_ns += read_done - looked_up
        record.write_ns += put_ns
        record.busy_ns += (checked - started) + put_ns
        record.hit_chunks += hits
        record.context_chunks += len(keys)
        record.bytes_served += hits * tier.chunk_bytes
        record.bytes_written += len(missed) * tier.chunk_bytes
        record.flops_avoided += model.prefill_flops(0, hits * chunk_tokens)
