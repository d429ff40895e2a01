"""The one context-manager shape every resource of ctxkv shares: `with X(...) as x:`
closes x on the way out, error or not."""

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
