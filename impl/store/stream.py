"""The per-context event stream (PROTOCOL section 5): appends, delivery state changes, and reads.

Events move only forward: every state change is a conditional ``UPDATE`` whose ``WHERE`` admits
only the allowed source states (PENDING/SENT -> SENT/PENDING/ACKED/ESCALATED; ACKED and ESCALATED
are terminal), and gap-free per-context seqs are allocated by bumping ``contexts.next_seq`` in the
same transaction as the insert, so the row lock (PostgreSQL) or the write lock (SQLite,
``BEGIN IMMEDIATE``) serialises allocation.

Each write kind has one implementation, its merge (``_*_many``): a group runs it once for all the
writes of that kind, and a write run alone (or a group fallen back to one transaction per write)
runs it with one item (``_write_one``). Each is one or two batch statements (:mod:`.hotsql`)
whatever the number of items.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from pipeproof.errors import LeaseLost, StoreError, StoreIntegrityError
from pipeproof.protocol import LIVE_STATES, DeliveryState, EscalationReason

from .hotsql import (
    ACK_THROUGH,
    BUMP_SEQ,
    ESCALATE,
    HELD_RUNS,
    INSERT_EVENTS,
    MARK_PENDING,
    MARK_SENT,
    SELECT_EVENTS,
    BatchStatement,
    event_from_values,
    execute_batch,
)
from .records import ESCALATION_REASONS, EventRecord, encode_event_data, event_from_row, now_or_clock
from .schema import events
from .writer import GroupCommitStore

_LIVE_VALUES: Final = tuple(state.value for state in DeliveryState if state in LIVE_STATES)
"""The live states as stored, in declaration order (the reads' ``IN`` lists)."""


class EventStream(GroupCommitStore):
    """The event operations of :class:`~pipeproof.impl.store.Store` (section 5)."""

    async def _execute_batch(
        self, conn: AsyncConnection, statement: BatchStatement, rows: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        """Run ``statement`` over ``rows`` (:func:`~.hotsql.execute_batch`)."""
        return await execute_batch(conn, self._dialect, statement, rows)

    async def append_event(
        self,
        context_id: str,
        run_id: str,
        kind: str,
        data: Mapping[str, Any],
        now: float,
        *,
        sent: bool = False,
    ) -> EventRecord:
        """Append one event with the context's next ``seq`` (PROTOCOL section 5).

        The seq counter bump and the insert share one transaction, so seqs are 1, 2, 3... with no
        gap or duplicate under any concurrency. Appending also touches the context (a running run
        is activity). Appending to an expired context is allowed: its events still need delivering
        or escalating. Unknown context: StoreIntegrityError.

        The event is stored PENDING with attempt 0, or with ``sent`` SENT with attempt 1: for a
        caller about to write it to a live session, which saves the separate :meth:`mark_sent`.
        Section 5 still holds: the event is durable (committed) before this returns, so before it
        is sent. Marking it SENT before the send is safe because a SENT event that never reached
        anyone is resent after its ack timeout or acked by a resume, so nothing is lost; if the
        send fails at once, the caller fires ``send_failed`` and calls :meth:`mark_pending`,
        which keeps attempt 1. The returned record is the event as stored.
        """
        payload = encode_event_data(data)  # fail on unserialisable data before touching the store
        (record,) = await self.submit_append_events(context_id, ((run_id, kind, payload),), now, sent=sent)
        return record

    def submit_append_events(
        self,
        context_id: str,
        events: Sequence[tuple[str, str, str]],
        now: float,
        *,
        sent: bool = False,
        holder: str | None = None,
    ) -> asyncio.Future[list[EventRecord]]:
        """Append several events, ``(run_id, kind, payload)`` in order, as one write (section 5);
        each payload is its data as :func:`encode_event_data` encoded it (so a producer finds
        unserialisable data when it queues the event, and it is encoded once).

        All or nothing: they take consecutive seqs in one transaction, or none is stored and the
        future fails with the StoreError. A producer that keeps several events of one context in
        flight must not see event k lost and k+1 stored; sending each batch only after the
        previous one committed, as one write, guarantees that. Returns a future (resolved after
        the COMMIT) rather than a coroutine: ``asyncio.shield`` of a future costs no task.
        Cancelling the future withdraws the write if the writer has not started it. ``sent``: see :meth:`append_event`.

        With ``holder`` (a node id) the events are stored only if that node still holds the lease
        of each of their runs (section 6): the same transaction reads the runs' owners, locking
        the rows against a takeover until COMMIT, so an event of a node whose run was taken over
        is never stored after the taking node's terminal event; otherwise the future fails with
        :class:`~pipeproof.errors.LeaseLost` naming the runs, and nothing is stored.
        """
        stamp = float(now)
        items = [(context_id, run_id, kind, payload, stamp, sent, holder) for run_id, kind, payload in events]
        if not items:
            raise ValueError("no events to append")
        return self._submit_one("append_event", self._append_batches, items)

    async def _append_batches(self, conn: AsyncConnection, batches: list[Any]) -> list[Any]:
        """Merged multi-event appends: the group's events in queue order through one
        :meth:`_append_many`; a write whose events are refused (an unknown context, a run whose
        lease its holder lost) is refused as a whole, which rolls the group back and commits
        each write alone."""
        lost = await self._runs_not_held(conn, [item for batch in batches for item in batch])
        fenced: list[LeaseLost | None] = []
        for batch in batches:
            taken = frozenset(item[1] for item in batch if item[6] is not None and (item[6], item[1]) in lost)
            fenced.append(
                LeaseLost("append_event", f"runs {', '.join(sorted(taken))}: another node holds the lease", taken)
                if taken else None
            )
        kept = [item for batch, refusal in zip(batches, fenced, strict=True) if refusal is None for item in batch]
        outcomes = await self._append_many(conn, kept) if kept else []
        result: list[Any] = []
        start = 0
        for batch, refusal in zip(batches, fenced, strict=True):
            if refusal is not None:
                result.append(refusal)
                continue
            mine = outcomes[start : start + len(batch)]
            start += len(batch)
            refused = next((o for o in mine if isinstance(o, StoreError)), None)
            result.append(refused if refused is not None else mine)
        return result

    async def _runs_not_held(self, conn: AsyncConnection, items: list[Any]) -> set[tuple[str, str]]:
        """``(holder, run_id)`` of the items whose holder no longer holds the run's lease. The rows
        of the runs still held are locked (``FOR SHARE`` on PostgreSQL; SQLite has one writer at a
        time) until COMMIT, so no takeover claim can slip in before these events are stored."""
        wanted = {(item[6], item[1]) for item in items if item[6] is not None}
        if not wanted:
            return set()
        rows = await self._execute_batch(conn, HELD_RUNS, [(run_id, holder) for holder, run_id in sorted(wanted)])
        return wanted - {(str(owner), str(run_id)) for run_id, owner in rows}

    async def _append_many(self, conn: AsyncConnection, items: list[Any]) -> list[Any]:
        """Merged appends: one seq bump for every context of the group, one multi-row insert.

        Per context, the group's appends take consecutive seqs in queue order, exactly what
        that many single appends would have allocated; an unknown context refuses only its own
        appends (StoreIntegrityError), which wrote nothing. Each item's ``sent`` flag picks its
        stored state (see :meth:`append_event`).
        """
        counts: dict[str, int] = {}
        latest: dict[str, float] = {}
        for context_id, _run_id, _kind, _payload, now, _sent, _holder in items:
            counts[context_id] = counts.get(context_id, 0) + 1
            latest[context_id] = max(latest.get(context_id, now), now)
        bumped = await self._execute_batch(
            conn, BUMP_SEQ, [(c, n, latest[c]) for c, n in counts.items()]
        )
        # RETURNING gives next_seq after the bump: this context's appends take the n below it.
        next_seq = {str(c): int(after) - counts[str(c)] for c, after in bumped}
        outcomes: list[Any] = []
        rows: list[tuple[Any, ...]] = []
        for context_id, run_id, kind, payload, now, sent, _holder in items:
            seq = next_seq.get(context_id)
            if seq is None:
                outcomes.append(StoreIntegrityError("append_event", f"no context {context_id!r}"))
                continue
            next_seq[context_id] = seq + 1
            state, attempt = (DeliveryState.SENT, 1) if sent else (DeliveryState.PENDING, 0)
            event_id = uuid.uuid4().hex
            rows.append((context_id, seq, event_id, run_id, kind, payload, state.value, attempt, now))
            # What a read gives back: the payload goes through JSON as stored.
            outcomes.append(
                EventRecord(
                    context_id=context_id,
                    seq=seq,
                    event_id=event_id,
                    run_id=run_id,
                    kind=kind,
                    data=MappingProxyType(json.loads(payload)),
                    state=state,
                    attempt=attempt,
                    reason=None,
                    created_at=now,
                    updated_at=now,
                )
            )
        if rows:
            await self._execute_batch(conn, INSERT_EVENTS, rows)
        return outcomes

    async def _change_events(
        self,
        conn: AsyncConnection,
        operation: str,
        statement: BatchStatement,
        changes: Mapping[tuple[str, int], tuple[Any, ...]],
    ) -> dict[tuple[str, int], EventRecord | StoreError]:
        """Apply ``statement`` (a conditional UPDATE ... RETURNING of whole events) to the events
        keyed ``(context_id, seq)`` with their extra batch columns; returns each key's event as
        stored afterwards, changed or not, or StoreIntegrityError for an event that does not
        exist. The events the UPDATE left alone (terminal, stale) cost a second statement."""
        rows = [(c, q, *extra) for (c, q), extra in changes.items()]
        stored: dict[tuple[str, int], EventRecord | StoreError] = {}
        for row in await self._execute_batch(conn, statement, rows):
            record = event_from_values(row)
            stored[(record.context_id, record.seq)] = record
        missing = [key for key in changes if key not in stored]
        if missing:
            for row in await self._execute_batch(conn, SELECT_EVENTS, missing):
                record = event_from_values(row)
                stored[(record.context_id, record.seq)] = record
            for c, q in missing:
                if (c, q) not in stored:
                    stored[(c, q)] = StoreIntegrityError(operation, f"no event seq {q} in context {c!r}")
        return stored

    async def mark_sent(
        self, context_id: str, seq: int, attempt: int, now: float | None = None
    ) -> EventRecord:
        """PENDING/SENT -> SENT with ``attempt`` (section 5), if ``attempt`` is not below the stored one.

        Returns the event as stored: an ACKED/ESCALATED event, or a stale (lower) attempt from a
        racing sender, is left unchanged, which the caller sees in ``state`` / ``attempt``.
        Unknown event: StoreIntegrityError.
        """
        if attempt < 1:
            raise ValueError("attempt counts sends and starts at 1")
        record: EventRecord = await self._write_one(
            "mark_sent", self._mark_sent_many, (context_id, seq, attempt, float(now_or_clock(now)))
        )
        return record

    async def _mark_sent_many(self, conn: AsyncConnection, items: list[Any]) -> list[Any]:
        """Merged mark_sent: one UPDATE ... RETURNING for the group (plus a SELECT of the events
        it left alone, if any). Several for one event are folded first into what applying them
        in queue order leaves: the highest attempt, the later one on a tie. Every such caller
        gets the event as stored after the group. An unknown event refuses only its own write."""
        changes: dict[tuple[str, int], tuple[int, float]] = {}
        for c, q, attempt, now in items:
            previous = changes.get((c, q))
            if previous is None or attempt >= previous[0]:
                changes[(c, q)] = (attempt, now)
        stored = await self._change_events(conn, "mark_sent", MARK_SENT, changes)
        return [stored[(c, q)] for c, q, _attempt, _now in items]

    async def mark_pending(self, context_id: str, seq: int, now: float | None = None) -> EventRecord:
        """SENT -> PENDING: the send failed or the socket went away; the event awaits a retry or a
        resume (section 5). Same rank in the state order, so not a backwards move; the attempt
        is kept. Returns the event as stored (PENDING and terminal events are left unchanged).
        Unknown event: StoreIntegrityError."""
        record: EventRecord = await self._write_one(
            "mark_pending", self._mark_pending_many, (context_id, seq, float(now_or_clock(now)))
        )
        return record

    async def _mark_pending_many(self, conn: AsyncConnection, items: list[Any]) -> list[Any]:
        """Merged mark_pending: one UPDATE for the group. Of several for one event only the first
        can apply (it leaves the event PENDING), so the first's stamp is kept."""
        changes: dict[tuple[str, int], tuple[float]] = {}
        for c, q, now in items:
            changes.setdefault((c, q), (now,))
        stored = await self._change_events(conn, "mark_pending", MARK_PENDING, changes)
        return [stored[(c, q)] for c, q, _now in items]

    async def escalate(
        self, context_id: str, seq: int, reason: EscalationReason, now: float | None = None
    ) -> EventRecord:
        """PENDING/SENT -> ESCALATED with ``reason`` (section 5). An ACKED event stays ACKED, and an
        event already ESCALATED keeps its first reason; the stored event is returned either way.
        Unknown event: StoreIntegrityError."""
        if reason not in ESCALATION_REASONS:
            raise ValueError(f"unknown escalation reason {reason!r}; expected one of {ESCALATION_REASONS}")
        # The driver gets the plain wire string, not the StrEnum member: bound values stay exact str.
        record: EventRecord = await self._write_one(
            "escalate", self._escalate_many, (context_id, seq, str(reason), float(now_or_clock(now)))
        )
        return record

    async def _escalate_many(self, conn: AsyncConnection, items: list[Any]) -> list[Any]:
        """Merged escalate: one UPDATE for the group. Of several for one event only the first can
        apply (ESCALATED is terminal), so it keeps the first's reason, as in queue order."""
        changes: dict[tuple[str, int], tuple[str, float]] = {}
        for c, q, reason, now in items:
            changes.setdefault((c, q), (reason, now))
        stored = await self._change_events(conn, "escalate", ESCALATE, changes)
        return [stored[(c, q)] for c, q, _reason, _now in items]

    async def ack_through(self, context_id: str, seq: int, now: float | None = None) -> list[int]:
        """Cumulative ack (section 5): every PENDING/SENT event with ``seq' <= seq`` becomes ACKED.

        Returns the seqs this call acked, ascending (empty when all were already terminal). ACKED
        and ESCALATED events are untouched, so an ack never un-escalates and never moves backwards;
        acking a seq beyond the stream acks what exists and nothing more.
        """
        acked: list[int] = await self.submit_ack_through(context_id, seq, now)
        return acked

    def submit_ack_through(self, context_id: str, seq: int, now: float | None = None) -> asyncio.Future[list[int]]:
        """:meth:`ack_through` as a future (see :meth:`submit_append_events`)."""
        return self._submit_one("ack_through", self._ack_many, (context_id, seq, float(now_or_clock(now))))

    async def _ack_many(self, conn: AsyncConnection, items: list[Any]) -> list[Any]:
        """Merged cumulative acks: one UPDATE ... RETURNING for every context of the group (each
        through its highest acked seq). Several acks of one context are ordered by ``seq``, as if
        applied one after the other: each gets the seqs above the previous one's."""
        through: dict[str, int] = {}
        stamps: dict[str, float] = {}
        for context_id, seq, now in items:
            through[context_id] = max(through.get(context_id, seq), seq)
            stamps[context_id] = max(stamps.get(context_id, now), now)
        rows = await self._execute_batch(conn, ACK_THROUGH, [(c, q, stamps[c]) for c, q in through.items()])
        acked: dict[str, list[int]] = {}
        for c, q in rows:
            acked.setdefault(str(c), []).append(int(q))
        if len(items) == 1:  # the common case: everything acked is this ack's
            return [sorted(acked.get(items[0][0], []))]
        outcomes: list[Any] = [None] * len(items)
        below: dict[str, int] = {}
        for index in sorted(range(len(items)), key=lambda i: (items[i][1], i)):
            context_id, seq, _now = items[index]
            floor = below.get(context_id, 0)
            outcomes[index] = sorted(q for q in acked.get(context_id, []) if floor < q <= seq)
            below[context_id] = max(floor, seq)
        return outcomes

    async def _select_events(
        self, operation: str, *where: Any, limit: int | None = None
    ) -> list[EventRecord]:
        async def body(conn: AsyncConnection) -> list[EventRecord]:
            stmt = select(events).where(*where).order_by(events.c.seq)
            if limit is not None:
                stmt = stmt.limit(limit)
            return [event_from_row(r) for r in await conn.execute(stmt)]

        return await self._run(operation, body, write=False)

    async def unacked_after(
        self, context_id: str, seq: int, *, include_escalated: bool = False
    ) -> list[EventRecord]:
        """Events with seq > ``seq`` still in delivery (PENDING/SENT), ascending: what a resume
        redelivers (section 5). ``include_escalated`` adds ESCALATED ones (never ACKED)."""
        states = [*_LIVE_VALUES, DeliveryState.ESCALATED.value] if include_escalated else list(_LIVE_VALUES)
        return await self._select_events(
            "unacked_after",
            events.c.context_id == context_id,
            events.c.seq > seq,
            events.c.state.in_(states),
        )

    async def events_after(self, context_id: str, seq: int, limit: int = 100) -> list[EventRecord]:
        """Every event with seq > ``seq``, any state, ascending, at most ``limit`` (``GET /v1/events``)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._select_events(
            "events_after", events.c.context_id == context_id, events.c.seq > seq, limit=limit
        )

    async def live_events(self) -> list[EventRecord]:
        """Every PENDING/SENT event of every context, by context then seq: what a restarted node
        recovers into delivery (section 5; section 6, "nothing pending is lost")."""
        return await self._select_events("live_events", events.c.state.in_(_LIVE_VALUES))

    async def run_events(self, context_id: str, run_id: str) -> list[EventRecord]:
        """Every event of one run, ascending (recovering a run interrupted by a crash)."""
        return await self._select_events(
            "run_events", events.c.context_id == context_id, events.c.run_id == run_id
        )

    async def escalations(self, context_id: str) -> list[EventRecord]:
        """The context's ESCALATED events, ascending (``GET /v1/escalations``)."""
        return await self._select_events(
            "escalations",
            events.c.context_id == context_id,
            events.c.state == DeliveryState.ESCALATED.value,
        )

