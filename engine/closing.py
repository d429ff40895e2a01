"""The context-manager shapes ctxkv's resources share: `with X(...) as x:` closes (or,
for a lease, releases) x on the way out, error or not."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closeable:
    """Subclasses define close(); it must be idempotent."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Releasable:
    """The same shape for things lent rather than owned: `with lease:` gives it back."""

    __slots__ = ()  # leases are many and small: keep subclasses' __slots__ effective

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
