"""Connection limits per user and per account (PROTOCOL section 3: close ``connection_limit``).

The server asks a :class:`ConnectionLimiter` for a :class:`Slot` before a socket becomes READY
and releases it when the socket closes. :class:`InProcessLimiter` counts live sockets in this
process, which is exact for one node; a multi-node deployment implements the same protocol over
the shared store (a row per live socket with a heartbeat, counted in the acquiring transaction)
without touching the server.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from pipeproof.protocol import CloseReason
from pipeproof.protocol.frames import CloseRequested

LimitScope = Literal["user", "account"]


class ConnectionLimitExceeded(CloseRequested):
    """Over ``max_connections_per_user`` or ``max_connections_per_account``: close ``connection_limit``."""

    def __init__(self, scope: LimitScope, limit: int) -> None:
        self.scope: LimitScope = scope
        self.limit = limit
        super().__init__(CloseReason.CONNECTION_LIMIT, f"{scope} limit {limit} reached")


@dataclass(frozen=True)
class Slot:
    """A reserved connection slot; give it back with :meth:`ConnectionLimiter.release`."""

    session_id: str
    user: str
    account: str


@runtime_checkable
class ConnectionLimiter(Protocol):
    """Counts live sockets per user and per account; the check-and-reserve must be atomic."""

    async def acquire(self, session_id: str, user: str, account: str) -> Slot:
        """Reserve a slot or raise :class:`ConnectionLimitExceeded` (user checked before account)."""
        ...

    async def release(self, slot: Slot) -> None:
        """Give a slot back; releasing twice is a no-op."""
        ...

    def count(self, user: str, account: str) -> tuple[int, int]:
        """Live sockets of ``user`` and of ``account`` as this limiter sees them."""
        ...


class InProcessLimiter:
    """Exact for a single node. ``acquire`` has no await between check and reserve, so it is
    atomic on the event loop without a lock."""

    def __init__(self, max_per_user: int, max_per_account: int) -> None:
        self.max_per_user = max_per_user
        self.max_per_account = max_per_account
        self._users: Counter[str] = Counter()
        self._accounts: Counter[str] = Counter()
        self._live: dict[str, Slot] = {}

    async def acquire(self, session_id: str, user: str, account: str) -> Slot:
        if self._users[user] >= self.max_per_user:
            raise ConnectionLimitExceeded("user", self.max_per_user)
        if self._accounts[account] >= self.max_per_account:
            raise ConnectionLimitExceeded("account", self.max_per_account)
        slot = Slot(session_id, user, account)
        self._users[user] += 1
        self._accounts[account] += 1
        self._live[session_id] = slot
        return slot

    async def release(self, slot: Slot) -> None:
        if self._live.pop(slot.session_id, None) is None:
            return
        self._users[slot.user] -= 1
        self._accounts[slot.account] -= 1
        # Drop zero entries so the counters do not grow with every user ever seen.
        self._users += Counter()
        self._accounts += Counter()

    def count(self, user: str, account: str) -> tuple[int, int]:
        return self._users[user], self._accounts[account]


__all__ = ["ConnectionLimitExceeded", "ConnectionLimiter", "InProcessLimiter", "LimitScope", "Slot"]
