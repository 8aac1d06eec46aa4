"""Seeded defects: broken variants of the reference server, one per wire-visible mutant of the zoo
(model/mutants.py) plus the 1011 reply to the handshake race (docs/conformance.md, "Seeded defects").

Each variant subclasses or wraps one reference component and, where the mutant changes a machine,
drives that component with the *mutant's* machine, so the broken server's own audit log records
the broken transitions faithfully (that is what trace-check must reject). Nothing here is a flag
of the shipped server. ``install(name, monkeypatch)`` patches the component the variant needs and
returns the ``create_app`` keyword arguments.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
from server_harness import ServerThread, make_settings

from pipeproof.conformance.serve import DISABLED_USER
from pipeproof.conformance.timing import SMALL, Timing
from pipeproof.core.delivery import NEVER, Acked, AckThrough, DeliveryCore, SendEvent, Tracked, Transmit
from pipeproof.core.delivery import Command as DeliveryCommand
from pipeproof.core.session import BeginHandshake, Command
from pipeproof.impl import app as app_module
from pipeproof.impl.contexts import ContextRegistry
from pipeproof.impl.delivery import DeliveryService
from pipeproof.impl.delivery_stream import Stream, event_frame
from pipeproof.impl.runs import AgentRuntime, _Run
from pipeproof.impl.session import ConnectionShell
from pipeproof.impl.settings import Settings
from pipeproof.impl.store import ContextRecord, EventRecord
from pipeproof.model.connection import Conn
from pipeproof.model.mutants import BY_NAME
from pipeproof.model.run import Run
from pipeproof.model.spec import Machine, Transition
from pipeproof.model.system import Bounds, SystemModel
from pipeproof.protocol import CloseCode
from pipeproof.protocol.frames import ConnectionAck


def mutant_model(name: str, s: Settings) -> SystemModel:
    bounds = Bounds(max_attempts=s.max_attempts, buffer_max=s.preready_buffer_frames,
                    max_connections_per_user=s.max_connections_per_user, max_steps=s.run_max_steps,
                    error_budget=s.error_budget)
    return BY_NAME[name].model(bounds)


def mutant_edge(name: str, s: Settings, family: str, key: str) -> Transition:
    machine: Machine = getattr(mutant_model(name, s), family)
    return next(t for t in machine.transitions if t.key == key)


# -- connection shell variants (section 1) -------------------------------------------------------------


class _MutantShell(ConnectionShell):
    mutant = ""

    def __init__(self, state: Any, ws: Any) -> None:
        super().__init__(state, ws, machine=mutant_model(self.mutant, state.settings).connection)


class HandleBeforeReadyShell(_MutantShell):
    """handle_before_ready: a pipelined frame is handled while INITIALISING (the mutant machine
    allows it, and the worker handles whenever the machine does)."""

    mutant = "handle_before_ready"


class AckBeforeReadyShell(_MutantShell):
    """ack_before_ready: connection_ack goes out as soon as connection_init arrives, before auth."""

    mutant = "ack_before_ready"

    def apply(self, commands: list[Command]) -> None:
        super().apply(commands)
        started = any(isinstance(c, BeginHandshake) for c in commands)
        if not started or self.closed or self.sender is None or self.conn.state is not Conn.INITIALISING:
            return
        self.sender.send(ConnectionAck(session_id=self.session_id, context_id="pending", epoch=1,
                                       heartbeat_ms=self.settings.heartbeat_ms, recovered=False, last_seq=0))
        original = self.sender.send

        def send(frame: Any) -> None:
            if isinstance(frame, ConnectionAck):
                return  # already acknowledged (too early)
            original(frame)

        self.sender.send = send  # type: ignore[method-assign]


class Race1011Shell(ConnectionShell):
    """The seed's symptom: a frame racing the handshake gets the socket closed with 1011."""

    def on_payload(self, payload: str | bytes) -> None:
        if self.conn.state is Conn.INITIALISING and not self.closed:
            # The seed's handler crashes on a frame before READY and the ASGI server answers 1011.
            self.conn.fire("peer_close", {"code": int(CloseCode.INTERNAL_ERROR), "reason": "internal error"})
            self._closed.set()
            if self.sender is not None:
                self.sender.close(int(CloseCode.INTERNAL_ERROR), "internal error")
            return
        super().on_payload(payload)


# -- contexts (section 3) ---------------------------------------------------------------------------------


