"""Leases of pool buffers to NIXL clients (docs/protocol.md, "NIXL").

A NIXL get or put lends pool buffers to a client across requests: the client READs or
WRITEs them one-sided, then releases (get) or commits (put). A lease ends exactly once:
released, committed, expired (its timeout passed: a dead or stuck client cannot pin
buffers for ever) or dropped (its connection closed, or the server stops); whichever
comes first returns the buffers to the pool and the credits to the server. The event
loop is the only caller, so the table needs no lock.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from engine.errors import LeaseError
from engine.store.store import ValueLease

DEFAULT_LEASE_TIMEOUT_S = 30.0
ENDED_REMEMBERED = 4096  # ended lease ids kept, so a late call hears why its lease is gone
Kind = Literal["get", "put"]


@dataclass(eq=False)
class Lease:
    lease_id: int
    kind: Kind
    value: ValueLease
    owner: object  # the connection that asked for it: only it may end it
    on_end: asyncio.Future = field(repr=False)  # resolves with the outcome


class LeaseTable:
    def __init__(self, timeout_s: float = DEFAULT_LEASE_TIMEOUT_S):
        if timeout_s <= 0:
            raise ValueError(f"the lease timeout must be positive, got {timeout_s} s")
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._live: dict[int, tuple[Lease, asyncio.TimerHandle]] = {}
        self._ended: OrderedDict[int, str] = OrderedDict()  # lease id -> outcome
        self.outcomes: Counter[str] = Counter()  # outcome -> leases that ended so

    @property
    def active(self) -> int:
        return len(self._live)

    @property
    def buffers(self) -> int:
        """Pool buffers lent to NIXL clients now."""
        return sum(len(lease.value.part_bytes) for lease, _timer in self._live.values())

    def grant(self, kind: Kind, value: ValueLease, owner: object) -> Lease:
        loop = asyncio.get_running_loop()
        lease = Lease(next(self._ids), kind, value, owner, loop.create_future())
        timer = loop.call_later(self.timeout_s, self._end, lease, "expired")
        self._live[lease.lease_id] = (lease, timer)
        return lease

    def take(self, lease_id: int, owner: object, kind: Kind | None) -> Lease:
        """Removes a live lease of this owner (and kind, unless None) from the table (so it can no
        longer expire) and hands it over; its buffers are the caller's to release
        (end_taken). LeaseError, naming why, for any other id."""
        entry = self._live.get(lease_id)
        if entry is None:
            if lease_id in self._ended:
                raise LeaseError(f"lease {lease_id} has ended: {self._ended[lease_id]}")
            raise LeaseError(f"lease {lease_id} was never granted")
        lease, timer = entry
        if lease.owner is not owner:
            raise LeaseError(f"lease {lease_id} belongs to another connection")
        if kind is not None and lease.kind != kind:
            raise LeaseError(f"lease {lease_id} is a {lease.kind} lease, not a {kind} lease")
        timer.cancel()
        del self._live[lease_id]
        return lease

    def end_taken(self, lease: Lease, outcome: str) -> None:
        """Records how a taken lease ended; its buffers must be back in the pool."""
        self._record(lease, outcome)

    def drop_owner(self, owner: object, outcome: str = "dropped: its connection closed") -> None:
        for lease, _timer in [e for e in self._live.values() if e[0].owner is owner]:
            self._end(lease, outcome)

    def drop_all(self, outcome: str = "dropped: the server stopped") -> None:
        for lease, _timer in list(self._live.values()):
            self._end(lease, outcome)

    def _end(self, lease: Lease, outcome: str) -> None:
        _lease, timer = self._live.pop(lease.lease_id)
        timer.cancel()
        lease.value.release()
        self._record(lease, outcome)

    def _record(self, lease: Lease, outcome: str) -> None:
        self._ended[lease.lease_id] = outcome
        if len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)
        self.outcomes[outcome.split(":", 1)[0]] += 1
        if not lease.on_end.done():
            lease.on_end.set_result(outcome)
