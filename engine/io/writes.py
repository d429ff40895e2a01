"""Writes streamed from pool buffers: the caller fills a value's buffers, describes their
writes in the next rows and hands them over; the ring writes them queue_depth at a time
while the caller fills the next, and each value's buffers go back to the pool as soon as
its writes are done, so a put of more than the pool holds streams through it."""

from __future__ import annotations

from collections import deque

import numpy as np

from engine.errors import PoolExhaustedError
from engine.io.buffers import BufferPool, Lease
from engine.io.ring import Ring


class WriteStream:
    """One ring stream of writes over ios, handed over in order. Use it as a context
    manager: leaving waits for every write in flight and gives back their buffers."""

    def __init__(self, ring: Ring, ios: np.ndarray, depth: int, pool: BufferPool):
        self._ring = ring
        self._ios = ios
        self._pool = pool
        self._stream = ring.stream(ios, depth=depth)
        self._handed_over = 0  # rows the ring has
        self._checked = 0  # rows finished, checked and their buffers given back
        self._in_flight: deque[tuple[int, list[Lease]]] = deque()  # (end row, buffers)

    def lease(self, count: int) -> list[Lease]:
        """count pool buffers for the next value, once earlier writes free enough."""
        while True:
            try:
                return self._pool.lease_many(count, timeout=0)
            except PoolExhaustedError:
                if not self._in_flight:
                    break  # others hold the buffers: wait for them as anyone would
                self._settle(self._in_flight[0][0])
        return self._pool.lease_many(count, timeout=None)

    def next_rows(self, count: int) -> np.ndarray:
        """The next count rows, to describe the next value's writes in."""
        assert self._handed_over + count <= len(self._ios), (self._handed_over, count)
        return self._ios[self._handed_over : self._handed_over + count]

    def hand_over(self, leases: list[Lease]) -> None:
        """Queues the writes described in next_rows(len(leases)); the buffers are the
        stream's until those writes are done. Raises for an earlier write that failed."""
        self._handed_over += len(leases)
        self._in_flight.append((self._handed_over, leases))
        self._settle(0)

    def wait_all(self) -> None:
        """Returns once every write handed over is done; raises for the first that failed."""
        self._settle(self._handed_over)

    def _settle(self, wanted: int) -> None:
        finished = self._stream.advance(self._handed_over, wanted)
        while self._in_flight and self._in_flight[0][0] <= finished:
            end, leases = self._in_flight.popleft()
            rows = slice(self._checked, end)
            self._checked = end
            for lease in leases:
                lease.release()
            self._ring.raise_first_error(self._ios[rows], self._stream.results[rows])

    def close(self) -> None:
        """Waits for what is in flight (its buffers are the kernel's until then), then
        gives back every buffer. Idempotent."""
        self._stream.finish()
        while self._in_flight:
            _end, leases = self._in_flight.popleft()
            for lease in leases:
                lease.release()

    def __enter__(self) -> WriteStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
