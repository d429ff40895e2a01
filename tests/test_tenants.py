"""Tenants in the store: namespaced keys, quotas, and eviction that never crosses from one
tenant to another within its quota, across a close and reopen (engine/tenants)."""

import pytest

from engine.alloc.log import StoreFullError
from engine.index import key_digest
from engine.store.store import RELAXED, Store
from engine.tenants.keys import digest_tag, tenant_prefix, tenant_tag
from engine.tenants.quotas import QuotaError

KIB = 1 << 10
MIB = 1 << 20
EXTENT = 64 * KIB


def key_of(tenant: str, key: str) -> bytes:
    return tenant_prefix(tenant) + key.encode()


def value_of(tenant: str, i: int) -> bytes:
    return f"{tenant}:{i}:".encode() * 500


@pytest.fixture
def two_members(target_file):
    return [target_file(size_bytes=8 * MIB), target_file(size_bytes=4 * MIB)]


def test_a_tenants_digest_carries_its_tag_and_plain_keys_keep_theirs():
    digest = key_digest(key_of("alpha", "k"))
    assert digest_tag(digest) == tenant_tag("alpha")
    assert key_digest(key_of("beta", "k")) != digest
    # A plain key is untouched: pinned in tests/test_index.py too.
    assert key_digest(b"ctxkv").hex() == "e12f970d9e41323ec0969f81481fdc55"
    with pytest.raises(ValueError, match="tenant name"):
        tenant_prefix("no spaces")


def test_a_tenant_over_its_quota_evicts_only_its_own_oldest(two_members):
    # relaxed: a hundred puts without two flushes each; close makes them durable.
    with Store.format(
        two_members, extent_size=EXTENT, journal_bytes=1 * MIB, durability=RELAXED
    ) as store:
        slots = store.stats()["slots"]
        quota_a, quota_b = 8, slots - 8  # the whole store: the head must step over B's
        quotas = store.enforce_quotas({"a": quota_a * EXTENT, "b": quota_b * EXTENT})
        for i in range(quota_b):
            store.put(key_of("b", f"k{i}"), value_of("b", i))
        # The same key name in a: its own value, not b's.
        store.put(key_of("a", "k0"), value_of("a", 0))
        assert store.get(key_of("b", "k0")) == value_of("b", 0)
        for i in range(1, 3 * quota_a):
            store.put(key_of("a", f"k{i}"), value_of("a", i))
        assert all(store.get(key_of("b", f"k{i}")) == value_of("b", i) for i in range(quota_b))
        kept = [i for i in range(3 * quota_a) if store.get(key_of("a", f"k{i}")) is not None]
        assert kept == list(range(2 * quota_a, 3 * quota_a))  # a's oldest went, FIFO
        assert quotas.report("a")["used_extents"] == quota_a
        assert quotas.report("a")["evictions"] == 2 * quota_a
        assert quotas.report("b") == {
            "used_bytes": quota_b * EXTENT, "quota_bytes": quota_b * EXTENT,
            "used_extents": quota_b, "quota_extents": quota_b, "evictions": 0,
        }  # fmt: skip
    with Store.open(two_members) as store:
        quotas = store.enforce_quotas({"a": quota_a * EXTENT, "b": quota_b * EXTENT})
        assert quotas.report("a")["used_extents"] == quota_a
        assert quotas.report("b")["used_extents"] == quota_b
        for i in range(3 * quota_a, 4 * quota_a):
            store.put(key_of("a", f"k{i}"), value_of("a", i))
        assert all(store.get(key_of("b", f"k{i}")) == value_of("b", i) for i in range(quota_b))
        kept = [i for i in range(4 * quota_a) if store.get(key_of("a", f"k{i}")) is not None]
        assert kept == list(range(3 * quota_a, 4 * quota_a))


def test_usage_survives_a_reopen_without_checkpoint(two_members):
    """The journal alone (no clean close) rebuilds which slots are whose."""
    store = Store.format(two_members, extent_size=EXTENT, journal_bytes=1 * MIB)
    store.enforce_quotas({"a": 4 * EXTENT, "b": 4 * EXTENT})
    for i in range(10):
        store.put(key_of("a", f"k{i}"), value_of("a", i))
    store.put(key_of("b", "k"), b"x" * (EXTENT + 1))  # 2 extents
    store.delete(key_of("a", "k9"))
    # Crash-like, as in test_store: no close(), so reopen must replay the journal.
    store._closed = True
    for device in store._devices:
        device.close()
    with Store.open(two_members) as reopened:
        assert reopened.replayed_records > 0
        quotas = reopened.enforce_quotas({"a": 4 * EXTENT, "b": 4 * EXTENT})
        assert quotas.report("a")["used_extents"] == 3
        assert quotas.report("b")["used_extents"] == 2
        assert reopened.get(key_of("b", "k")) == b"x" * (EXTENT + 1)


def test_a_pin_counts_against_its_tenants_quota(two_members):
    with Store.format(two_members, extent_size=EXTENT, journal_bytes=1 * MIB) as store:
        quotas = store.enforce_quotas({"a": 4 * EXTENT, "b": 4 * EXTENT})
        for i in range(4):
            store.put(key_of("a", f"k{i}"), value_of("a", i))
        store.pin(key_of("a", "k0"))
        store.pin(key_of("a", "k1"))
        for i in range(4, 8):
            store.put(key_of("a", f"k{i}"), value_of("a", i))
        assert quotas.report("a")["used_extents"] == 4
        assert store.get(key_of("a", "k0")) and store.get(key_of("a", "k1"))
        assert store.get(key_of("a", "k2")) is None
        for i in range(8):
            store.pin(key_of("a", f"k{i}"))
        with pytest.raises(StoreFullError, match="tenant 'a': every extent of its quota"):
            store.put(key_of("a", "over"), b"x")
        assert quotas.report("a")["used_extents"] == 4  # the failed put gave its slot back
        store.put(key_of("b", "k"), b"b's value")  # b is not held back by a's pins
        assert store.get(key_of("b", "k")) == b"b's value"


def test_quotas_over_capacity_are_refused_naming_the_numbers(two_members):
    with Store.format(two_members, extent_size=EXTENT, journal_bytes=1 * MIB) as store:
        slots = store.stats()["slots"]
        message = (
            rf"tenant quotas add up to {(slots + 1) * EXTENT} bytes \({slots + 1} extents of "
            rf"{EXTENT} bytes; a: {slots * EXTENT}, b: {EXTENT}\) but the store holds "
            rf"{slots * EXTENT} bytes \({slots} extents\)"
        )
        with pytest.raises(QuotaError, match=message):
            store.enforce_quotas({"a": slots * EXTENT, "b": EXTENT})
        with pytest.raises(QuotaError, match="less than one extent"):
            store.enforce_quotas({"a": EXTENT - 1})