class UnlockedContexts(ContextRegistry):
    """unlocked_context_create: get-or-create without the per-user lock; a second init that races
    the first creates its own context."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inflight: dict[str, int] = {}
        self._made = 0

    async def resolve(self, user: str, account: str, now: float | None = None) -> ContextRecord:
        racing = self._inflight.get(user, 0) > 0
        self._inflight[user] = self._inflight.get(user, 0) + 1
        try:
            await asyncio.sleep(0.05)  # the unprotected read-then-create window
            record = await super().resolve(user, account, now)
            if racing:
                self._made += 1
                return ContextRecord(f"{record.context_id[:-4]}x{self._made:03d}", record.epoch, True, user, account)
            return record
        finally:
            self._inflight[user] -= 1


# -- delivery (section 5) ----------------------------------------------------------------------------------


class _MutantDelivery(DeliveryService):
    mutant = ""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(settings, *args, **kwargs)
        self.machine = mutant_model(self.mutant, settings).delivery


@dataclass(frozen=True)
class _MarkDone:
    """Store: the event is ACKED (no client acked it)."""

    seq: int


class _SwallowingCore(DeliveryCore[EventRecord]):
    """Offers every appended event at once, session or not; a send nobody took is 'handled' by the
    mutant machine's send_failed -> ACKED, and the store is told the event is done."""

    def appended(self, records: Iterable[EventRecord], now: float) -> tuple[DeliveryCommand, ...]:
        records = list(records)
        commands = super().appended(records, now)
        offered = {c.seq for c in commands if isinstance(c, SendEvent)}
        return commands + tuple(SendEvent(r.seq) for r in records if r.seq not in offered)

    def sent(self, transmit: Transmit[EventRecord], written: int, now: float) -> tuple[Any, ...]:
        commands = super().sent(transmit, written, now)
        if not written and not commands and transmit.seq not in self.live:
            return (_MarkDone(transmit.seq),)
        return commands


class SwallowingDelivery(_MutantDelivery):
    """swallow_send_failure: an event written while no session can take it is a failed send, and
    the failure is 'handled' by marking the event done."""

    mutant = "swallow_send_failure"
    core_class = _SwallowingCore

    async def _run(self, stream: Stream, commands: Sequence[Any]) -> None:
        for command in commands:
            if isinstance(command, _MarkDone):
                await self.store.ack_through(stream.context_id, command.seq)
            else:
                await super()._run(stream, (command,))


class _NeverEscalatingCore(DeliveryCore[EventRecord]):
    """At the last attempt's ack deadline nothing happens (the mutant has no edge for it): its tick
    is fired if the machine allows it and the event stays in flight for ever."""

    def tick(self, now: float) -> tuple[DeliveryCommand, ...]:
        last = int(self.machine.params["max_attempts"])
        has = bool(self.sessions)
        for entry in list(self.live.values()):
            m = entry.machine
            if self.deadline(entry) <= now and entry.ack_due != NEVER and int(m.values["attempt"]) >= last:
                if m.can("tick", has_session=has):
                    m.fire("tick", {"deadline": "ack_timeout"}, has_session=has)
                entry.ack_due = sys.float_info.max  # still awaiting its ack; the deadline never comes
        return super().tick(now)


class NeverEscalating(_MutantDelivery):
    """no_escalation: when the last attempt's ack times out, nothing happens; the event waits forever."""

    mutant = "no_escalation"
    core_class = _NeverEscalatingCore


class _KeepingAcked(DeliveryCore[EventRecord]):
    """Remembers the events it acked (in a list the server hands it)."""

    acked_entries: list[Tracked[EventRecord]]

    def ack_stored(self, write: AckThrough, acked: Iterable[int], now: float) -> Acked:
        before = dict(self.live)
        result = super().ack_stored(write, acked, now)
        self.acked_entries.extend(before[s] for s in result.seqs)
        return result


class ResendingAcked(DeliveryService):
    """resend_acked: acked events are kept and written again to every session that joins. The
    mutant's edge ACKED --send--> ACKED is recorded as such (python-statemachine cannot even build a
    machine where a terminal state has an exit, so the broken component logs the edge it took)."""

    core_class = _KeepingAcked

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(settings, *args, **kwargs)
        self.acked_events: dict[str, list[Tracked[EventRecord]]] = {}  # outlives a forgotten stream
        self.edge = mutant_edge("resend_acked", settings, "delivery", "ACKED--send-->ACKED")

    def _core(self, context_id: str, user: str) -> DeliveryCore[EventRecord]:
        core = super()._core(context_id, user)
        core.acked_entries = self.acked_events.setdefault(context_id, [])  # type: ignore[attr-defined]
        return core

    async def _register(self, stream: Stream, session: Any, resume_last_seq: int | None) -> None:
        await super()._register(stream, session, resume_last_seq)
        for entry in self.acked_events.get(stream.context_id, []):
            m = entry.machine
            self.audit.record("delivery", m.instance_id, self.edge, m.values, user=m.user, context_id=m.context_id,
                              detail={"attempt": entry.frame_attempt, "resend_acked": True})
            await session.send(event_frame(entry.record, entry.frame_attempt))


