"""Guaranteed event delivery, the asyncio shell: every event ends ACKED or ESCALATED (PROTOCOL section 5).

The decisions are :class:`~pipeproof.core.delivery.DeliveryCore`'s (src/pipeproof/core/delivery.py):
per context, :class:`DeliveryService` keeps a :class:`~pipeproof.impl.delivery_stream.Stream`
holding the core of that stream (the delivery machine of every unfinished event, audit id
``"<context_id>:<seq>"``, fired through :class:`~pipeproof.impl.audit.TracedMachine`), the READY
sessions of the context on this node, and the asyncio parts the core has none of: a lock, the
producers' outbox and its appender task, the clock task. This module feeds the core what
happened, with ``time.monotonic()``, and carries out the commands it returns, in order: it writes
frames through each session's sender (the choke point), awaits the store writes, and sleeps until
``core.next_deadline()``.

* :meth:`DeliveryService.publish` queues the event; the stream's appender commits the queue as
  one append (the store allocates ``seq`` atomically) *before* anything is sent, then hands the
  records to the core, which offers them to the READY sessions (fan-out);
* acks are cumulative, from any session of the context; the core clamps them to what was
  delivered, the store acks that prefix, then the core fires ``ack`` on what the store acked;
* the clock calls ``core.tick(now)`` at each deadline: an expired ack wait resends or escalates
  (``max_attempts``), a spent ``resume_window`` with no session escalates (``no_session``).

Store failures: a refused append drops its batch and what is queued behind it, and each run
hears of it (:meth:`DeliveryService.check_run`); a failed write after the append (``mark_sent``,
``mark_pending``, ``escalate``) reaches the batch's producers, and the events stay in delivery; a
failed ack write goes to its caller and the events keep their deadlines (resent, acked again);
any other StoreError propagates to the caller of the step (``session_ready``, the clock task).

Locking and performance. Sends, resends, escalations and session changes of a stream happen under
the stream's lock. Two hot paths keep their store commit out of it, so one stream's appends and
acks do not queue behind each other's commits: the appender hands a batch to the core only after
its commit, and an ack's commit is followed by ``core.ack_stored`` with no await in between.
Every locked path asks the core again after each of its own awaits (``transmit``,
``in_flight``), so an acked event is never sent again and the machines and the store never
disagree about an event. There is no task per publish or ack (store futures are shielded; the
rest of a cancelled caller's step is handed to a task only then), acks are coalesced into one
write per round, and the clock is woken only when a deadline earlier than the one it sleeps
until appears (``core.earliest``). Memory is bounded: per-socket send queues are bounded by the
sender; a send first waits (at most ``ack_timeout``) for room in the socket's queue, so a backlog
flows at the reader's pace, and a reader too slow even for that is closed ``slow_consumer`` (its events stay
in the store and are resent or escalated); and a producer waits when its context already has
``max_inflight_events`` unfinished events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import Any

from pipeproof.core.delivery import (
    Acked,
    AckThrough,
    CatchUp,
    Command,
    DeliveryCore,
    EscalateEvent,
    MarkPending,
    MarkSent,
    SendEvent,
    Timings,
    Transmit,
    ack_wait,
    restored_runner,
)
from pipeproof.errors import LeaseLost, StoreError
from pipeproof.model.delivery import delivery_machine
from pipeproof.model.spec import Runner
from pipeproof.protocol import TERMINAL_KINDS, DeliveryState

from .audit import AuditWriter, TracedMachine
from .delivery_metrics import DeliveryMetrics
from .delivery_stream import Outgoing, Stream, event_frame
from .handlers import Session
from .sender import SendFailed
from .settings import Settings
from .store import EventRecord, Store, encode_event_data

log = logging.getLogger("pipeproof.delivery")


class DeliveryService:
    """Delivery for every context with sessions or unfinished events on this node (section 5).

    ``core_class`` is the core each stream gets; a variant of the server (the seeded defects of
    tests/conformance) replaces it, and ``machine``, with a broken one.
    """

    core_class: type[DeliveryCore[EventRecord]] = DeliveryCore

    def __init__(
        self,
        settings: Settings,
        store: Store,
        audit: AuditWriter,
        metrics: DeliveryMetrics,
        *,
        rng: random.Random | None = None,
        holder: str | None = None,
    ) -> None:
        self.settings = settings
        # The node id whose run leases fence every append (section 6): an event is stored only
        # while this node holds its run (Store.submit_append_events). None: no fence (a bare
        # DeliveryService whose producers are not leased runs).
        self.holder = holder
        self.store = store
        self.audit = audit
        self.metrics = metrics
        self.machine = delivery_machine(settings.max_attempts, 1, 1)
        self.timings = Timings.of(settings)
        self._rng = rng or random.Random()
        self.streams: dict[str, Stream] = {}
        self.recovered = asyncio.Event()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()  # hand-offs of cancelled callers (_hand_off)

    def ack_wait(self, attempt: int) -> float:
        """Real seconds to wait for the ack of ``attempt``: exponential backoff with jitter."""
        return ack_wait(Timings.of(self.settings), attempt, self._rng.random())

    # -- streams -------------------------------------------------------------------------------

    def _stream(self, context_id: str, user: str) -> Stream:
        stream = self.streams.get(context_id)
        if stream is None:
            stream = Stream(context_id, user, self._core(context_id, user))
            self.streams[context_id] = stream
        return stream

    def _core(self, context_id: str, user: str) -> DeliveryCore[EventRecord]:
        machine, audit = self.machine, self.audit

        def traced(seq: int, runner: Runner) -> TracedMachine:
            # The declaration engine (the core's Runner): compiled guards and updates, ~50x cheaper
            # per transition than python-statemachine, refusing exactly what the declaration refuses.
            return TracedMachine(
                machine, "delivery", f"{context_id}:{seq}", audit, user=user, context_id=context_id, runner=runner
            )

        return self.core_class(machine, self.timings, self._rng.random, traced)

    @contextlib.contextmanager
    def _using(self, context_id: str, user: str) -> Iterator[Stream]:
        """The context's stream, kept registered while the caller awaits on it. (A plain context
        manager: an async one would cost publish, the hot path, an extra coroutine per event.)"""
        stream = self._stream(context_id, user)
        stream.users += 1
        try:
            yield stream
        finally:
            stream.users -= 1
            self._maybe_forget(stream)

    def _tracked(self, stream: Stream, count: int) -> None:
        """``count`` events were handed to the stream's core: count them, run its clock."""
        self.metrics.live.inc(count)
        stream.start_clock(self._fire_due, lambda: self._closed)
        stream.wake()

    def _released(self, stream: Stream, count: int) -> None:
        """The core let ``count`` events go (acked or escalated)."""
        self.metrics.live.dec(count)
        if len(stream.core) < self.settings.max_inflight_events:
            stream.room.set()

    def _maybe_forget(self, stream: Stream) -> None:
        # Memory stays proportional to what is live: an idle stream is dropped.
        if stream.idle() and self.streams.get(stream.context_id) is stream:
            del self.streams[stream.context_id]
            stream.changed.set()  # its clock, if any, sees nothing live and ends

    # -- recovery (section 6) ------------------------------------------------------------------

    async def recover(self) -> int:
        """Load every PENDING/SENT event from the store into delivery; returns how many (the core
        decides what each awaits, see DeliveryCore.restore)."""
        try:
            records = await self.store.live_events()
            users: dict[str, str] = {}
            now = time.monotonic()
            for record in sorted(records, key=lambda r: (r.context_id, r.seq)):
                if record.context_id not in users:
                    info = await self.store.find_context(record.context_id)
                    users[record.context_id] = info.user_id if info is not None else ""
                stream = self._stream(record.context_id, users[record.context_id])
                stream.core.restore((record,), now)
                self._tracked(stream, 1)
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
        all-or-nothing write (``Store.submit_append_events``), then hands it to the core and
        sends what the core offers, then takes the next batch. So a stream keeps up to a window
        of events in one group commit instead of one event per commit, and an event is still
        never sent before it is durable; a failed batch drops everything queued behind it (never
        sent, never stored: a run's events stay a prefix of what it emitted, with no gap), and
        the producer hears of it.
        """
        with self._using(context_id, user) as stream:
            self.check_run(context_id, run_id)
            while len(stream.core) + len(stream.outbox) + stream.appending >= self.settings.max_inflight_events:
                stream.room.clear()
                await stream.room.wait()
                self.check_run(context_id, run_id)
            item = Outgoing(run_id, kind, encode_event_data(data), user)
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

    async def _append_loop(self, stream: Stream) -> None:
        """The stream's appender: commit a batch, hand it to the core and send it, repeat."""
        batch: list[Outgoing] = []
        try:
            while stream.outbox:
                batch, stream.outbox = stream.outbox, []
                stream.appending = len(batch)
                async with stream.gate:
                    try:
                        records = await self.store.submit_append_events(
                            stream.context_id,
                            [(o.run_id, o.kind, o.payload) for o in batch],
                            time.time(),
                            sent=stream.core.append_sent(),
                            holder=self.holder,
                        )
                    except StoreError as exc:
                        self._refuse(stream, batch, exc)
                        batch = []
                        continue
                    finally:
                        stream.appending = 0
                    commands = self._track_batch(stream, records)
                try:
                    await self._deliver_batch(stream, batch, records, commands)
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

    def _track_batch(self, stream: Stream, records: list[EventRecord]) -> Sequence[Command]:
        """Hand a committed batch to the core; returns what it offers."""
        for record in records:
            self.metrics.appended_kind(record.kind).inc()
        commands = stream.core.appended(records, time.monotonic())
        self._tracked(stream, len(records))
        return commands

    async def _deliver_batch(
        self, stream: Stream, batch: list[Outgoing], records: list[EventRecord], commands: Sequence[Command]
    ) -> None:
        """Send what the core offers for a committed batch (seq order), then answer its durable
        producers."""
        if commands:
            async with stream.lock:
                await self._run(stream, commands)
        for item, record in zip(batch, records, strict=True):
            if item.done is not None and not item.done.done():
                item.done.set_result(record)

    @staticmethod
    def _tell(stream: Stream, items: list[Outgoing], exc: StoreError) -> None:
        """Each producer of ``items`` hears of ``exc``: a durable one at once, the others on their
        run's next publish (check_run)."""
        for item in items:
            if item.done is not None:
                if not item.done.done():
                    item.done.set_exception(exc)
            else:
                stream.refused.setdefault(item.run_id, exc)

    def _refuse(self, stream: Stream, batch: list[Outgoing], exc: StoreError) -> None:
        """A batch was not stored: it and everything queued behind it are dropped (sending the
        later ones would leave a gap in their runs), and each producer hears of it. When the
        store refused it because runs were taken over (LeaseLost), the producers of the other
        runs in it hear of a plain store failure: their leases are not lost."""
        dropped = batch + stream.outbox
        stream.outbox = []
        self.metrics.append_failures.inc(len(dropped))
        log.warning(
            "stream %s: %d events not stored (%s); their runs are told", stream.context_id, len(dropped), exc
        )
        if isinstance(exc, LeaseLost):
            others = StoreError(exc.operation, "refused with the events of a run taken over by another node")
            self._tell(stream, [o for o in dropped if o.run_id in exc.run_ids], exc)
            self._tell(stream, [o for o in dropped if o.run_id not in exc.run_ids], others)
        else:
            self._tell(stream, dropped, exc)
        stream.room.set()

    def _hand_off(self, stream: Stream, work: Coroutine[Any, Any, None], what: str) -> None:
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

    # -- carrying out the core's commands --------------------------------------------------------

    async def _run(self, stream: Stream, commands: Sequence[Command]) -> None:
        """Carry out ``commands`` in order, under the stream's lock; a StoreError stops them and
        propagates (what is left stays as the core has it: resent or escalated later)."""
        for command in commands:
            if isinstance(command, SendEvent):
                await self._send(stream, command.seq)
            elif isinstance(command, MarkSent):
                await self.store.mark_sent(stream.context_id, command.seq, command.attempt)
            elif isinstance(command, MarkPending):
                await self.store.mark_pending(stream.context_id, command.seq)
            elif isinstance(command, EscalateEvent):
                await self._escalate(stream, command)
            else:
                await self._catch_up(stream, command)

    async def _send(self, stream: Stream, seq: int) -> None:
        """Offer event ``seq`` to every session the core names; it fires send or send_failed."""
        core = stream.core
        plan = core.transmit(seq)
        if plan is None:
            return
        for session_id in plan.sessions:
            session = stream.sessions.get(session_id)
            if session is not None:
                await session.wait_room(self.settings.ack_timeout)
        # Waiting for room was the only suspension: from the core's answer below to the
        # transition nothing else runs (Session.send never suspends), so an ack recorded
        # meanwhile is seen here and an acked event is never written again.
        plan = core.transmit(seq)
        if plan is None:
            return
        written = await self._write(stream, plan)
        commands = core.sent(plan, written, time.monotonic())
        if written:
            (self.metrics.first_sends if plan.attempt == 1 else self.metrics.resends).inc()
        else:
            self.metrics.send_failures.inc()
        stream.wake()
        if commands:
            await self._run(stream, commands)

    async def _write(self, stream: Stream, plan: Transmit[EventRecord]) -> int:
        """Queue the event frame of ``plan`` on each of its sessions; returns how many took it."""
        frame = event_frame(plan.record, plan.attempt)
        written = 0
        for session_id in plan.sessions:
            session = stream.sessions.get(session_id)
            if session is None:
                continue
            try:
                await session.send(frame)
                written += 1
            except SendFailed as exc:
                # The session is closing (its close deregisters it); the others still count.
                log.info("event %s:%d not queued on %s: %s", stream.context_id, plan.seq, session_id, exc.why)
        return written

    async def _catch_up(self, stream: Stream, command: CatchUp) -> bool:
        """Write the attempt in flight of an event to a joining session (no transition); False
        when the session refused the frame (it is closing)."""
        session = stream.sessions.get(command.session_id)
        if session is None:
            return False
        try:
            await session.wait_room(self.settings.ack_timeout)
            plan = stream.core.in_flight(command.seq, command.session_id)
            if plan is not None:  # else acked while we waited for room: never written again
                await session.send(event_frame(plan.record, plan.attempt))
        except SendFailed:
            return False
        return True

    async def _escalate(self, stream: Stream, command: EscalateEvent) -> None:
        """Record an escalation the core made: the store, the metric and the log (section 5)."""
        self._released(stream, 1)
        stream.settling.add(command.seq)  # still live in the store until this write: not adoptable
        try:
            stored = await self.store.escalate(stream.context_id, command.seq, command.reason)
        finally:
            stream.settling.discard(command.seq)
            self._maybe_forget(stream)
        self.metrics.escalations.labels(reason=command.reason).inc()
        if stored.state is not DeliveryState.ESCALATED:
            log.warning(
                "event %s:%d escalated here but stored as %s", stream.context_id, command.seq, stored.state.value
            )
        log.warning("event %s:%d escalated: %s", stream.context_id, command.seq, command.reason)

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

    async def adopt(self, context_id: str, user: str) -> list[EventRecord]:
        """Track the context's unfinished events that the store holds and this node does not
        (stored by another node, or by this one before a restart) and offer them to the
        context's READY sessions here; returns them (section 5: a resume redelivers whichever
        node it lands on). Raises StoreError."""
        with self._using(context_id, user) as stream:
            adopted = await asyncio.shield(self._adopt(stream))
            if adopted and stream.sessions:
                async with stream.lock:
                    await self._run(stream, [SendEvent(r.seq) for r in adopted])
            return adopted

    async def _adopt(self, stream: Stream) -> list[EventRecord]:
        async with stream.gate:
            records = await self.store.unacked_after(stream.context_id, 0)
            fresh = [r for r in records if r.seq not in stream.settling]
            adopted = stream.core.restore(fresh, time.monotonic())
            if adopted:
                self._tracked(stream, len(adopted))
                log.info("stream %s: adopted %d stored events", stream.context_id, len(adopted))
            return adopted

    def holds_terminal(self, context_id: str, run_id: str) -> bool:
        """Whether the run's terminal event is still in delivery on this node (it reaches the
        context's sessions here)."""
        stream = self.streams.get(context_id)
        return stream is not None and any(
            e.record.run_id == run_id and e.record.kind in TERMINAL_KINDS for e in stream.core.live.values()
        )

    async def _register(self, stream: Stream, session: Session, resume_last_seq: int | None) -> None:
        # What other nodes stored for the context first, so that the resume acks it and the
        # session is offered it like this node's own events.
        await self._adopt(stream)
        if resume_last_seq is not None:
            await self._ack(stream, resume_last_seq, session.session_id, resume=True)
        async with stream.lock:
            if getattr(session, "closed", False):
                return
            stream.sessions[session.session_id] = session
            commands = stream.core.session_joined(session.session_id, time.monotonic())
            for command in commands:
                if session.session_id not in stream.sessions:
                    break  # the socket closed while we were writing to it
                if isinstance(command, CatchUp):
                    if not await self._catch_up(stream, command):
                        break
                else:
                    await self._run(stream, (command,))
            stream.wake()

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
        stream.core.session_left(session.session_id, time.monotonic())
        stream.wake()
        self._maybe_forget(stream)

    # -- acks ----------------------------------------------------------------------------------

    async def ack(self, session: Session, seq: int) -> list[int]:
        """A cumulative ack from any session of the context (section 5); returns the acked seqs
        (empty when an ack already in flight for this stream will cover them)."""
        stream = self.streams.get(session.context_id)
        if stream is None:
            return []
        return await self._ack(stream, seq, session.session_id)

    async def _ack(self, stream: Stream, seq: int, session_id: str, *, resume: bool = False) -> list[int]:
        """Record a cumulative ack: the store write outside the lock, the machines after it.

        The core clamps the ack to the delivered prefix and coalesces the acks of the stream
        (one ``ack_through`` per round, see DeliveryCore.ack). The commit is awaited without the
        lock, so the stream's appends and sends go on meanwhile. If the write fails, the
        StoreError goes to this caller and the events stay in delivery (resent, and acked
        again by the client).
        """
        write = stream.core.ack(seq, session_id, resume=resume)
        if write is None:
            return []
        return await self._ack_rounds(stream, write, None)

    async def _ack_rounds(
        self, stream: Stream, write: AckThrough | None, inflight: asyncio.Future[list[int]] | None
    ) -> list[int]:
        """Write acks until the core has none left to ask for.

        The store's future is the only suspension point, shielded: a caller cancelled there (its
        socket closing) hands the rounds to a task of its own, so an ack committed in the store
        is always fired on its machines. ``ack_stored`` follows the commit with no suspension in
        between (sends ask the core again after their own waits, see _send), so no lock is needed.
        """
        done: list[int] = []
        handed_off = False
        try:
            while write is not None:
                future = inflight or self.store.submit_ack_through(stream.context_id, write.through)
                inflight = None
                try:
                    acked = await asyncio.shield(future)
                except asyncio.CancelledError:
                    handed_off = True
                    self._hand_off(stream, self._ack_rest(stream, write, future), "ack")
                    raise
                except StoreError:
                    stream.core.ack_failed()
                    raise
                result = stream.core.ack_stored(write, acked, time.monotonic())
                self._count_acks(stream, result)
                done.extend(result.seqs)
                write = result.next
        finally:
            if not handed_off:
                if stream.core.acking:
                    stream.core.ack_failed()  # abandoned by a bug: the events keep their deadlines
                # Events the store did not ack have their deadlines back, maybe earlier than the
                # one the clock sleeps until.
                stream.wake()
        return done

    async def _ack_rest(
        self, stream: Stream, write: AckThrough, inflight: asyncio.Future[list[int]]
    ) -> None:
        await self._ack_rounds(stream, write, inflight)

    def _count_acks(self, stream: Stream, result: Acked) -> None:
        if not result.seqs:
            return
        self.metrics.acked.inc(len(result.seqs))
        for latency in result.latencies:
            self.metrics.ack_latency.observe(latency)
        self._released(stream, len(result.seqs))
        self._maybe_forget(stream)

    # -- the clock -----------------------------------------------------------------------------

    async def _fire_due(self, stream: Stream) -> None:
        """The stream's clock found a deadline due: the core fires it, under the lock."""
        async with stream.lock:
            await self._run(stream, stream.core.tick(time.monotonic()))

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


__all__ = ["DeliveryMetrics", "DeliveryService", "restored_runner"]
