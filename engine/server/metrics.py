"""What `ctxkv serve` exposes on /metrics, in Prometheus' text format (version 0.0.4):
request counts and latency histograms per operation, bytes moved, connections, the
store's own counters and occupancy, and with a tenant table the same per tenant (label
tenant=NAME): requests, value bytes, get hits and misses, evictions, used and quota bytes."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections import Counter
from collections.abc import Callable

LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                     0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
HTTP_HEADER_LIMIT_BYTES = 8192
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Store counters exported as Prometheus counters: stats() key -> (metric, help).
STORE_COUNTERS = {
    "puts": ("ctxkv_store_puts_total", "Values put."),
    "gets": ("ctxkv_store_gets_total", "Values asked for."),
    "hits": ("ctxkv_store_hits_total", "Gets that returned a value."),
    "misses": ("ctxkv_store_misses_total", "Gets that found nothing (or only damage)."),
    "deletes": ("ctxkv_store_deletes_total", "Values deleted."),
    "evictions": ("ctxkv_store_evictions_total", "Values evicted to make room."),
    "corrupt_reads": ("ctxkv_store_corrupt_reads_total", "Reads that failed verification."),
    "bytes_put": ("ctxkv_store_put_bytes_total", "Value bytes put."),
    "bytes_got": ("ctxkv_store_got_bytes_total", "Value bytes returned."),
    "journal_commits": ("ctxkv_store_journal_commits_total", "Journal group commits."),
    "checkpoints": ("ctxkv_store_checkpoints_total", "Checkpoints written."),
    "flush_errors": ("ctxkv_store_device_flush_errors_total", "Device flushes that failed."),
}
STORE_GAUGES = {
    "keys": ("ctxkv_store_keys", "Keys in the store."),
    "capacity_bytes": ("ctxkv_store_capacity_bytes", "Payload bytes the store can hold."),
    "slots_live": ("ctxkv_store_extents_live", "Extents holding values."),
    "slots_free": ("ctxkv_store_extents_free", "Extents free."),
    "slots_quarantined": ("ctxkv_store_extents_quarantined", "Extents found damaged."),
    "journal_live_blocks": (
        "ctxkv_store_journal_live_blocks",
        "Journal blocks since the checkpoint.",
    ),
}

# Per-tenant series: a key of Quotas.report or Metrics.tenant_figures -> (metric, kind, help).
TENANT_SERIES = {
    "bytes_put": ("ctxkv_tenant_put_bytes_total", "counter", "Value bytes put."),
    "bytes_got": ("ctxkv_tenant_got_bytes_total", "counter", "Value bytes returned."),
    "hits": ("ctxkv_tenant_hits_total", "counter", "Gets that returned a value."),
    "misses": ("ctxkv_tenant_misses_total", "counter", "Gets that found nothing."),
    "evictions": ("ctxkv_tenant_evictions_total", "counter", "The tenant's values evicted."),
    "used_bytes": ("ctxkv_tenant_used_bytes", "gauge", "Extent bytes the tenant's values take."),
    "quota_bytes": ("ctxkv_tenant_quota_bytes", "gauge", "Extent bytes the tenant may take."),
}


class Histogram:
    def __init__(self) -> None:
        self.bucket_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum_s = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.bucket_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.sum_s += seconds
        self.count += 1


class Metrics:
    """The server's own measurements; the event loop is the only writer."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()  # (operation, status)
        self.latency: dict[str, Histogram] = {}
        self.bytes_received = 0
        self.bytes_sent = 0
        self.connections_total = 0
        self.connections_active = 0
        self.connections_refused = 0
        self.protocol_errors = 0
        self.tenant_requests: Counter[tuple[str, str, str]] = Counter()  # (tenant, op, status)
        self.tenant_bytes: Counter[tuple[str, str]] = Counter()  # (tenant, "put" or "got")

    def observe(
        self, operation: str, status: str, seconds: float, tenant: str | None = None
    ) -> None:
        self.requests[(operation, status)] += 1
        self.latency.setdefault(operation, Histogram()).observe(seconds)
        if tenant is not None:
            self.tenant_requests[(tenant, operation, status)] += 1

    def count_bytes(self, tenant: str | None, direction: str, nbytes: int) -> None:
        if tenant is not None:
            self.tenant_bytes[(tenant, direction)] += nbytes

    def tenant_figures(self, tenant: str) -> dict[str, int]:
        """A tenant's own traffic: requests, get hits and misses, value bytes."""
        mine = {
            (op, status): n for (t, op, status), n in self.tenant_requests.items() if t == tenant
        }
        return {
            "requests": sum(mine.values()),
            "hits": mine.get(("get", "ok"), 0),
            "misses": mine.get(("get", "not_found"), 0),
            "bytes_put": self.tenant_bytes[(tenant, "put")],
            "bytes_got": self.tenant_bytes[(tenant, "got")],
        }

    @contextlib.contextmanager
    def timed(self, operation: str) -> object:
        started = time.monotonic()
        outcome = {"status": "ok"}
        try:
            yield outcome
        except BaseException:
            outcome["status"] = "error"
            raise
        finally:
            self.observe(operation, outcome["status"], time.monotonic() - started)

    def render(
        self, store_stats: dict, pool_leased: int, pool_buffers: int,
        tenants: dict[str, dict[str, int]] | None = None, nixl: dict | None = None,
    ) -> str:  # fmt: skip
        """tenants: each tenant's quotas report (engine.tenants.quotas.Quotas.report);
        nixl: the NIXL front end's stats() when the server runs with --nixl."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family("ctxkv_requests_total", "counter", "Requests answered, by operation and status.")
        for (operation, status), count in sorted(self.requests.items()):
            lines.append(f'ctxkv_requests_total{{op="{operation}",status="{status}"}} {count}')
        family("ctxkv_request_duration_seconds", "histogram", "Request latency in the server.")
        name = "ctxkv_request_duration_seconds"
        for operation, histogram in sorted(self.latency.items()):
            cumulative = 0
            for bound, count in zip(LATENCY_BUCKETS_S, histogram.bucket_counts, strict=False):
                cumulative += count
                lines.append(f'{name}_bucket{{op="{operation}",le="{bound}"}} {cumulative}')
            lines.append(f'{name}_bucket{{op="{operation}",le="+Inf"}} {histogram.count}')
            lines.append(f'{name}_sum{{op="{operation}"}} {histogram.sum_s}')
            lines.append(f'{name}_count{{op="{operation}"}} {histogram.count}')
        for name, kind, help_text, value in (
            ("ctxkv_received_bytes_total", "counter", "Request bytes.", self.bytes_received),
            ("ctxkv_sent_bytes_total", "counter", "Bytes of response frames.", self.bytes_sent),
            ("ctxkv_connections_total", "counter", "Connections accepted.", self.connections_total),
            ("ctxkv_connections_refused_total", "counter", "Connections over the limit.",
             self.connections_refused),
            ("ctxkv_protocol_errors_total", "counter", "Malformed requests.", self.protocol_errors),
            ("ctxkv_connections_active", "gauge", "Connections open now.", self.connections_active),
            ("ctxkv_pool_buffers", "gauge", "Extent buffers in the pool.", pool_buffers),
            ("ctxkv_pool_buffers_leased", "gauge", "Buffers lent out now.", pool_leased),
        ):  # fmt: skip
            family(name, kind, help_text)
            lines.append(f"{name} {value}")
        if nixl is not None:
            render_nixl(nixl, family, lines)
        for key, (name, help_text) in STORE_COUNTERS.items():
            family(name, "counter", help_text)
            lines.append(f"{name} {store_stats[key]}")
        for key, (name, help_text) in STORE_GAUGES.items():
            family(name, "gauge", help_text)
            lines.append(f"{name} {store_stats[key]}")
        if tenants:
            self._render_tenants(tenants, family, lines)
        return "\n".join(lines) + "\n"

    def _render_tenants(
        self, tenants: dict[str, dict[str, int]], family: Callable[[str, str, str], None],
        lines: list[str],
    ) -> None:  # fmt: skip
        # Tenant names are letters, digits and _.- (engine.tenants.keys): no escaping.
        family("ctxkv_tenant_requests_total", "counter", "Requests answered, per tenant.")
        for (tenant, operation, status), count in sorted(self.tenant_requests.items()):
            lines.append(
                f'ctxkv_tenant_requests_total{{tenant="{tenant}",op="{operation}",'
                f'status="{status}"}} {count}'
            )
        for key, (name, kind, help_text) in TENANT_SERIES.items():
            family(name, kind, help_text)
            for tenant in sorted(tenants):
                figures = {**tenants[tenant], **self.tenant_figures(tenant)}
                lines.append(f'{name}{{tenant="{tenant}"}} {figures[key]}')


def render_nixl(nixl: dict, family: Callable[[str, str, str], None], lines: list[str]) -> None:
    for name, help_text, value in (
        ("ctxkv_nixl_leases_active", "NIXL leases live now.", nixl["leases_active"]),
        ("ctxkv_nixl_lease_buffers", "Pool buffers lent to NIXL clients now.",
         nixl["lease_buffers"]),
        ("ctxkv_nixl_lease_buffers_max", "Pool buffers NIXL leases may hold at once.",
         nixl["max_lease_buffers"]),
        ("ctxkv_nixl_lease_timeout_seconds", "A lease expires this long after its grant.",
         nixl["lease_timeout_s"]),
    ):  # fmt: skip
        family(name, "gauge", help_text)
        lines.append(f"{name} {value}")
    family("ctxkv_nixl_leases_granted_total", "counter", "NIXL leases granted, by kind.")
    for kind, count in sorted(nixl["leases_granted"].items()):
        lines.append(f'ctxkv_nixl_leases_granted_total{{kind="{kind}"}} {count}')
    family("ctxkv_nixl_leases_ended_total", "counter", "NIXL leases ended, by outcome.")
    for outcome, count in sorted(nixl["leases_ended"].items()):
        lines.append(f'ctxkv_nixl_leases_ended_total{{outcome="{outcome}"}} {count}')


async def serve_metrics(
    host: str, port: int, render: Callable[[], str], stop: asyncio.Event,
    ready: Callable[[str, int], None] | None = None,
) -> None:  # fmt: skip
    """A minimal HTTP/1.1 endpoint: GET /metrics, anything else 404."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            if len(request) > HTTP_HEADER_LIMIT_BYTES:
                raise ValueError("request too large")
            method, path, _version = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if method == "GET" and path.split("?", 1)[0] == "/metrics":
                body, status, content_type = render().encode(), "200 OK", CONTENT_TYPE
            else:
                body, status, content_type = b"not found\n", "404 Not Found", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ValueError, OSError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):  # fmt: skip
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port, limit=HTTP_HEADER_LIMIT_BYTES)
    bound_port = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(host, bound_port)
    async with server:
        await stop.wait()
