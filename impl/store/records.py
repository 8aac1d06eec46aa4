"""The store's records: what its reads and writes return (PROTOCOL sections 3, 4 and 5).

Frozen dataclasses, one per stored row kind, and the conversions from rows to records. The
delivery states and escalation reasons are the protocol's enums (:mod:`pipeproof.protocol`), so
the store, the model and the server name the same four states and three reasons.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from sqlalchemy import Row

from pipeproof.protocol import DeliveryState, EscalationReason

from .schema import RUN_TERMINAL_STATES

EventState = DeliveryState
"""The store's former name for :class:`~pipeproof.protocol.DeliveryState`, kept for its importers."""

ESCALATION_REASONS: Final[tuple[str, ...]] = tuple(reason.value for reason in EscalationReason)
"""The escalation reasons as the store keeps them (their wire strings), in declaration order."""


@dataclass(frozen=True)
class ContextRecord:
    """Result of :meth:`Store.get_or_create_context`: the user's one live context (section 3)."""

    context_id: str
    epoch: int
    created: bool
    user_id: str
    account_id: str


@dataclass(frozen=True)
class ContextInfo:
    """A stored context row. ``last_seq`` is the highest seq allocated so far (0 if none)."""

    context_id: str
    user_id: str
    account_id: str
    epoch: int
    created_at: float
    last_used_at: float
    expired: bool
    expired_at: float | None
    last_seq: int


@dataclass(frozen=True)
class EventRecord:
    """One event of a context's stream (section 5). ``data`` is a read-only view of the payload."""

    context_id: str
    seq: int
    event_id: str
    run_id: str
    kind: str
    data: Mapping[str, Any]
    state: DeliveryState
    attempt: int
    reason: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class RunRecord:
    """One run (section 4); ``request_id`` is unique per context, which makes ``run.start`` idempotent.

    ``owner_node`` holds the run's lease until ``lease_expires`` (wall-clock seconds; both None in a
    row from before leases): section 6, "When a node dies". ``cancel_requested`` records a
    ``run.cancel`` that a node not holding the run received, for the holder to honour."""

    run_id: str
    context_id: str
    request_id: str
    user_id: str
    state: str
    created_at: float
    updated_at: float
    owner_node: str | None = None
    lease_expires: float | None = None
    cancel_requested: bool = False

    @property
    def finished(self) -> bool:
        """The stored state is terminal (COMPLETED, FAILED or REJECTED)."""
        return self.state in RUN_TERMINAL_STATES


def encode_event_data(data: Mapping[str, Any]) -> str:
    """An event's data as the store keeps it (compact JSON, sorted keys); raises TypeError or
    ValueError for data JSON cannot hold."""
    return json.dumps(dict(data), separators=(",", ":"), sort_keys=True)


def event_from_row(row: Row[Any]) -> EventRecord:
    """An event from a row of the ``events`` table, by column name (the reads)."""
    payload = json.loads(row.data)
    return EventRecord(
        context_id=str(row.context_id),
        seq=int(row.seq),
        event_id=str(row.event_id),
        run_id=str(row.run_id),
        kind=str(row.kind),
        data=MappingProxyType(payload),
        state=DeliveryState(row.state),
        attempt=int(row.attempt),
        reason=None if row.reason is None else str(row.reason),
        created_at=float(row.created_at),
        updated_at=float(row.updated_at),
    )


def run_from_row(row: Row[Any]) -> RunRecord:
    """A run from a row of the ``runs`` table."""
    return RunRecord(
        run_id=str(row.run_id),
        context_id=str(row.context_id),
        request_id=str(row.request_id),
        user_id=str(row.user_id),
        state=str(row.state),
        created_at=float(row.created_at),
        updated_at=float(row.updated_at),
        owner_node=None if row.owner_node is None else str(row.owner_node),
        lease_expires=None if row.lease_expires is None else float(row.lease_expires),
        cancel_requested=bool(row.cancel_requested),
    )


def context_from_row(row: Row[Any]) -> ContextInfo:
    """A context from a row of the ``contexts`` table (``next_seq`` is the first unallocated seq)."""
    return ContextInfo(
        context_id=str(row.id),
        user_id=str(row.user_id),
        account_id=str(row.account_id),
        epoch=int(row.epoch),
        created_at=float(row.created_at),
        last_used_at=float(row.last_used_at),
        expired=bool(row.expired),
        expired_at=None if row.expired_at is None else float(row.expired_at),
        last_seq=int(row.next_seq) - 1,
    )


def now_or_clock(now: float | None) -> float:
    """The caller's timestamp, or the wall clock when it passed none."""
    return time.time() if now is None else now
