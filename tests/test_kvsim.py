"""bench/kvsim's parts that its numbers rest on: the trace, the model arithmetic and the
replay's bookkeeping on a real (small) ctxkv store."""

import itertools

from bench.kvsim.models import MODELS, Model
from bench.kvsim.replay import Payloads, TierRecord, replay
from bench.kvsim.tiers import CtxkvInProcess, WrongValue, format_store
from bench.kvsim.workload import WorkloadShape, make_trace, working_set_chunks

MIB = 1 << 20


def test_chunk_bytes_of_the_named_models():
    assert MODELS["llama-3-8b"].chunk_bytes(256) == 32 * MIB
    assert MODELS["llama-3-70b"].chunk_bytes(256) == 80 * MIB


def test_prefill_flops_are_about_two_per_weight_per_token_plus_attention():
    model = MODELS["llama-3-8b"]
    assert 6.9e9 < model.matmul_params < 7.1e9
    first_token = model.prefill_flops(0, 1)
    assert first_token == 2 * model.matmul_params  # no earlier tokens to attend to
    # Splitting a range changes nothing: [0, 512) = [0, 256) + [256, 512).
    whole = model.prefill_flops(0, 512)
    assert abs(whole - model.prefill_flops(0, 256) - model.prefill_flops(256, 512)) < 1e-6 * whole
    assert model.prefill_flops(256, 512) > model.prefill_flops(0, 256)  # longer context


def test_trace_is_deterministic_and_shares_prefixes():
    shape = WorkloadShape(requests=60)
    trace = make_trace(shape)
    assert trace == make_trace(shape)
    assert len(trace) == 60
    first_keys = [request.chunk_keys[0] for request in trace]
    assert len(set(first_keys)) < shape.prefixes  # Zipf: popular prefixes recur
    by_session: dict[int, list] = {}
    for request in trace:
        by_session.setdefault(request.session, []).append(request.chunk_keys)
    turns = [chains for chains in by_session.values() if len(chains) > 1]
    assert turns, "some session has several turns"
    for chains in turns:
        for earlier, later in itertools.pairwise(chains):
            assert later[: len(earlier)] == earlier and len(later) == len(earlier) + 1
    assert working_set_chunks(trace) < sum(len(r.chunk_keys) for r in trace)


def test_replay_counts_hits_and_catches_wrong_values(tmp_path):
    tiny = Model("tiny", layers=1, query_heads=2, kv_heads=2, head_dim=64, vocab=1000,
                 total_params=1e6)  # fmt: skip
    chunk_tokens = 1024  # 1024 tokens x 512 B = 512 KiB chunks
    chunk_bytes = tiny.chunk_bytes(chunk_tokens)
    target = tmp_path / "kvsim.img"
    format_store(target, 64 * MIB, 1 * MIB, chunk_bytes)
    trace = make_trace(WorkloadShape(requests=20, seed=3))
    payloads = Payloads(chunk_bytes, max(len(r.chunk_keys) for r in trace))
    record = TierRecord("ctxkv")
    tier = CtxkvInProcess(target, chunk_bytes, 1 * MIB, "strict")
    try:
        replay(tier, trace, record, payloads, tiny, chunk_tokens)
        # The store holds the whole working set here, so every chunk seen before hits.
        seen: set[bytes] = set()
        expected_hits = 0
        for request in trace:
            for key in request.chunk_keys:
                if key not in seen:
                    break
                expected_hits += 1
            seen.update(request.chunk_keys)
        assert record.hit_chunks == expected_hits == len(record.get_latency_ns)
        assert record.bytes_written == (record.context_chunks - expected_hits) * chunk_bytes
        # A value under another key's name is caught.
        victim, impostor = trace[0].chunk_keys[0], trace[-1].chunk_keys[-1]
        buffer = payloads.stamped([impostor])[0]
        tier.store.put(victim, buffer)
        try:
            tier.get(victim, payloads.landing)
        except WrongValue:
            pass
        else:
            raise AssertionError("a wrong value was read without complaint")
    finally:
        tier.close()
