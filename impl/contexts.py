"""Per-user execution contexts (PROTOCOL section 3), over the store, traced by the context machine.

The store makes the guarantees (one live context per user under any concurrency, TTL expiry with
a new epoch); this module is the I/O shell that mirrors each outcome into a
:class:`~pipeproof.impl.audit.TracedMachine` of ``model.context`` so the audit log shows every
create / attach / detach / reject_limit / expire, and keeps attached contexts alive (touch) while
sockets are on them, because the model expires only a context with no socket attached.

Instance ids are ``context_id``: a user's next incarnation (new epoch) is a new instance, and the
superseded one is expired as soon as its last socket detaches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pipeproof.errors import IllegalTransition
from pipeproof.model.context import context_machine
from pipeproof.model.spec import Machine

from .audit import AuditWriter, TracedMachine
from .limits import LimitScope
from .metrics import Metrics
from .store import ContextRecord, Store

log = logging.getLogger("pipeproof.contexts")


@dataclass
class _Tracked:
    machine: TracedMachine
    record: ContextRecord
    superseded: bool = False
    sessions: set[str] = field(default_factory=set)
    last_touch: float = 0.0


class ContextRegistry:
    """Resolves and tracks contexts for the sockets of this process (section 3)."""

    def __init__(
        self, store: Store, audit: AuditWriter, metrics: Metrics, *, ttl: float, max_per_user: int
    ) -> None:
        self.store = store
        self.audit = audit
        self.metrics = metrics
        self.ttl = ttl
        self.machine: Machine = context_machine(max_per_user)
        self._current: dict[str, _Tracked] = {}  # user -> their current context on this node
        self._by_id: dict[str, _Tracked] = {}

    async def resolve(self, user: str, account: str, now: float | None = None) -> ContextRecord:
        """Atomic get-or-create in the store (raises StoreError subclasses)."""
        return await self.store.get_or_create_context(
            user, account, time.time() if now is None else now, self.ttl
        )

    def attach(self, record: ContextRecord, session_id: str) -> None:
        """Mirror a resolved context and one more READY socket on it (create or attach)."""
        current = self._current.get(record.user_id)
        detail: dict[str, Any] = {
            "epoch": record.epoch,
            "store_created": record.created,
            "session_id": session_id,
        }
        if current is not None and current.record.context_id == record.context_id:
            current.machine.fire("attach", detail, account_full=False)
            current.sessions.add(session_id)
            return
        if current is not None:
            # The store handed out a new epoch: the old one expired there. Mirror the expiry
            # now if no socket holds it, otherwise when its last socket detaches.
            current.superseded = True
            self._expire_if_idle(current)
        tracked = _Tracked(
            TracedMachine(
                self.machine,
                "context",
                record.context_id,
                self.audit,
                user=record.user_id,
                context_id=record.context_id,
            ),
            record,
            last_touch=time.monotonic(),
        )
        tracked.machine.fire("create", detail, account_full=False)
        tracked.sessions.add(session_id)
        self._current[record.user_id] = tracked
        self._by_id[record.context_id] = tracked

    def detach(self, context_id: str, session_id: str) -> None:
        tracked = self._by_id.get(context_id)
        if tracked is None or session_id not in tracked.sessions:
            return
        tracked.sessions.discard(session_id)
        tracked.machine.fire("detach", {"session_id": session_id})
        self._expire_if_idle(tracked)

    def reject_limit(self, user: str, scope: LimitScope, session_id: str) -> None:
        """Mirror a limit rejection on the user's current context, if this node tracks one."""
        tracked = self._current.get(user)
        if tracked is None or tracked.superseded:
            return
        try:
            tracked.machine.fire(
                "reject_limit", {"scope": scope, "session_id": session_id}, account_full=scope == "account"
            )
        except IllegalTransition as exc:
            # The limiter (which may count other nodes) and this node's mirror disagree: the close
            # still happens with connection_limit; the disagreement is counted and logged, not hidden.
            self.metrics.illegal_transitions.labels(machine="context", event="reject_limit").inc()
            log.warning("context mirror disagrees with the limiter: %s", exc)

    def _expire_if_idle(self, tracked: _Tracked) -> None:
        if tracked.superseded and not tracked.sessions:
            tracked.machine.fire("expire", {"reason": "superseded by a new epoch"})
            self._by_id.pop(tracked.record.context_id, None)
            if self._current.get(tracked.record.user_id) is tracked:
                del self._current[tracked.record.user_id]

    async def keepalive(self, context_id: str) -> bool:
        """Touch the context if it was not touched for a third of the TTL, so a context with
        sockets attached never idles out in the store. False when the store says it has expired."""
        tracked = self._by_id.get(context_id)
        if tracked is None:
            return True
        if time.monotonic() - tracked.last_touch < self.ttl / 3:
            return True
        tracked.last_touch = time.monotonic()
        return await self.store.touch_context(context_id, time.time())


__all__ = ["ContextRegistry"]
