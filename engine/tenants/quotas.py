"""Capacity quotas: how many extents each tenant's values may take, and what a put of
each tenant may evict (engine.alloc.log.Claim).

A tenant within its quota keeps its values: no other tenant's put evicts them. A tenant
at its quota evicts its own oldest values (FIFO with the allocator's second chance; pins
are kept and count against the quota). Values of no tenant in the table, and those of a
tenant over its quota (after its quota was lowered), may be evicted by anyone. Quotas may
not add up to more than the store holds, so a tenant under its quota always finds a slot
that is free or of nobody protected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from engine.alloc.log import Claim, MemberLog
from engine.errors import CtxkvError
from engine.tenants.keys import digest_tag, tenant_prefix, tenant_tag


class QuotaError(CtxkvError, ValueError):
    """A tenant table the store cannot honour."""


class Quotas:
    """quota_bytes: tenant name -> bytes its values may take (whole extents, rounded
    down). capacity_extents: the extents the store can use."""

    def __init__(self, quota_bytes: Mapping[str, int], extent_bytes: int, capacity_extents: int):
        self.extent_bytes = extent_bytes
        self.names: dict[int, str] = {}
        self.quota_extents: dict[int, int] = {}
        for name, nbytes in quota_bytes.items():
            tenant_prefix(name)  # checks the name
            tag = tenant_tag(name)
            if tag == 0 or tag in self.names:
                other = self.names.get(tag, "the empty slot's tag")
                raise QuotaError(
                    f"tenants {name!r} and {other!r} have the same 32-bit tag {tag:#010x}: "
                    f"rename one"
                )
            if nbytes < extent_bytes:
                raise QuotaError(
                    f"tenant {name!r}: quota of {nbytes} bytes is less than one extent "
                    f"({extent_bytes} bytes)"
                )
            self.names[tag] = name
            self.quota_extents[tag] = nbytes // extent_bytes
        total = sum(self.quota_extents.values())
        if total > capacity_extents:
            listed = ", ".join(
                f"{self.names[tag]}: {extents * extent_bytes}"
                for tag, extents in self.quota_extents.items()
            )
            raise QuotaError(
                f"tenant quotas add up to {total * extent_bytes} bytes ({total} extents of "
                f"{extent_bytes} bytes; {listed}) but the store holds "
                f"{capacity_extents * extent_bytes} bytes ({capacity_extents} extents)"
            )
        self.usage: dict[int, int] = dict.fromkeys(self.quota_extents, 0)
        self.evictions: dict[int, int] = dict.fromkeys(self.quota_extents, 0)
        self.capacity_extents = capacity_extents

    def attach(self, logs: Iterable[MemberLog]) -> None:
        """Counts each tenant's slots in logs afresh; from now on the logs keep count."""
        logs = list(logs)
        for tag in self.usage:
            self.usage[tag] = 0
        for log in logs:
            for tag, count in log.slots_by_tag().items():
                if tag in self.usage:
                    self.usage[tag] += count
            log.usage = self.usage

    def tag_of(self, digest: bytes) -> int | None:
        """The tenant tag of a digest, None when it is no tenant's in the table."""
        tag = digest_tag(digest)
        return tag if tag in self.quota_extents else None

    def claim(self, digest: bytes) -> Claim:
        """What a put of digest may take now."""
        tag = self.tag_of(digest)
        own_only = tag is not None and self.usage[tag] >= self.quota_extents[tag]
        return Claim(tag, own_only, self._protected())

    def fallback(self, claim: Claim) -> Claim | None:
        """When nothing the claim allows is left (extents quarantined since the quotas
        were set, or every free one being written): the tenant's own oldest values."""
        if claim.tag is None or claim.own_only:
            return None
        return Claim(claim.tag, True, claim.protected)

    def _protected(self) -> tuple[int, ...]:
        return tuple(tag for tag, quota in self.quota_extents.items() if self.usage[tag] <= quota)

    def count_eviction(self, digest: bytes) -> None:
        tag = self.tag_of(digest)
        if tag is not None:
            self.evictions[tag] += 1

    def report(self, name: str) -> dict[str, int]:
        """One tenant's figures: used and quota bytes (whole extents), evictions."""
        tag = tenant_tag(name)
        return {
            "used_bytes": self.usage[tag] * self.extent_bytes,
            "quota_bytes": self.quota_extents[tag] * self.extent_bytes,
            "used_extents": self.usage[tag],
            "quota_extents": self.quota_extents[tag],
            "evictions": self.evictions[tag],
        }

    def full_message(self, claim: Claim) -> str:
        if claim.tag is None:
            return "every extent is another tenant's within its quota, pinned or being written"
        name = self.names[claim.tag]
        return (
            f"tenant {name!r}: every extent of its quota of "
            f"{self.quota_extents[claim.tag] * self.extent_bytes} bytes is pinned or being "
            f"written"
        )
