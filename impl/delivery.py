"""Guaranteed event delivery: every event ends ACKED or ESCALATED (PROTOCOL section 5).

:class:`DeliveryService` owns, per context, a :class:`_Stream`: the READY sessions of that context
on this node, and one traced delivery machine per unfinished event (audit id
``"<context_id>:<seq>"``). The machine decides; the store records; the sockets carry:

* :meth:`DeliveryService.publish` appends the event to the durable stream (one transaction; the
  store allocates ``seq`` atomically) *before* anything is sent, then sends it if a session is live;
* a send fires ``send`` when the frame was queued on at least one READY session of the context
  (fan-out: every session gets it), else ``send_failed`` (escalating with ``send_failed`` when
  attempts run out), and records the attempt in the store;
* acks are cumulative, from any session of the context, and clamped to what was delivered (the
  model's ``ack`` needs ``delivered``); the store acks exactly that prefix;
* a per-stream clock fires the deadlines: ``tick`` then ``ack_timeout`` when the ack wait of the
  attempt expires (resend, or escalate with ``max_attempts``), and ``tick`` then
  ``no_session_timeout`` when a PENDING event has spent ``resume_window`` without a live session
  (escalate with ``no_session``).

Model time: the server's machine is ``delivery_machine(max_attempts, ack_timeout=1,
resume_window=1)``; one model tick stands for "the deadline at hand has passed", so each expiry is
logged as ``tick`` followed by the timeout. Real ack waits grow per attempt:
``min(ack_timeout * ack_backoff ** (attempt - 1), ack_timeout_max)``, times ``1 + U(0, ack_jitter)``.

Sends, resends, escalations and session changes of a stream happen under the stream's lock.
Two hot paths keep their store commit out of it, so one stream's appends and acks do not queue
behind each other's commits: the stream's appender tracks a batch of events only after its
commit (see :meth:`DeliveryService.publish`), and an ack's commit is
followed by firing ``ack`` on the machines with no await in between; every locked path checks
an event's machine again after each of its own awaits, so an acked event is never sent again
and the machines and the store never disagree about an event. Sends are in seq order (the oldest
sendable event goes first, as in model/system.py). A session that joins gets, in seq order, the
in-flight attempt of every SENT event (a late fan-out of that attempt: no new transition) and
every PENDING event (a send). Memory is bounded: per-socket send queues are bounded by the sender;
a send first waits (at most ``ack_timeout``) for room in the socket's queue, so a backlog flows
at the reader's pace, and a reader too slow even for that is closed 1013 (its events stay in the
store and are resent or escalated); and
a producer waits when its context already has ``max_inflight_events`` unfinished events.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import Counter, Gauge, Histogram

from pipeproof.errors import StoreError
from pipeproof.model.delivery import Delivery, delivery_machine
from pipeproof.model.expr import Value
from pipeproof.model.spec import Machine, Runner
from pipeproof.protocol.frames import EventFrame

from .audit import AuditWriter, TracedMachine
from .handlers import Session
from .metrics import Metrics
from .sender import SendFailed
from .settings import Settings
from .store import EscalationReason, EventRecord, EventState, Store, encode_event_data

log = logging.getLogger("pipeproof.delivery")

P, S, A, E = Delivery.PENDING, Delivery.SENT, Delivery.ACKED, Delivery.ESCALATED


class DeliveryMetrics:
    """Delivery and run counters on the app's own registry (``GET /metrics``)."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.appended = Counter("pipeproof_events_appended", "Events appended, by kind", ["kind"], registry=r)
        self.sends = Counter(
            "pipeproof_event_sends", "Delivery attempts (first sends and resends)", ["first"], registry=r
        )
        self.send_failures = Counter(
            "pipeproof_event_send_failures", "Sends no READY session could take", registry=r
        )
        self.acked = Counter("pipeproof_events_acked", "Events acked by a client", registry=r)
        self.escalations = Counter(
            "pipeproof_escalations", "Events escalated (section 5), by reason", ["reason"], registry=r
        )
        self.live = Gauge("pipeproof_events_live", "Events in PENDING or SENT on this node", registry=r)
        self.append_failures = Counter(
            "pipeproof_event_append_failures",
            "Events a failed append dropped before they were stored (their runs end with agent_failed)",
            registry=r,
        )
        self.ack_latency = Histogram(
            "pipeproof_ack_latency_seconds",
            "Event appended to acked",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.runs = Counter("pipeproof_runs", "Finished runs, by outcome", ["outcome"], registry=r)
        self.run_rejections = Counter(
            "pipeproof_run_rejections", "run.start refused, by code", ["code"], registry=r
        )
        self.runs_active = Gauge("pipeproof_runs_active", "Runs accepted and not finished", registry=r)
        for reason in ("max_attempts", "no_session", "send_failed"):
            self.escalations.labels(reason=reason)


def restored_runner(machine: Machine, state: enum.Enum, values: Mapping[str, Value]) -> Runner:
    """A declaration-engine Runner started at a stored configuration (recovery after a restart).

    ``values`` names every variable of ``machine``; a missing or unknown one is a bug here.
    """
    if set(values) != set(machine.var_names):
        raise ValueError(f"restoring {machine.name}: variables {sorted(values)} != {sorted(machine.var_names)}")
    return Runner(
        machine, engine="declaration", start=(state, tuple(values[n] for n in machine.var_names))
    )


@dataclass
class _Tracked:
    """One unfinished event: its record, its machine, and its real-time deadlines."""

    record: EventRecord
    machine: TracedMachine
    frame_attempt: int = 0  # the attempt number of the last frame written
    ack_deadline: float = 0.0  # SENT: when the ack wait of this attempt ends
    idle_spent: float = 0.0  # seconds spent PENDING with no live session (the resume_window budget)
    idle_from: float | None = None  # accruing since (PENDING and no session), else None
    appended_at: float = field(default_factory=time.monotonic)

    @property
    def seq(self) -> int:
        return self.record.seq

    def frame(self, attempt: int) -> EventFrame:
        r = self.record
        return EventFrame(
            seq=r.seq,
            event_id=r.event_id,
            run_id=r.run_id,
            event=r.kind,  # type: ignore[arg-type]
            data=dict(r.data),
            attempt=attempt,
        )


_NEVER: Final = float("inf")


@dataclass
class _Outgoing:
    """An event a producer queued: appended by the stream's appender, then sent."""

    run_id: str
    kind: str
    payload: str  # the data, encoded as the store keeps it
    user: str
    done: asyncio.Future[EventRecord] | None = None  # publish(durable=True) waits on it


@dataclass
class _Stream:
    """One context's stream on this node."""

    context_id: str
    user: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sessions: dict[str, Session] = field(default_factory=dict)
    live: dict[int, _Tracked] = field(default_factory=dict)  # insertion order is seq order
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # wakes the clock (see _wake)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    clock: asyncio.Task[None] | None = None
    users: int = 0  # publishes and session registrations in progress: the stream must not be dropped
    appending: int = 0  # events in the append being committed: they count against the window
    outbox: list[_Outgoing] = field(default_factory=list)  # queued, not yet handed to the store
    appender: asyncio.Task[None] | None = None  # commits the outbox batch by batch (publish)
    refused: dict[str, StoreError] = field(default_factory=dict)  # run_id -> why its events were dropped
    ack_wanted: int = 0  # the highest delivered seq a client has acked on this node
    ack_done: int = 0  # ... and the highest one whose ack_through has committed
    acking: bool = False  # an ack_through of this stream is in flight (see DeliveryService._ack)
    ack_pending: int = 0  # ... and the seq it acks through
    due: float = -_NEVER  # what the clock sleeps until; -inf while it is awake and will recompute




class DeliveryService:
    """Delivery for every context with sessions or unfinished events on this node (section 5)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        audit: AuditWriter,
        metrics: DeliveryMetrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.audit = audit
        self.metrics = metrics
        self.machine = delivery_machine(settings.max_attempts, 1, 1)
        self._rng = rng or random.Random()
        self.streams: dict[str, _Stream] = {}
        self.recovered = asyncio.Event()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()  # hand-offs of cancelled callers (_hand_off)
        # Labelled children resolved once: ``labels()`` costs a lock and a dict walk per call.
        self._appended_by_kind: dict[str, Any] = {}
        self._first_sends = metrics.sends.labels(first="true")
        self._resends = metrics.sends.labels(first="false")

    # -- waits ---------------------------------------------------------------------------------

    def ack_wait(self, attempt: int) -> float:
        """Real seconds to wait for the ack of ``attempt``: exponential backoff with jitter."""
        s = self.settings
        base = min(s.ack_timeout * s.ack_backoff ** max(0, attempt - 1), s.ack_timeout_max)
        return base * (1.0 + self._rng.uniform(0.0, s.ack_jitter))

    # -- streams -------------------------------------------------------------------------------

    def _stream(self, context_id: str, user: str) -> _Stream:
        stream = self.streams.get(context_id)
        if stream is None:
            stream = _Stream(context_id, user)
            self.streams[context_id] = stream
        return stream

    @contextlib.contextmanager
    def _using(self, context_id: str, user: str) -> Iterator[_Stream]:
        """The context's stream, kept registered while the caller awaits on it. (A plain context
        manager: an async one would cost publish, the hot path, an extra coroutine per event.)"""
        stream = self._stream(context_id, user)
        stream.users += 1
        try:
            yield stream
        finally:
            stream.users -= 1
            self._maybe_forget(stream)

    def _machine(self, record: EventRecord, user: str, runner: Runner | None = None) -> TracedMachine:
        return TracedMachine(
            self.machine,
            "delivery",
            f"{record.context_id}:{record.seq}",
            self.audit,
            user=user,
            context_id=record.context_id,
            # The declaration engine: compiled guards and updates, ~50x cheaper per transition than
            # python-statemachine, and refusing exactly what the declaration refuses.
            runner=runner if runner is not None else Runner(self.machine, engine="declaration"),
        )

    def _track(self, stream: _Stream, tracked: _Tracked, now: float) -> None:
        stream.live[tracked.seq] = tracked
        self.metrics.live.inc()
        if tracked.machine.state is P and not stream.sessions:
            tracked.idle_from = now
        self._ensure_clock(stream)
        self._wake(stream, self._deadline(stream, tracked))

    def _untrack(self, stream: _Stream, seq: int) -> None:
        if stream.live.pop(seq, None) is not None:
            self.metrics.live.dec()
        if len(stream.live) < self.settings.max_inflight_events:
            stream.room.set()
        self._maybe_forget(stream)

    def _maybe_forget(self, stream: _Stream) -> None:
        # Memory stays proportional to what is live: an idle stream is dropped.
        if (
            not stream.live
            and not stream.sessions
            and stream.users == 0
            and not stream.outbox
            and not stream.refused  # a run has yet to hear why its events were dropped
            and self.streams.get(stream.context_id) is stream
        ):
            del self.streams[stream.context_id]
            self._wake(stream)

    # -- recovery (section 6) ------------------------------------------------------------------

    async def recover(self) -> int:
        """Load every PENDING/SENT event from the store into delivery; returns how many.

        A SENT event went out before the restart: it waits for its ack (a resume acks it) and
        is otherwise resent or escalated. A PENDING one waits for a session for ``resume_window``.
        """
        try:
            records = await self.store.live_events()
            users: dict[str, str] = {}
            now = time.monotonic()
            for record in sorted(records, key=lambda r: (r.context_id, r.seq)):
                if record.context_id not in users:
                    info = await self.store.find_context(record.context_id)
                    users[record.context_id] = info.user_id if info is not None else ""
                stream = self._stream(record.context_id, users[record.context_id])
                state = S if record.state is EventState.SENT else P
                values: dict[str, Value] = {
                    "attempt": record.attempt,
                    "waited": 0,
                    "idle": 0,
                    "age": 0,
                    "delivered": record.attempt > 0,
                }
                runner = restored_runner(self.machine, state, values)
                tracked = _Tracked(record, self._machine(record, stream.user, runner), record.attempt)
                if state is S:
                    tracked.ack_deadline = now + self.ack_wait(record.attempt)
                self._track(stream, tracked, now)
            if records:
                log.info("recovered %d unfinished events in %d contexts", len(records), len(users))
            return len(records)
        finally:
            self.recovered.set()

    # -- publish -------------------------------------------------------------------------------

    async def publish(
        self,
        context_id: str,
        user: str,
        run_id: str,
        kind: str,
        data: Mapping[str, Any],
        *,
        durable: bool = False,
    ) -> EventRecord | None:
        """Queue one event for the context's durable stream; it is sent once it is committed.

        Waits while the context has ``max_inflight_events`` events queued or unfinished
        (back-pressure on the producer instead of memory growth). With ``durable`` it also waits
        until this event is committed and sent, and returns it, or raises the StoreError that
        refused it; use it for a run's terminal event. Otherwise it returns once the event is
        queued, and a StoreError that refused the run's events is raised by its next publish
        (see :meth:`check_run`). Unserialisable data raises TypeError/ValueError at once.

        Each stream has one appender task, which commits what producers queued as one
        all-or-nothing write (``Store.submit_append_events``), then tracks and sends it, then
        takes the next batch. So a stream keeps up to a window of events in one group commit
        instead of one event per commit, and an event is still never sent before it is durable;
        a failed batch drops everything queued behind it (never sent, never stored: a run's
        events stay a prefix of what it emitted, with no gap), and the producer hears of it.
        """
        with self._using(context_id, user) as stream:
            self.check_run(context_id, run_id)
            while len(stream.live) + len(stream.outbox) + stream.appending >= self.settings.max_inflight_events:
                stream.room.clear()
                await stream.room.wait()
                self.check_run(context_id, run_id)
            item = _Outgoing(run_id, kind, encode_event_data(data), user)
            if durable:
                item.done = asyncio.get_running_loop().create_future()
            stream.outbox.append(item)
            if stream.appender is None or stream.appender.done():
                stream.users += 1  # released by the appender when it ends
                stream.appender = asyncio.get_running_loop().create_task(
                    self._append_loop(stream), name=f"delivery-append-{context_id}"
                )
                stream.appender.add_done_callback(self._task_done)
            if item.done is None:
                return None
            # Shielded: a cancelled producer does not cancel the append; the appender goes on.
            return await asyncio.shield(item.done)

    def check_run(self, context_id: str, run_id: str) -> None:
        """Raise (once) the StoreError that refused queued events of ``run_id``, if any: a
        producer calls this before firing its next step, so the run ends with agent_failed
        right after its last stored event."""
        stream = self.streams.get(context_id)
        if stream is not None and run_id in stream.refused:
            exc = stream.refused.pop(run_id)
            self._maybe_forget(stream)
            raise exc

    async def _append_loop(self, stream: _Stream) -> None:
        """The stream's appender: commit a batch, track and send it, repeat (see publish)."""
        batch: list[_Outgoing] = []
        try:
            while stream.outbox:
                batch, stream.outbox = stream.outbox, []
                stream.appending = len(batch)
                sending = bool(stream.sessions)
                try:
                    records = await self.store.submit_append_events(
                        stream.context_id, [(o.run_id, o.kind, o.payload) for o in batch], time.time(), sent=sending
                    )
                except StoreError as exc:
                    self._refuse(stream, batch, exc)
                    batch = []
                    continue
                finally:
                    stream.appending = 0
                try:
                    await self._deliver_batch(stream, batch, records, sending)
                except StoreError as exc:
                    # Stored and tracked, but a write after the send (mark_sent, mark_pending,
                    # escalate) failed: the events stay in delivery, nothing queued behind them
                    # is dropped, and their runs end as on any store failure.
                    log.warning("stream %s: store failed after an append: %s", stream.context_id, exc)
                    self._tell(stream, batch, exc)
                batch = []
        except BaseException as exc:
            # A bug, or cancellation at shutdown: no producer may wait forever on these events.
            for item in batch + stream.outbox:
                if item.done is not None and not item.done.done():
                    if isinstance(exc, Exception):
                        item.done.set_exception(exc)
                    else:
                        item.done.cancel()
            raise
        finally:
            stream.users -= 1
            self._maybe_forget(stream)

    async def _deliver_batch(
        self, stream: _Stream, batch: list[_Outgoing], records: list[EventRecord], sending: bool
    ) -> None:
        """Track a committed batch, send it in seq order, then answer its durable producers."""
        now = time.monotonic()
        fresh: list[_Tracked] = []
        for item, record in zip(batch, records, strict=True):
            self._appended(record.kind).inc()
            tracked = _Tracked(record, self._machine(record, item.user))
            self._track(stream, tracked, now)
            fresh.append(tracked)
        if stream.sessions or sending:
            async with stream.lock:
                for tracked in fresh:
                    if stream.live.get(tracked.seq) is tracked:
                        await self._send(stream, tracked)
        for item, record in zip(batch, records, strict=True):
            if item.done is not None and not item.done.done():
                item.done.set_result(record)

    @staticmethod
    def _tell(stream: _Stream, items: list[_Outgoing], exc: StoreError) -> None:
        """Each producer of ``items`` hears of ``exc``: a durable one at once, the others on their
        run's next publish (check_run)."""
        for item in items:
            if item.done is not None:
                if not item.done.done():
                    item.done.set_exception(exc)
            else:
                stream.refused.setdefault(item.run_id, exc)

    def _refuse(self, stream: _Stream, batch: list[_Outgoing], exc: StoreError) -> None:
        """A batch was not stored: it and everything queued behind it are dropped (sending the
        later ones would leave a gap in their runs), and each producer hears of it."""
        dropped = batch + stream.outbox
        stream.outbox = []
        self.metrics.append_failures.inc(len(dropped))
        log.warning(
            "stream %s: %d events not stored (%s); their runs are told", stream.context_id, len(dropped), exc
        )
        self._tell(stream, dropped, exc)
        stream.room.set()

    def _appended(self, kind: str) -> Any:
        child = self._appended_by_kind.get(kind)
        if child is None:
            child = self._appended_by_kind[kind] = self.metrics.appended.labels(kind=kind)
        return child

    def _hand_off(self, stream: _Stream, work: Coroutine[Any, Any, None], what: str) -> None:
        """Run ``work`` (the rest of a cancelled caller's delivery step) in a task of its own,
        keeping the stream registered until it is done."""
        stream.users += 1

        async def run() -> None:
            try:
                await work
            finally:
                stream.users -= 1
                self._maybe_forget(stream)

        task = asyncio.get_running_loop().create_task(run(), name=f"delivery-{what}-{stream.context_id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Hand-offs and appenders have nobody left to raise to (an appender has already
            # failed its waiting producers): the events stay in the store as they are, to be
            # resent or escalated, and the failure is logged with its traceback.
            log.error("delivery task %s failed", task.get_name(), exc_info=task.exception())

    async def _send(self, stream: _Stream, tracked: _Tracked) -> None:
        """Send a PENDING event to every session (under the lock); fires send or send_failed.

        The store is told after the machine: ``mark_sent`` unless the append already stored this
        attempt as SENT, and ``mark_pending`` when it did but no session took the frame (both
        sides then say PENDING with this attempt counted, as ``send_failed`` counts it).
        """
        m = tracked.machine
        if not m.can("send"):
            return
        sessions = list(stream.sessions.values())
        for session in sessions:
            await session.wait_room(self.settings.ack_timeout)
        # Waiting for room was the only suspension: from here to the transition nothing else
        # runs (Session.send never suspends), so an ack recorded meanwhile is seen here and an
        # acked event is never written again.
        if not m.can("send"):
            return
        attempt = int(m.values["attempt"]) + 1
        stored = tracked.record.state is EventState.SENT and tracked.record.attempt >= attempt
        frame = tracked.frame(attempt)
        written = 0
        for session in sessions:
            try:
                await session.send(frame)
                written += 1
            except SendFailed as exc:
                # The session is closing (its close deregisters it); the others still count.
                log.info(
                    "event %s:%d not queued on %s: %s",
                    stream.context_id,
                    tracked.seq,
                    session.session_id,
                    exc.why,
                )
        now = time.monotonic()
        if written:
            m.fire("send", {"attempt": attempt, "sessions": written})
            tracked.frame_attempt = attempt
            tracked.idle_from = None
            tracked.ack_deadline = now + self.ack_wait(attempt)
            (self._first_sends if attempt == 1 else self._resends).inc()
            self._wake(stream, tracked.ack_deadline)
            if not stored:
                await self.store.mark_sent(stream.context_id, tracked.seq, attempt)
            return
        self.metrics.send_failures.inc()
        transition = m.fire("send_failed", {"attempt": attempt})
        if transition.target is E:
            await self._escalate(stream, tracked, "send_failed")
        elif stored:
            tracked.record = await self.store.mark_pending(stream.context_id, tracked.seq)
        if transition.target is P and not stream.sessions and tracked.idle_from is None:
            tracked.idle_from = now
            self._wake(stream, self._deadline(stream, tracked))

    async def _escalate(self, stream: _Stream, tracked: _Tracked, reason: EscalationReason) -> None:
        stored = await self.store.escalate(stream.context_id, tracked.seq, reason)
        self.metrics.escalations.labels(reason=reason).inc()
        if stored.state is not EventState.ESCALATED:
            log.warning(
                "event %s:%d escalated here but stored as %s",
                stream.context_id,
                tracked.seq,
                stored.state.value,
            )
        log.warning("event %s:%d escalated: %s", stream.context_id, tracked.seq, reason)
        self._untrack(stream, tracked.seq)

    # -- sessions ------------------------------------------------------------------------------

    async def session_ready(self, session: Session, resume_last_seq: int | None) -> None:
        """A socket of the context is READY and its connection_ack is queued (sections 1, 5).

        Resume acks through ``last_seq`` (clamped to what was delivered); then the session gets
        every unfinished event of the stream, in seq order.
        """
        await self.recovered.wait()
        with self._using(session.context_id, session.user) as stream:
            # Shielded: a socket closing under us must not cut a store write from its transitions.
            await asyncio.shield(self._register(stream, session, resume_last_seq))

    async def _register(self, stream: _Stream, session: Session, resume_last_seq: int | None) -> None:
        if resume_last_seq is not None:
            await self._ack(stream, resume_last_seq, {"resume": True, "session_id": session.session_id})
        async with stream.lock:
            if getattr(session, "closed", False):
                return
            if not stream.sessions:
                now = time.monotonic()
                for tracked in stream.live.values():
                    if tracked.idle_from is not None:
                        tracked.idle_spent += now - tracked.idle_from
                        tracked.idle_from = None
            stream.sessions[session.session_id] = session
            for tracked in list(stream.live.values()):
                if session.session_id not in stream.sessions:
                    break  # the socket closed while we were writing to it
                if tracked.machine.state is S and tracked.frame_attempt > 0:
                    try:
                        await session.wait_room(self.settings.ack_timeout)
                        if tracked.machine.state is not S:
                            continue  # acked while we waited for room: never written again
                        await session.send(tracked.frame(tracked.frame_attempt))
                    except SendFailed:
                        break
                else:
                    await self._send(stream, tracked)
            stream.changed.set()

    def session_closed(self, session: Session) -> None:
        """A socket left: if it was the context's last one, PENDING events start spending their
        no-session budget (``resume_window``). Idempotent."""
        try:
            context_id = session.context_id
        except RuntimeError:
            return  # never became READY
        stream = self.streams.get(context_id)
        if stream is None or stream.sessions.pop(session.session_id, None) is None:
            return
        if not stream.sessions:
            now = time.monotonic()
            for tracked in stream.live.values():
                if tracked.machine.state is P and tracked.idle_from is None:
                    tracked.idle_from = now
        self._wake(stream)
        self._maybe_forget(stream)

    # -- acks ----------------------------------------------------------------------------------

    async def ack(self, session: Session, seq: int) -> list[int]:
        """A cumulative ack from any session of the context (section 5); returns the acked seqs
        (empty when an ack already in flight for this stream will cover them)."""
        stream = self.streams.get(session.context_id)
        if stream is None:
            return []
        return await self._ack(stream, seq, {"session_id": session.session_id})

    async def _ack(self, stream: _Stream, seq: int, detail: Mapping[str, Any]) -> list[int]:
        """Record a cumulative ack: the store write outside the lock, the machines under it.

        The model acks only delivered events; an ack naming more than the client can have
        received is honoured up to the delivered prefix, and the rest stays in delivery. Acks of
        one stream are coalesced: while one ``ack_through`` is in flight, later acks only raise
        ``ack_wanted`` and the write in flight loops until it has covered it (acks are
        cumulative, so one write per group commit does for any number of ack frames). The
        commit is awaited without the lock, so the stream's appends and sends go on meanwhile;
        the clock leaves events at or below ``ack_wanted`` alone (their ack is being recorded).
        If the write fails, ``ack_wanted`` falls back to what is stored, the StoreError goes to
        this caller, and the events stay in delivery (resent, and acked again by the client).
        """
        through = 0
        for s, tracked in stream.live.items():
            if s > seq or not tracked.machine.values["delivered"]:
                break
            through = s
        if through <= stream.ack_wanted:
            return []
        stream.ack_wanted = through
        if stream.acking:
            return []
        stream.acking = True
        return await self._ack_rounds(stream, seq, through, detail, None)

    async def _ack_rounds(
        self,
        stream: _Stream,
        seq: int,
        through: int,
        detail: Mapping[str, Any],
        inflight: asyncio.Future[list[int]] | None,
    ) -> list[int]:
        """Write acks until ``ack_wanted`` is stored (``stream.acking`` is set by the caller).

        The store's future is the only suspension point, shielded: a caller cancelled there (its
        socket closing) hands the rounds to a task of its own, so an ack committed in the store
        is always fired on its machines. The machines are fired with no suspension in between
        (sends check the machine after their own waits, see _send), so no lock is needed.
        """
        done: list[int] = []
        handed_off = False
        try:
            while inflight is not None or stream.ack_done < stream.ack_wanted:
                target = stream.ack_wanted if inflight is None else stream.ack_pending
                future = inflight or self.store.submit_ack_through(stream.context_id, target)
                inflight = None
                stream.ack_pending = target
                try:
                    acked = await asyncio.shield(future)
                except asyncio.CancelledError:
                    handed_off = True
                    self._hand_off(stream, self._ack_rest(stream, seq, through, detail, future), "ack")
                    raise
                except StoreError:
                    stream.ack_wanted = stream.ack_done
                    raise
                stream.ack_done = max(stream.ack_done, target)
                # Later rounds record acks that other frames asked for: name their target.
                self._acked(stream, acked, {**detail, "through": seq if target == through else target})
                done.extend(acked)
        finally:
            if not handed_off:
                stream.acking = False
                # The clock ignored events being acked; one the store did not ack (no longer live
                # there) has its deadline back, maybe earlier than what the clock sleeps until.
                first = next(iter(stream.live), None)
                if first is not None and first <= stream.ack_wanted:
                    self._wake(stream)
        return done

    async def _ack_rest(
        self, stream: _Stream, seq: int, through: int, detail: Mapping[str, Any], inflight: asyncio.Future[list[int]]
    ) -> None:
        await self._ack_rounds(stream, seq, through, detail, inflight)

    def _acked(self, stream: _Stream, acked: list[int], detail: Mapping[str, Any]) -> None:
        """Fire ``ack`` on the machines of events the store just acked (no await: atomic)."""
        now = time.monotonic()
        for s in acked:
            done = stream.live.get(s)
            if done is None or done.machine.state not in (P, S):
                continue
            done.machine.fire("ack", detail)
            self.metrics.acked.inc()
            self.metrics.ack_latency.observe(now - done.appended_at)
            self._untrack(stream, s)

    # -- the clock -----------------------------------------------------------------------------

    def _ensure_clock(self, stream: _Stream) -> None:
        if stream.clock is None or stream.clock.done():
            stream.due = -_NEVER
            stream.clock = asyncio.get_running_loop().create_task(
                self._run_clock(stream), name=f"delivery-clock-{stream.context_id}"
            )

    @staticmethod
    def _wake(stream: _Stream, deadline: float | None = None) -> None:
        """Wake the stream's clock if ``deadline`` comes before what it sleeps until (or always,
        with no deadline). Most changes only add later deadlines (a send's ack wait) or remove
        some (an ack): waking the clock for those would cost a wake-up and a scan per event."""
        if deadline is None or deadline < stream.due:
            stream.changed.set()

    def _deadline(self, stream: _Stream, tracked: _Tracked) -> float:
        if stream.acking and tracked.seq <= stream.ack_wanted:
            return _NEVER  # a client acked it and the ack is being recorded (see _ack)
        state = tracked.machine.state
        if state is S:
            return tracked.ack_deadline
        if state is P and tracked.idle_from is not None:
            return tracked.idle_from + max(0.0, self.settings.resume_window - tracked.idle_spent)
        return _NEVER

    async def _run_clock(self, stream: _Stream) -> None:
        """Fire every due deadline of the stream; exits when the stream has nothing unfinished."""
        while stream.live and not self._closed:
            stream.changed.clear()
            due = min((self._deadline(stream, t) for t in stream.live.values()), default=_NEVER)
            wait = due - time.monotonic()
            if wait > 0:
                stream.due = due
                try:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(None if due == _NEVER else wait):
                            await stream.changed.wait()
                finally:
                    stream.due = -_NEVER
                continue
            await asyncio.shield(self._fire_due_locked(stream))

    async def _fire_due_locked(self, stream: _Stream) -> None:
        async with stream.lock:
            await self._fire_due(stream, time.monotonic())

    async def _fire_due(self, stream: _Stream, now: float) -> None:
        has_session = bool(stream.sessions)
        resend = False
        for tracked in list(stream.live.values()):
            if self._deadline(stream, tracked) > now:
                continue
            m = tracked.machine
            if m.state is S:
                m.fire("tick", {"deadline": "ack_timeout"}, has_session=has_session)
                transition = m.fire("ack_timeout", {"attempt": m.values["attempt"]}, has_session=has_session)
                if transition.target is E:
                    await self._escalate(stream, tracked, "max_attempts")
                    continue
                await self.store.mark_pending(stream.context_id, tracked.seq)
                if has_session:
                    resend = True
                else:
                    tracked.idle_from = now
            elif m.state is P and not has_session:
                m.fire("tick", {"deadline": "resume_window"}, has_session=False)
                m.fire(
                    "no_session_timeout",
                    {"idle_s": round(tracked.idle_spent + now - (tracked.idle_from or now), 3)},
                    has_session=False,
                )
                await self._escalate(stream, tracked, "no_session")
        if resend:
            for tracked in list(stream.live.values()):
                if tracked.machine.state is P:
                    await self._send(stream, tracked)

    # -- shutdown ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the clocks. Unfinished events stay in the store as they are, for the next start."""
        # Appenders and hand-offs first, while the store is still open: queued events get
        # stored (and sent if a socket is still there), committed acks get fired.
        busy = {s.appender for s in self.streams.values() if s.appender is not None and not s.appender.done()}
        busy |= self._tasks
        if busy:
            _, left = await asyncio.wait(busy, timeout=self.settings.ack_timeout)
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
        unstored = sum(len(s.outbox) for s in self.streams.values())
        if unstored:
            log.error("%d queued events were not stored before shutdown", unstored)
        self._closed = True
        clocks = [s.clock for s in self.streams.values() if s.clock is not None]
        for stream in self.streams.values():
            stream.changed.set()
        for task in clocks:
            task.cancel()
        await asyncio.gather(*clocks, return_exceptions=True)


__all__ = ["DeliveryMetrics", "DeliveryService"]
