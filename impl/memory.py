"""The memory guard (docs/protocol.md section 6, "Overload"): new sockets are closed
``try_again_later`` while the process is over ``memory_limit_mb`` *and* its load has not fallen.

RSS alone latches: after a peak the allocator keeps the pages, so RSS stays above the limit long
after every socket closed, and a guard on RSS alone would refuse every new socket for ever while
/readyz said 200. So the guard remembers how many sockets were live when RSS first crossed the
limit and refuses only while at least that many are live again; once load falls below it, the
retained RSS is taken for allocator slack and sockets are accepted. RSS back under the limit
clears the guard. /readyz reports the same answer (its ``memory`` check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

_MIB: Final = 1024 * 1024


def process_rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / _MIB


def check_memory_limit(limit_mb: float | None, setting: str, rss_mb: Callable[[], float] = process_rss_mb) -> None:
    """A limit at or below the idle process would refuse every socket from the start: a
    configuration error naming the setting, raised before the server listens."""
    from pipeproof.errors import ConfigError

    if limit_mb is not None and limit_mb <= rss_mb():
        raise ConfigError(setting, f"{limit_mb:g} MiB is not above the idle process ({rss_mb():.0f} MiB)")


class MemoryGuard:
    """Refuse new sockets while over the limit at the load that crossed it (see module docstring)."""

    def __init__(self, limit_mb: float | None, live: Callable[[], int],
                 rss_mb: Callable[[], float] = process_rss_mb) -> None:
        self.limit_mb = limit_mb
        self._live = live
        self._rss_mb = rss_mb
        self.tripped_at: int | None = None  # live sockets when RSS first crossed the limit

    def exceeded(self) -> bool:
        if self.limit_mb is None:
            return False
        if self._rss_mb() <= self.limit_mb:
            self.tripped_at = None
            return False
        live = self._live()
        if self.tripped_at is None:
            self.tripped_at = max(live, 1)
        return live >= self.tripped_at

    def describe(self) -> str:
        if self.limit_mb is None:
            return "ok: no limit"
        rss = self._rss_mb()
        state = "over_limit" if self.exceeded() else "ok"
        return f"{state}: rss {rss:.0f} MiB, limit {self.limit_mb:.0f} MiB, live sockets {self._live()}"


__all__ = ["MemoryGuard", "check_memory_limit", "process_rss_mb"]
