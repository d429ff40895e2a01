"""kill -9 at random moments: after reopen, every put that returned reads back identical
and no key returns bytes that were never put (issue 3, acceptance 2). In relaxed
durability too: a killed process leaves its completed writes to the kernel, so only a
power loss may forget the last flush interval (tests/test_crash_histories.py)."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from engine.store.store import Store

KIB, MIB = 1 << 10, 1 << 20
EXTENT = 64 * KIB
ROUNDS = {"strict": 20, "relaxed": 6}

CHILD = r"""
import os, random, sys
from engine.store.store import Store

target, log_path, round_index, durability = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
log = open(log_path, "a", buffering=1)
with Store.open([target], durability=durability) as store:
    print("open", flush=True)  # the kill's random delay counts from here
    for i in range(100000):
        size = random.Random(f"{round_index}-{i}").randint(1, 2 * 65536 + 1000)
        key = f"r{round_index}-{i}-{size}".encode()
        store.put(key, random.Random(key).randbytes(size))
        log.write(key.decode() + "\n")  # only after put returned: acknowledged
"""


def expected_value(key: bytes) -> bytes:
    size = int(key.decode().rsplit("-", 1)[1])
    return random.Random(key).randbytes(size)


def check_values(store: Store, keys: list[bytes], round_index: int) -> None:
    for start in range(0, len(keys), 64):
        batch = keys[start : start + 64]
        for key, value in zip(batch, store.get_many(batch), strict=True):
            assert value == expected_value(key), (round_index, key)


@pytest.mark.parametrize("durability", ["strict", "relaxed"])
def test_kill_9_loses_no_acknowledged_put(tmp_path, durability):
    target = str(tmp_path / "store.img")
    with open(target, "wb") as file:
        file.truncate(1024 * MIB)
    Store.format([target], extent_size=EXTENT).close()
    log_path = tmp_path / "acknowledged.log"
    log_path.touch()  # a child killed before it opens the log has acknowledged nothing
    rng = random.Random(2026)
    killed_after = []
    rounds = ROUNDS[durability]
    for round_index in range(rounds):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, target, str(log_path), str(round_index), durability],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        delay = rng.uniform(0.0, 1.0)
        if rng.random() < 0.8:  # mostly once it puts; sometimes while it is still starting
            child.stdout.readline()
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        _, stderr = child.communicate()
        assert child.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
        killed_after.append(delay)

        acknowledged = [line for line in log_path.read_text().splitlines() if line]
        with Store.open([target]) as store:
            check_values(store, [key.encode() for key in acknowledged], round_index)
            # Whatever else is there (a put in flight at the kill) must be whole and right.
            listed = set(store.keys())
            check_values(store, sorted(listed), round_index)
            assert {key.encode() for key in acknowledged} <= listed
            stats = store.stats()
            assert stats["evictions"] == 0 and stats["corrupt_reads"] == 0
    assert len(acknowledged) > rounds  # the kills did not all land before the first put
