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
from .cluster import ClusterLink, Notice
from .delivery_metrics import DeliveryMetrics
from .delivery_stream import Outgoing, Stream, event_frame
from .handlers import Session
from .sender import SendFailed
from .settings import Settings
from .store import EventRecord, Store, encode_event_data

log = logging.getLogger("pipeproof.delivery")

RELAY_PAGE = 500
"""Events a relay reads per store round trip when it catches up on what is new."""
_FANNED_OUT = frozenset({DeliveryState.SENT, DeliveryState.ACKED})
"""The states of an event whose first send a relay writes to its sockets (acked meanwhile or not)."""


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
        cluster: ClusterLink | None = None,
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
        # Several nodes (section 5, "Several nodes"): None on one node, where every stream is this
        # node's to decide. With a cluster, the contexts whose delivery this node owns in the store
        # (sticky: kept until this node dies or leaves, so other nodes' notices find it).
        self.cluster = cluster
        self.owned: set[str] = set()
        self._scan = asyncio.Event()
        if cluster is not None:
            cluster.attach(self.on_notice, self.resync)

    def ack_wait(self, attempt: int) -> float:
        """Real seconds to wait for the ack of ``attempt``: exponential backoff with jitter."""
        return ack_wait(Timings.of(self.settings), attempt, self._rng.random())

    # -- streams -------------------------------------------------------------------------------

    def _stream(self, context_id: str, user: str) -> Stream:
        stream = self.streams.get(context_id)
        if stream is None:
            stream = Stream(context_id, user, self._core(context_id, user))
            if self.cluster is not None:
                stream.role = "owner" if context_id in self.owned else None
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
        decides what each awaits, see DeliveryCore.restore).

        With several nodes, only the contexts no alive node owns (among them what this node id's
        previous process owned) are taken, as every poll takes them (:meth:`take_orphans`)."""
        if self.cluster is not None:
            try:
                await self.cluster.joined.wait()  # the join lets go of this node id's old claims first
                return await self.take_orphans()
            finally:
                self.recovered.set()
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
                        # Several nodes: only the context's owner tracks what is appended; any
                        # other node stores it PENDING and tells the owner, which adopts it.
                        owner = stream.role == "owner" or (
                            stream.role is None and await self._claim(stream, adopt=False)
                        )
                        records = await self.store.submit_append_events(
                            stream.context_id,
                            [(o.run_id, o.kind, o.payload) for o in batch],
                            time.time(),
                            sent=owner and stream.core.append_sent(),
                            holder=self.holder,
                        )
                    except StoreError as exc:
                        self._refuse(stream, batch, exc)
                        batch = []
                        continue
                    finally:
                        stream.appending = 0
                    if self.cluster is not None:
                        self.cluster.tell("events", stream.context_id)
                    if not owner:
                        for record in records:
                            self.metrics.appended_kind(record.kind).inc()
                        for item, record in zip(batch, records, strict=True):
                            if item.done is not None and not item.done.done():
                                item.done.set_result(record)
                        batch = []
                        continue
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
                if self.cluster is not None:
                    # The relays write what the store holds SENT: tell them it changed.
                    self.cluster.tell("events", stream.context_id)
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
            if session_id in stream.remote:
                # Another node's sockets: it writes this attempt once the store says SENT (the
                # MarkSent that follows, or the append that stored it SENT), and its client's ack
                # comes back through the store. A frame that never reaches it is resent or
                # escalated like any unacked one.
                written += 1
                continue
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
        if command.session_id in stream.remote:
            return True  # that node's relay catches its own sockets up (_relay_sync)
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
        stamp = time.time()
        try:
            stored = await self.store.escalate(stream.context_id, command.seq, command.reason, stamp)
        finally:
            stream.settling.discard(command.seq)
            self._maybe_forget(stream)
        if stored.state is not DeliveryState.ESCALATED or stored.updated_at != stamp:
            # A client acked it through another node in the meantime, or another node escalated it
            # first (it took the context over while this one stalled): the store's word is final,
            # and only the write that made the escalation counts it (once in the cluster).
            log.warning(
                "event %s:%d escalated here but already stored as %s", stream.context_id, command.seq,
                stored.state.value,
            )
            return
        self.metrics.escalations.labels(reason=command.reason).inc()
        log.warning("event %s:%d escalated: %s", stream.context_id, command.seq, command.reason)

    # -- sessions ------------------------------------------------------------------------------

    async def session_ready(self, session: Session, resume_last_seq: int | None) -> None:
        """A socket of the context is READY and its connection_ack is queued (sections 1, 5).

        Resume acks through ``last_seq`` (clamped to what was delivered); then the session gets
        every unfinished event of the stream, in seq order. With several nodes the socket is
        recorded READY in the store first (the owner relays through this node from then on),
        and on a node that is not the owner it is a relay's socket (:meth:`_relay_register`).
        """
        await self.recovered.wait()
        with self._using(session.context_id, session.user) as stream:
            # Shielded: a socket closing under us must not cut a store write from its transitions.
            await asyncio.shield(self._join(stream, session, resume_last_seq))

    async def _join(self, stream: Stream, session: Session, resume_last_seq: int | None) -> None:
        if self.cluster is None:
            await self._register(stream, session, resume_last_seq)
            return
        await self.cluster.session_ready(session.session_id, stream.context_id)
        if stream.role == "owner" or await self._claim(stream):
            await self._register(stream, session, resume_last_seq)
            await self._sync_remote(stream)
        else:
            await self._relay_register(stream, session, resume_last_seq)

    async def adopt(self, context_id: str, user: str) -> list[EventRecord]:
        """Track the context's unfinished events that the store holds and this node does not
        (stored by another node, or by this one before a restart) and offer them to the
        context's READY sessions here; returns them (section 5: a resume redelivers whichever
        node it lands on). Raises StoreError."""
        with self._using(context_id, user) as stream:
            if self.cluster is not None and stream.role != "owner" and not await self._claim(stream):
                await self._relay_sync(stream)
                return []
            adopted = await asyncio.shield(self._adopt(stream))
            if adopted and stream.core.sessions:
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
        if stream is not None and stream.role == "relay":
            # Another node owns the stream: the terminal event reaches this node's sockets through
            # the relay while the store holds it in delivery (as of the last relay read).
            return run_id in stream.relay_terminals
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
        stream.relayed.pop(session.session_id, None)
        stream.relay_base.pop(session.session_id, None)
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
        if stream.role == "relay":
            return await self._relay_ack(stream, seq)
        acked = await self._ack(stream, seq, session.session_id)
        if self.cluster is not None and any(s <= seq for s in stream.core.live):
            # Some of what this ack covers was acked through another node first (the store did
            # not ack it again): those machines hear of it from the store.
            await self._sync_acks(stream)
        return acked

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
        """The stream's clock found a deadline due: the core fires it, under the lock.

        With several nodes the store is read first: an event acked through another node is
        acked, not resent, and no event is escalated ``no_session`` while a node holds a READY
        socket of its context. If the store cannot say, nothing fires until it can (a poll
        interval later): a timeout decided on stale knowledge could break either rule."""
        if self.cluster is not None:
            try:
                await self._sync_acks(stream)
                await self._sync_remote(stream)
            except StoreError as exc:
                self.metrics.store_failures.inc()
                log.warning("stream %s: deadline postponed, the store could not be read: %s", stream.context_id, exc)
                await asyncio.sleep(self.settings.cluster_poll_interval)
                return
            if stream.role != "owner":
                return
        async with stream.lock:
            await self._run(stream, stream.core.tick(time.monotonic()))

    # -- several nodes (section 5, "Several nodes") -----------------------------------------------

    def _node_session(self, node_id: str) -> str:
        """The id under which another node's READY sockets are one session of the owner's core."""
        return f"node:{node_id}"

    async def _claim(self, stream: Stream, *, adopt: bool = True) -> bool:
        """Whether this node owns the context's delivery now, taking it if it is free or its owner
        is dead (one compare-and-set in the store). A node that becomes the owner adopts what the
        store holds in delivery (unless ``adopt`` is False: the appender, which holds the gate,
        has nothing tracked and lets the next poll adopt); one that finds another owner is a relay."""
        assert self.cluster is not None
        owner = await self.store.claim_delivery(stream.context_id, self.cluster.node_id, time.time())
        if owner == self.cluster.node_id:
            self.owned.add(stream.context_id)
            if stream.role != "owner":
                stream.role = "owner"
                if adopt:
                    await self._become_owner(stream)
            return True
        if stream.role == "owner":
            self._demote(stream, owner)
        stream.role = "relay"
        return False

    async def _become_owner(self, stream: Stream) -> None:
        """This node now decides for the stream: what the store holds in delivery is adopted, and
        this node's sockets (a relay's until now) and the other nodes' join the core."""
        await self._adopt(stream)
        async with stream.lock:
            now = time.monotonic()
            for session_id in list(stream.sessions):
                commands = [c for c in stream.core.session_joined(session_id, now) if not isinstance(c, CatchUp)]
                await self._run(stream, commands)
            stream.wake()
        await self._sync_remote(stream)
        log.info("stream %s: this node owns its delivery now", stream.context_id)

    def _demote(self, stream: Stream, owner: str) -> None:
        """Another node owns the stream now (this one was taken for dead): stop deciding. What
        the core wrote to the sockets here is remembered as relayed, so nothing is written twice."""
        for seq, entry in stream.core.live.items():
            if entry.frame_attempt:
                for session_id in stream.sessions:
                    stream.relayed.setdefault(session_id, {})[seq] = entry.frame_attempt
                stream.relay_top = max(stream.relay_top, seq)
        self.metrics.live.dec(len(stream.core.live))
        stream.core.live.clear()
        stream.core.sessions.clear()
        stream.remote.clear()
        self.owned.discard(stream.context_id)
        stream.changed.set()  # the clock sees nothing live and ends
        log.warning("stream %s: node %s owns its delivery now; this node relays", stream.context_id, owner)

    async def _relay_register(self, stream: Stream, session: Session, resume_last_seq: int | None) -> None:
        """A READY socket on a node that does not own the context: the resume ack is stored
        (clamped to what was delivered), then the socket gets every attempt the store holds SENT."""
        if resume_last_seq is not None:
            await self._relay_ack(stream, resume_last_seq, resume=True)
        async with stream.lock:
            if getattr(session, "closed", False):
                return
            stream.sessions[session.session_id] = session
            # What was stored before it became READY reaches it only while in flight (as on one
            # node: a joining session catches up on attempts awaiting their ack, never on acked
            # ones); what came after is new to it even if it took the store a while to hear of it.
            base = session.ready_seq
            stream.relay_base[session.session_id] = base
            if len(stream.sessions) == 1:
                stream.relay_seen = max(stream.relay_seen, base)
            if stream.role == "owner":
                # Became the owner meanwhile: the socket joins the core like a local one.
                commands = stream.core.session_joined(session.session_id, time.monotonic())
                for command in commands:
                    if isinstance(command, CatchUp):
                        await self._catch_up(stream, command)
                    else:
                        await self._run(stream, (command,))
                return
        await self._relay_sync(stream)

    async def _relay_sync(self, stream: Stream) -> None:
        """Write to this node's sockets of the context every attempt the store holds SENT that
        each has not had (the owner decided it; section 5 fan-out across nodes), in seq order."""
        if stream.role != "relay" or not stream.sessions:
            return
        # The reads are under the lock too: a sync that read before another one wrote and moved
        # the watermark would write what that one wrote (a relay has no sends of its own to block).
        async with stream.lock:
            if stream.role != "relay":
                return
            seen = stream.relay_seen
            fresh: list[EventRecord] = []
            while True:
                page = await self.store.events_after(stream.context_id, seen, limit=RELAY_PAGE)
                fresh.extend(page)
                if len(page) < RELAY_PAGE:
                    break
                seen = page[-1].seq
            # Read after the new events: an event this read finds finished was finished when the
            # one above read it, so forgetting it below can never make it look new again.
            in_flight = await self.store.unacked_after(stream.context_id, 0)
            live = {r.seq for r in in_flight}
            stream.relay_terminals = {r.run_id for r in in_flight if r.kind in TERMINAL_KINDS}
            # First sends go out in seq order, as on one node: none past an event whose first
            # send is not decided yet (PENDING at attempt 0; its turn comes at a later read).
            gap = next((r.seq for r in fresh if r.state is DeliveryState.PENDING and r.attempt == 0), None)
            frames: dict[int, EventRecord] = {
                r.seq: r for r in fresh if r.attempt > 0 and r.state in _FANNED_OUT and (gap is None or r.seq < gap)
            }
            frames.update(
                (r.seq, r) for r in in_flight if r.state is DeliveryState.SENT and (gap is None or r.seq < gap)
            )
            for session_id, session in list(stream.sessions.items()):
                written = stream.relayed.setdefault(session_id, {})
                base = stream.relay_base.get(session_id, 0)
                for seq in sorted(frames):
                    record = frames[seq]
                    if record.state is not DeliveryState.SENT and seq <= base:
                        continue  # acked before this socket joined
                    if record.attempt <= written.get(seq, 0):
                        continue  # it had this attempt
                    try:
                        await session.wait_room(self.settings.ack_timeout)
                        await session.send(event_frame(record, record.attempt))
                    except SendFailed:
                        break  # closing: its close deregisters it
                    written[seq] = record.attempt
                    stream.relay_top = max(stream.relay_top, seq)
                    self.metrics.relayed.inc()
            # The watermark moves over the prefix whose first send is decided; an event still
            # PENDING at attempt 0 is read again (its first send, whenever the owner makes it).
            for record in fresh:
                if record.state is DeliveryState.PENDING and record.attempt == 0:
                    break
                stream.relay_seen = max(stream.relay_seen, record.seq)
            for written in stream.relayed.values():
                # Finished and below the watermark: never read again, so never written again.
                for seq in [q for q in written if q not in live and q <= stream.relay_seen]:
                    del written[seq]

    async def _relay_ack(self, stream: Stream, seq: int, *, resume: bool = False) -> list[int]:
        """A cumulative ack on a relay's socket: stored here, clamped as the owner clamps (to
        the delivered prefix: every live event through it has had an attempt), and the owner told.
        A plain ack is also clamped to what this node wrote; a resume's ``last_seq`` counts what
        the client had from any node."""
        assert self.cluster is not None
        top = seq if resume else min(seq, stream.relay_top)
        records = await self.store.unacked_after(stream.context_id, 0)
        through = 0
        for record in records:
            if record.seq > top or record.attempt == 0:
                break
            through = record.seq
        if through == 0:
            return []
        acked = await self.store.ack_through(stream.context_id, through)
        if acked:
            self.cluster.tell("acks", stream.context_id)
        return acked

    async def _sync_acks(self, stream: Stream) -> None:
        """Owner: fire ``ack`` on the live events the store holds ACKED (acked through a relay)."""
        if stream.role != "owner" or not stream.core.live:
            return
        acked = await self.store.acked_among(stream.context_id, list(stream.core.live))
        if not acked:
            return
        async with stream.lock:
            result = stream.core.acked_elsewhere(acked, time.monotonic(), {"stored": "through another node"})
            self._count_acks(stream, result)

    async def _sync_remote(self, stream: Stream) -> None:
        """Owner: the other nodes with READY sockets of the context, from the store, as sessions
        of the core (each such node is one session: its relay fans out to its sockets)."""
        assert self.cluster is not None
        if stream.role != "owner":
            return
        ready = await self.store.ready_nodes([stream.context_id], time.time())
        want = {self._node_session(n) for n in ready.get(stream.context_id, ()) if n != self.cluster.node_id}
        async with stream.lock:
            if stream.role != "owner":
                return
            now = time.monotonic()
            for session_id in stream.remote - want:
                stream.core.session_left(session_id, now)
            joined = sorted(want - stream.remote)
            stream.remote = want
            for session_id in joined:
                commands = [c for c in stream.core.session_joined(session_id, now) if not isinstance(c, CatchUp)]
                await self._run(stream, commands)
            stream.wake()

    def on_notice(self, notice: Notice) -> None:
        """Another node changed ``notice.context_id``: re-read what this node relays or owns."""
        stream = self.streams.get(notice.context_id)
        if stream is None:
            if notice.context_id in self.owned:
                self._want_context(notice.context_id, notice.kind)
            elif notice.kind == "owner":
                self._scan.set()  # its events may have no owner now
            return
        self._want(stream, {notice.kind})

    def resync(self) -> None:
        """Notices may have been missed (the listener reconnected): re-read everything."""
        for stream in list(self.streams.values()):
            self._want(stream, {"events", "acks", "sessions"})
        self._scan.set()

    def _want_context(self, context_id: str, kind: str) -> None:
        async def open_stream() -> None:
            info = await self.store.find_context(context_id)
            if info is None:
                return
            self._want(self._stream(context_id, info.user_id), {kind})

        self._spawn_task(open_stream(), f"delivery-open-{context_id}")

    def _want(self, stream: Stream, kinds: set[str]) -> None:
        stream.wanted |= kinds
        if stream.worker is None or stream.worker.done():
            stream.users += 1
            stream.worker = asyncio.get_running_loop().create_task(
                self._reread(stream), name=f"delivery-reread-{stream.context_id}"
            )
            stream.worker.add_done_callback(self._task_done)

    async def _reread(self, stream: Stream) -> None:
        """Re-read the store for what notices (or the poll) asked, until nothing more is asked."""
        try:
            while stream.wanted and not self._closed:
                kinds, stream.wanted = stream.wanted, set()
                try:
                    if stream.role is None or "claim" in kinds or (stream.role == "relay" and "owner" in kinds):
                        await self._claim(stream)
                    if stream.role == "owner":
                        if "events" in kinds:
                            await self.adopt(stream.context_id, stream.user)
                        if "acks" in kinds:
                            await self._sync_acks(stream)
                        if "sessions" in kinds:
                            await self._sync_remote(stream)
                    elif "events" in kinds:
                        await self._relay_sync(stream)
                except StoreError as exc:
                    # The next poll reads it again.
                    self.metrics.store_failures.inc()
                    log.warning("stream %s: re-reading the store failed: %s", stream.context_id, exc)
        finally:
            stream.wanted.clear()
            stream.users -= 1
            self._maybe_forget(stream)

    async def take_orphans(self) -> int:
        """Take the delivery of every context with events in delivery and no alive owner (its
        node died, or left): each is claimed in the store (one node wins) and adopted; returns
        how many events this node adopted. Raises StoreError."""
        assert self.cluster is not None
        taken = 0
        for context_id in await self.store.orphaned_deliveries(time.time()):
            info = await self.store.find_context(context_id)
            if info is None:
                continue
            with self._using(context_id, info.user_id) as stream:
                before = len(stream.core)
                if await self._claim(stream):
                    taken += len(stream.core) - before
                    if stream.core.sessions:
                        async with stream.lock:
                            await self._run(stream, stream.core._offers())
        if taken:
            log.info("took over the delivery of %d events of nodes that died or left", taken)
        return taken

    async def poll_loop(self) -> None:
        """Every ``cluster_poll_interval`` (or at once when a notice says an owner left): what a
        lost notice would have said is read from the store, and orphaned contexts are taken.
        This is the bound on how long a lost notice delays anything."""
        assert self.cluster is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.cluster_poll_interval):
                    await self._scan.wait()
            self._scan.clear()
            try:
                owned = set(await self.store.owned_deliveries(self.cluster.node_id))
                for stream in list(self.streams.values()):
                    kinds = {"events", "acks", "sessions"}
                    if stream.role == "owner" and stream.context_id not in owned:
                        kinds.add("claim")  # still ours (claimed again), or another node's: demoted
                    self._want(stream, kinds)
                self.owned &= owned | {c for c, st in self.streams.items() if st.role == "owner"}
                await self.take_orphans()
            except StoreError as exc:
                self.metrics.store_failures.inc()
                log.warning("cluster poll failed: %s", exc)

    def _spawn_task(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

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
        if self.cluster is not None:
            # The other nodes take these contexts as soon as this node has left (impl/app.py).
            for context_id in sorted(self.owned):
                self.cluster.tell("owner", context_id)
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
