"""The request trace: multi-turn sessions that share prefixes.

A session starts from one of `prefixes` shared prefixes (system prompts, documents),
picked with Zipf popularity, and adds one chunk of new context per turn. Each request
carries its whole context as a chain of chunk keys, each key a hash of the previous key
and the chunk's content (as LMCache and vLLM key prefix chunks): a lookup finds the
longest stored prefix, the hit chunks are read, the rest are prefilled and stored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

KEY_BYTES = 16


@dataclass(frozen=True)
class Request:
    session: int
    turn: int
    chunk_keys: tuple[bytes, ...]


@dataclass(frozen=True)
class WorkloadShape:
    requests: int = 72
    prefixes: int = 16
    prefix_chunks: tuple[int, int] = (2, 6)  # inclusive range, chunks per shared prefix
    zipf_s: float = 1.1
    new_session_probability: float = 0.35
    turns: tuple[int, int] = (2, 6)  # inclusive range of turns per session
    seed: int = 1


def chained(previous: bytes, content: str) -> bytes:
    return hashlib.blake2b(previous + content.encode(), digest_size=KEY_BYTES).digest()


def zipf_weights(count: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, count + 1) ** exponent
    return weights / weights.sum()


def make_trace(shape: WorkloadShape) -> list[Request]:
    rng = np.random.default_rng(shape.seed)
    prefix_keys = []
    for prefix in range(shape.prefixes):
        length = int(rng.integers(shape.prefix_chunks[0], shape.prefix_chunks[1] + 1))
        keys, previous = [], b"kvsim"
        for index in range(length):
            previous = chained(previous, f"prefix {prefix} chunk {index}")
            keys.append(previous)
        prefix_keys.append(keys)
    popularity = zipf_weights(shape.prefixes, shape.zipf_s)

    active: dict[int, tuple[list[bytes], int]] = {}  # session -> (context keys, turns left)
    trace: list[Request] = []
    next_session = 0
    while len(trace) < shape.requests:
        if not active or rng.random() < shape.new_session_probability:
            prefix = int(rng.choice(shape.prefixes, p=popularity))
            turns = int(rng.integers(shape.turns[0], shape.turns[1] + 1))
            active[next_session] = (list(prefix_keys[prefix]), turns)
            next_session += 1
        session = int(rng.choice(sorted(active)))
        context, turns_left = active[session]
        turn = len(trace)
        context.append(chained(context[-1], f"session {session} turn {turn}"))
        trace.append(Request(session, turn, tuple(context)))
        if turns_left == 1:
            del active[session]
        else:
            active[session] = (context, turns_left - 1)
    return trace


def working_set_chunks(trace: list[Request]) -> int:
    return len({key for request in trace for key in request.chunk_keys})
