"""The in-memory index's figures: memory per key and lookups per second at 10M keys.

    .venv/bin/python bench/index_bench.py [--keys 10000000] [--batch 1000000]

Builds HashIndex(max_keys=keys), fills it to max_keys with random digests in batches,
then times batched lookups of keys present and absent, single-key get() calls from
Python, and batched lookups from two threads at once (the GIL is released in the table).
Memory is reported twice: what the index mapped (memory_bytes) and how much the
process's resident set grew (VmRSS), both per key.
"""

from __future__ import annotations

import argparse
import ctypes
import threading
import time

import numpy as np

from engine.index import HashIndex, digest_bytes

U64_MAX = np.iinfo(np.uint64).max
GET_CALLS = 100_000
LIBC = ctypes.CDLL("libc.so.6")


def rss_bytes() -> int:
    """The process's resident set, after malloc hands back what numpy freed (glibc keeps
    freed heap otherwise, and the growth measured would be the allocator's, not ours)."""
    LIBC.malloc_trim(0)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def random_digests(rng: np.random.Generator, n: int) -> np.ndarray:
    digests = rng.integers(0, U64_MAX, size=(n, 2), dtype=np.uint64, endpoint=True)
    digests[:, 1] |= 1  # never the zero digest, which the index refuses
    return digests


def batches(n: int, batch: int) -> list[slice]:
    return [slice(start, min(start + batch, n)) for start in range(0, n, batch)]


def timed_lookups(index: HashIndex, digests: np.ndarray, batch: int, expect_found: bool) -> float:
    """Lookups per second over digests in batches; checks every answer."""
    start_s = time.perf_counter()
    for part in batches(len(digests), batch):
        found, _, _ = index.lookup_many(digests[part])
        assert found.all() if expect_found else not found.any()
    return len(digests) / (time.perf_counter() - start_s)


def threaded_lookups(index: HashIndex, digests: np.ndarray, batch: int, threads: int) -> float:
    """Lookups per second, all threads together, each over its own share of digests."""
    shares = np.array_split(digests, threads)
    failures: list[str] = []

    def work(share: np.ndarray) -> None:
        for part in batches(len(share), batch):
            found, _, _ = index.lookup_many(share[part])
            if not found.all():
                failures.append(f"{int((~found).sum())} keys not found")

    workers = [threading.Thread(target=work, args=(share,)) for share in shares]
    start_s = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed_s = time.perf_counter() - start_s
    assert not failures, failures
    return len(digests) / elapsed_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    arguments = parser.parse_args()
    keys, batch = arguments.keys, arguments.batch
    rng = np.random.default_rng(arguments.seed)

    digests = random_digests(rng, keys)
    locations = np.arange(keys, dtype=np.uint64)
    absent = random_digests(rng, min(keys, 5 * batch))
    rss_before_bytes = rss_bytes()

    index = HashIndex(max_keys=keys)
    start_s = time.perf_counter()
    for part in batches(keys, batch):
        replaced, _, _ = index.upsert_many(digests[part], locations[part], 0)
        assert not replaced.any()
    insert_rate = keys / (time.perf_counter() - start_s)
    assert len(index) == keys
    rss_growth_bytes = rss_bytes() - rss_before_bytes

    hit_rate = timed_lookups(index, digests, batch, expect_found=True)
    miss_rate = timed_lookups(index, absent, batch, expect_found=False)
    two_thread_rate = threaded_lookups(index, digests, batch, threads=2)

    picks = rng.integers(0, keys, size=GET_CALLS)
    singles = [digest_bytes(hi, lo) for hi, lo in digests[picks].tolist()]
    start_s = time.perf_counter()
    for digest in singles:
        index.get(digest)
    get_rate = GET_CALLS / (time.perf_counter() - start_s)
    assert index.get(singles[0]) == (int(picks[0]), 0)

    rows = [
        ("index bytes per key (memory_bytes / keys)", f"{index.memory_bytes / keys:.2f}"),
        ("RSS growth per key", f"{rss_growth_bytes / keys:.2f}"),
        (f"insert, batches of {batch:,}", f"{insert_rate / 1e6:.2f} M keys/s"),
        (f"lookup hits, batches of {batch:,}", f"{hit_rate / 1e6:.2f} M lookups/s"),
        (f"lookup misses, batches of {batch:,}", f"{miss_rate / 1e6:.2f} M lookups/s"),
        ("lookup hits, 2 threads together", f"{two_thread_rate / 1e6:.2f} M lookups/s"),
        (f"get() from Python, {GET_CALLS:,} calls", f"{get_rate / 1e6:.3f} M lookups/s"),
    ]
    print(
        f"ctxkv index: {keys:,} keys in {index.slots:,} slots "
        f"(load {keys / index.slots:.3f}), {index.memory_bytes / 2**20:.1f} MiB"
    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>20}")
    index.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
