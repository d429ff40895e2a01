"""Backpressure on the buffer pool, in the event loop."""

from __future__ import annotations

import asyncio


class BufferCredits:
    """Pool buffers promised to the requests and NIXL leases in flight. A request waits
    here, in the event loop, until its buffers are free; it never waits on the pool
    inside a worker thread, where enough such waits would take every worker and leave
    none to run the commits that free buffers. A connection takes credits in request
    order, so a request never holds buffers while an earlier one waits for them. release()
    is synchronous so that a lease expiring in a timer callback can give its credits back."""

    def __init__(self, total: int):
        self.available = total
        self._waiters: list[asyncio.Future] = []

    async def acquire(self, count: int) -> None:
        while self.available < count:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.available -= count

    def release(self, count: int) -> None:
        self.available += count
        # Every waiter rechecks: several small requests may fit where one large did not.
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()
