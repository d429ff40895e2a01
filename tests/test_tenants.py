"""Tenants in the store: namespaced keys, quotas, and eviction that never crosses from one
tenant to another within its quota, across a close and reopen (engine/tenants)."""

import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server import CTXKV
from test_server import serve as serve_fixture

from engine.alloc.log import StoreFullError
from engine.client.client import AuthenticationError, Client, RequestError
from engine.index import key_digest
from engine.store.store import RELAXED, Store
from engine.tenants.config import TenantConfigError, load_tenants
from engine.tenants.keys import digest_tag, tenant_prefix, tenant_tag
from engine.tenants.quotas import QuotaError

KIB = 1 << 10
MIB = 1 << 20
EXTENT = 64 * KIB
serve = serve_fixture  # the server tests' fixture: a store served by a real ctxkv serve


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


# ---- through the server ------------------------------------------------------------------


def tenant_table(directory, quota_bytes: dict[str, str]) -> str:
    """A TOML tenant table under directory: tenant NAME's token is 'token-NAME', in a file."""
    lines = []
    for name, quota in quota_bytes.items():
        (directory / f"{name}.token").write_text(f"token-{name}\n")
        lines += ["[[tenants]]", f'name = "{name}"', f'token_file = "{name}.token"',
                  f'quota_bytes = "{quota}"']  # fmt: skip
    path = directory / "tenants.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_two_tenants_see_only_their_own_keys(serve, tmp_path):
    table = tenant_table(tmp_path, {"a": "4MiB", "b": "8MiB"})
    served = serve(metrics=True, arguments=("--tenants", table), size_bytes=64 * MIB)
    with pytest.raises(AuthenticationError, match="refused the token"):
        Client(served.address, token="token-c")
    with pytest.raises(AuthenticationError, match="requires a token"):
        Client(served.address)
    with Client(served.address, token="token-a") as a, Client(served.address, token="token-b") as b:
        a.put(b"shared-name", b"a's value")
        b.put(b"shared-name", b"b's value")
        b.put(b"b-only", b"b's secret")
        assert a.get(b"shared-name") == b"a's value"
        assert b.get(b"shared-name") == b"b's value"
        assert a.get(b"b-only") is None
        assert not a.contains(b"b-only")
        assert not a.delete(b"b-only")
        assert a.longest_prefix([b"shared-name", b"b-only"]) == 1
        assert b.longest_prefix([b"shared-name", b"b-only"]) == 2
        assert b.get(b"b-only") == b"b's secret"
        for i in range(12):  # 3x a's quota of 4 extents of 1 MiB
            a.put(f"fill-{i}".encode(), bytes(600 * KIB))
        assert b.get(b"shared-name") == b"b's value" and b.get(b"b-only") == b"b's secret"
        stats = a.stats()
        assert stats["tenant"] == "a" and stats["quota_bytes"] == 4 * MIB
        assert stats["used_bytes"] == 4 * MIB and stats["evictions"] == 9
        assert "keys" not in stats and "members" not in stats  # nothing of the store's
        assert b.stats()["used_bytes"] == 2 * MIB
    with Client(served.address, token="token-a") as a:
        longest = 1024 - len(tenant_prefix("a"))
        a.put(b"k" * longest, b"fits")
        too_long = f"tenant 'a''s keys are at most {longest} bytes"
        with pytest.raises(RequestError, match=too_long):
            a.get(b"k" * (longest + 1))
        with pytest.raises(RequestError, match=too_long):
            a.put(b"k" * (longest + 1), b"v")
        assert a.get(b"k" * longest) == b"fits"  # the connection goes on
    with urllib.request.urlopen(served.metrics_url, timeout=10) as response:
        text = response.read().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}

    def per_tenant(family: str) -> dict[str, float]:
        return {s.labels["tenant"]: s.value for s in families[family].samples}

    assert per_tenant("ctxkv_tenant_used_bytes") == {"a": 4 * MIB, "b": 2 * MIB}
    assert per_tenant("ctxkv_tenant_quota_bytes") == {"a": 4 * MIB, "b": 8 * MIB}
    assert per_tenant("ctxkv_tenant_evictions") == {"a": 10, "b": 0}
    assert per_tenant("ctxkv_tenant_hits") == {"a": 2, "b": 4}
    assert per_tenant("ctxkv_tenant_misses") == {"a": 1, "b": 0}
    assert per_tenant("ctxkv_tenant_put_bytes")["a"] == len(b"a's valuefits") + 12 * 600 * KIB
    requests = {
        (s.labels["tenant"], s.labels["op"], s.labels["status"]): s.value
        for s in families["ctxkv_tenant_requests"].samples
    }
    assert requests[("a", "put", "ok")] == 14 and requests[("b", "put", "ok")] == 2
    assert requests[("a", "delete", "not_found")] == 1


def test_quotas_over_capacity_stop_serve_with_the_numbers(tmp_path):
    target = str(tmp_path / "store.img")
    with open(target, "wb") as file:
        file.truncate(64 * MIB)
    with Store.format([target], extent_size=MIB) as store:
        capacity = store.stats()["capacity_bytes"]
    table = tenant_table(tmp_path, {"a": f"{capacity // MIB}MiB", "b": "1MiB"})
    done = subprocess.run(
        [*CTXKV, "serve", target, "--listen", "127.0.0.1:0", "--tenants", table],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert (
        f"ctxkv serve: tenant quotas add up to {capacity + MIB} bytes" in done.stderr
        and f"but the store holds {capacity} bytes" in done.stderr
    ), done.stderr


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('{"tenants": []}', "expected a non-empty list 'tenants'"),
        ('{"tenants": [{"name": "a", "token": "t", "quota_bytes": "1 GB"}]}',
         r"tenant 0 \(a\): quota_bytes is '1 GB'"),
        ('{"tenants": [{"name": "a", "token": "t", "quota_bytes": 1, "qouta": 2}]}',
         r"unknown fields \['qouta'\]"),
        ('{"tenants": [{"name": "a", "token": "t", "quota_bytes": 1},'
         ' {"name": "b", "token": "t", "quota_bytes": 1}]}', "tenants 0 and 1 have the same token"),
        ('{"tenants": [{"name": "a b", "token": "t", "quota_bytes": 1}]}', "tenant name 'a b'"),
    ],
)  # fmt: skip
def test_a_bad_tenant_table_is_refused_naming_the_mistake(tmp_path, table, problem):
    path = tmp_path / "tenants.json"
    path.write_text(table)
    with pytest.raises(TenantConfigError, match=problem):
        load_tenants(path)
