"""The model in lockstep with the wire (docs/conformance.md, "How observations map onto the model").

The client sees only part of what a server does, so each machine instance is tracked as a
*belief*: the set of configurations the model allows given everything observed so far. Between
observations the server may take steps the client cannot see (a socket becomes READY before its
ack is written, a frame is received and handled, a delivery deadline passes); those are the
instance's *hidden* events, and every observation is explained from the closure of the belief
under them. An observation no configuration explains is a :class:`~.errors.Violation`.

Observation -> model events (section numbers of docs/protocol.md):

* ``connection_ack``            -> (hidden ``recv_init``, ``auth_ok``) + ``send_ack``        (1)
* a reply to the i-th frame     -> (hidden receive + ``handle_frame`` of frames 0..i)     (1, 4)
* close C R                     -> the transition whose ``emits`` is ``close C R``, or one of the
                                   documented ``peer_close`` closes; 1011 is never allowed (1)
* ``event`` seq S attempt A     -> conn ``deliver``; delivery (hidden ``tick``/``ack_timeout``/
                                   ``send_failed``) + ``send`` reaching attempt A, or a fan-out
                                   copy of attempt A (no transition)                          (5)
* ack N, then a barrier reply   -> delivery ``ack`` of every received event <= N             (5)
* ``GET /v1/events`` states     -> delivery reaches that state (ACKED only after a client ack;
                                   ESCALATED through the transition emitting its reason)     (5)
* event kinds in seq order      -> the run machine's transition of that name; well_ordered   (4)
* ack's context_id / epoch      -> context ``create`` / ``attach``; close connection_limit
                                   -> ``reject_limit``; a kit drop -> ``detach``              (3)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pipeproof.model.connection import CONNECTION
from pipeproof.model.context import context_machine
from pipeproof.model.delivery import delivery_machine
from pipeproof.model.run import run_machine

from ..errors import Violation
from ..timing import Timing
from .belief import AUTH_REASONS, Belief, state_names
from .connection import Sent, SockView
from .user import EventView, RunView, UserView


class Oracle:
    """Everything the kit knows about the server under test, in the model's terms."""

    def __init__(self, timing: Timing, *, tolerate_overload: bool = False) -> None:
        self.timing = timing
        self.tolerate_overload = tolerate_overload
        self.conn_machine = CONNECTION.with_params(buffer_max=timing.preready_buffer_frames,
                                                   error_budget=timing.error_budget)
        self.ctx_machine = context_machine(timing.max_connections_per_user)
        self.del_machine = delivery_machine(timing.max_attempts, 1, 1)
        self.run_machine = run_machine(timing.run_max_steps)
        self.users: dict[str, UserView] = {}
        self.sockets: list[SockView] = []
        self.run_owner: dict[str, UserView] = {}
        self.checks: dict[str, int] = {}
        self.actions: list[str] = []
        self.on_violation: Callable[[Violation], None] | None = None

    def count(self, prop: str) -> None:
        self.checks[prop] = self.checks.get(prop, 0) + 1

    def violation(self, prop: str, observed: str, allowed: Iterable[str]) -> Violation:
        v = Violation(prop, observed, list(allowed), context=self.actions[-8:])
        v.trace = tuple(self.actions)
        if self.on_violation is not None:
            self.on_violation(v)
        return v

    def user(self, name: str) -> UserView:
        u = self.users.get(name)
        if u is None:
            u = UserView(self, name)
            self.users[name] = u
        return u

    def run_view(self, user: UserView, request_id: str) -> RunView:
        view = user.requests.get(request_id)
        if view is None:
            view = RunView(request_id, Belief(self.run_machine))
            user.requests[request_id] = view
        return view

    def pump(self) -> None:
        """Give every socket's new observations to the model, socket by socket, in arrival order."""
        for s in self.sockets:
            for o in s.sock.take():
                s.observe(o)
        for u in self.users.values():
            u.apply_runs()

    def end_of_step(self) -> None:
        self.pump()
        for u in self.users.values():
            stray = u.unresolved_runs()
            if stray:
                raise self.violation("no_cross_user_read", f"user {u.name} received events of runs it never "
                                     f"started: {stray[:3]}", ["events of the user's own runs"])


__all__ = ["AUTH_REASONS", "Belief", "EventView", "Oracle", "RunView", "Sent", "SockView", "UserView", "state_names"]
