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
import time
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from server_harness import ServerThread, make_settings

from pipeproof.conformance.serve import DISABLED_USER
from pipeproof.conformance.timing import SMALL, Timing
from pipeproof.core.session import BeginHandshake, Command
from pipeproof.impl import app as app_module
from pipeproof.impl.contexts import ContextRegistry
from pipeproof.impl.delivery import DeliveryService, _Stream, _Tracked
from pipeproof.impl.runs import AgentRuntime, _Run
from pipeproof.impl.session import ConnectionShell
from pipeproof.impl.settings import Settings
from pipeproof.impl.store import ContextRecord
from pipeproof.model.connection import Conn
from pipeproof.model.delivery import Delivery
from pipeproof.model.mutants import BY_NAME
from pipeproof.model.run import Run
from pipeproof.model.spec import Machine, Transition, build_statemachine
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
        self._sm_class = build_statemachine(self.machine)


class SwallowingDelivery(_MutantDelivery):
    """swallow_send_failure: an event written while no session can take it is a failed send, and
    the failure is 'handled' by marking the event done."""

    mutant = "swallow_send_failure"

    async def _append(self, stream: _Stream, context_id: str, user: str, run_id: str, kind: str,
                      data: Mapping[str, Any]) -> Any:
        async with stream.lock:
            record = await self.store.append_event(context_id, run_id, kind, data, time.time())
            tracked = _Tracked(record, self._machine(record, user))
            self._track(stream, tracked, time.monotonic())
            await self._send(stream, tracked)
        return record

    async def _send(self, stream: _Stream, tracked: _Tracked) -> None:
        if stream.sessions or not tracked.machine.can("send_failed"):
            await super()._send(stream, tracked)
            return
        t = tracked.machine.fire("send_failed", {"attempt": int(tracked.machine.values["attempt"]) + 1})
        if t.target is Delivery.ACKED:
            await self.store.ack_through(stream.context_id, tracked.seq)
            self._untrack(stream, tracked.seq)
        elif t.target is Delivery.ESCALATED:
            await self._escalate(stream, tracked, "send_failed")


class NeverEscalating(_MutantDelivery):
    """no_escalation: when the last attempt's ack times out, nothing happens; the event waits forever."""

    mutant = "no_escalation"

    async def _fire_due(self, stream: _Stream, now: float) -> None:
        for tracked in list(stream.live.values()):
            m = tracked.machine
            if (self._deadline(stream, tracked) <= now and m.state is Delivery.SENT
                    and int(m.values["attempt"]) >= self.settings.max_attempts):
                has = bool(stream.sessions)
                if m.can("tick", has_session=has):
                    m.fire("tick", {"deadline": "ack_timeout"}, has_session=has)
                tracked.ack_deadline = float("inf")
        await super()._fire_due(stream, now)


class ResendingAcked(DeliveryService):
    """resend_acked: acked events are kept and written again to every session that joins. The
    mutant's edge ACKED --send--> ACKED is recorded as such (python-statemachine cannot even build a
    machine where a terminal state has an exit, so the broken component logs the edge it took)."""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(settings, *args, **kwargs)
        self.acked_events: dict[str, list[_Tracked]] = {}
        self.edge = mutant_edge("resend_acked", settings, "delivery", "ACKED--send-->ACKED")

    def _acked(self, stream: _Stream, acked: list[int], detail: Mapping[str, Any]) -> None:
        before = dict(stream.live)
        super()._acked(stream, acked, detail)
        for s in acked:
            if s in before:
                self.acked_events.setdefault(stream.context_id, []).append(before[s])

    async def _register(self, stream: _Stream, session: Any, resume_last_seq: int | None) -> None:
        await super()._register(stream, session, resume_last_seq)
        for tracked in self.acked_events.get(stream.context_id, []):
            m = tracked.machine
            self.audit.record("delivery", m.instance_id, self.edge, m.values, user=m.user, context_id=m.context_id,
                              detail={"attempt": tracked.frame_attempt, "resend_acked": True})
            await session.send(tracked.frame(tracked.frame_attempt))


class LeakingDelivery(DeliveryService):
    """cross_user_resume / leaks another user's event: every write also goes to every other
    context's sessions."""

    async def _send(self, stream: _Stream, tracked: _Tracked) -> None:
        attempt = int(tracked.machine.values["attempt"]) + 1
        await super()._send(stream, tracked)
        for other in list(self.streams.values()):
            if other is stream:
                continue
            for session in list(other.sessions.values()):
                await session.send(tracked.frame(attempt))


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
    "cross_user_resume": lambda mp: {"handler": _runtime(LeakingDelivery)},
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