class LeakingDelivery(DeliveryService):
    """cross_user_route / leaks another user's event: every write also goes to every other
    context's sessions."""

    async def _write(self, stream: Stream, plan: Transmit[EventRecord]) -> int:
        written = await super()._write(stream, plan)
        for other in list(self.streams.values()):
            if other is stream:
                continue
            for session in list(other.sessions.values()):
                await session.send(event_frame(plan.record, plan.attempt))
        return written


# -- runs (section 4) ---------------------------------------------------------------------------------------


class EmitAfterTerminal(AgentRuntime):
    """event_after_terminal: one more agent_thinking after agent_completed (the mutant's edge
    COMPLETED --agent_thinking--> COMPLETED, recorded as taken)."""

    def start(self, state: Any, store: Any) -> None:
        super().start(state, store)
        self.edge = mutant_edge("event_after_terminal", state.settings, "run", "COMPLETED--agent_thinking-->COMPLETED")

    async def _execute(self, run: _Run) -> None:
        await super()._execute(run)
        if run.machine.state is Run.COMPLETED:
            m = run.machine
            m.audit.record("run", m.instance_id, self.edge, m.values, user=m.user, context_id=m.context_id)
            assert self.delivery is not None
            await self.delivery.publish(run.context_id, run.user, run.run_id, "agent_thinking",
                                        {"text": "one more thing"})


class RuntimeWith(AgentRuntime):
    """The reference runtime with another DeliveryService class."""

    delivery_class: type[DeliveryService] = DeliveryService

    def start(self, state: Any, store: Any) -> None:
        super().start(state, store)
        assert self.metrics is not None
        self.delivery = self.delivery_class(state.settings, store, state.audit, self.metrics)
        self._spawn(self.delivery.recover(), "delivery-recover")


def _runtime(cls: type[DeliveryService]) -> AgentRuntime:
    return type(f"RuntimeWith{cls.__name__}", (RuntimeWith,), {"delivery_class": cls})()


DEFECTS: dict[str, Callable[[pytest.MonkeyPatch], dict[str, Any]]] = {
    "handle_before_ready": lambda mp: _shell(mp, HandleBeforeReadyShell),
    "ack_before_ready": lambda mp: _shell(mp, AckBeforeReadyShell),
    "swallow_send_failure": lambda mp: {"handler": _runtime(SwallowingDelivery)},
    "no_escalation": lambda mp: {"handler": _runtime(NeverEscalating)},
    "resend_acked": lambda mp: {"handler": _runtime(ResendingAcked)},
    "unlocked_context_create": lambda mp: _contexts(mp),
    "cross_user_route": lambda mp: {"handler": _runtime(LeakingDelivery)},
    "event_after_terminal": lambda mp: {"handler": EmitAfterTerminal()},
    "race_1011": lambda mp: _shell(mp, Race1011Shell),
}
"""Seeded defect -> installer returning create_app kwargs (the handler defaults to AgentRuntime)."""


def _shell(mp: pytest.MonkeyPatch, cls: type[ConnectionShell]) -> dict[str, Any]:
    mp.setattr(app_module, "ConnectionShell", cls)
    return {}


def _contexts(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    mp.setattr(app_module, "ContextRegistry", UnlockedContexts)
    return {}


def settings_for(tmp_path: Path, timing: Timing = SMALL, **overrides: Any) -> Settings:
    values: dict[str, Any] = {f.name: getattr(timing, f.name) for f in fields(timing)
                              if f.name not in ("tolerance", "slack", "reply_timeout")}
    values.update(context_ttl=600.0, max_connections_per_account=512, disabled_users=[DISABLED_USER],
                  shutdown_grace=1.0, heartbeat_interval=timing.heartbeat_interval)
    values.update(overrides)
    return make_settings(tmp_path, **values)


def start_server(tmp_path: Path, app_kwargs: dict[str, Any], timing: Timing = SMALL) -> ServerThread:
    kwargs = dict(app_kwargs)
    kwargs.setdefault("handler", AgentRuntime())
    return ServerThread(settings_for(tmp_path, timing), kwargs).start()


__all__ = ["DEFECTS", "settings_for", "start_server"]
