"""The composed system: N users x M sessions x K events x A attempts (docs/model.md, "composition").

Components are indexed families of the four declared machines: one connection per session
slot, one context registry and one run per user, and up to K delivery machines per user (the
context's stream). Every system action fires one or more component transitions *by event name*;
whether it is enabled, and what it does to each component, comes only from the machines'
declarations. What lives here is the glue: which components an action touches, the inputs it
supplies (``has_session``, ``account_full``), routing (which session may read which stream) and
the client's knowledge (which events it has received, what it resumes from).

Actions interleave freely, so the explorer sees what a real server sees: two inits for one user
racing through auth and context resolution, a socket dropped between a send and its ack, an ack
arriving after a retry went out, a resume on another session, model time passing between any two
steps. Nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from pipeproof.errors import ModelDefinitionError
from pipeproof.model.composition import (
    APPEND,
    BY_NAME,
    CLIENT_CONN_ACTIONS,
    SERVER_CONN_ACTIONS,
    Action,
    Fires,
    describe_args,
)
from pipeproof.model.connection import ACK_SENT, ATTACHED, CONNECTION, Conn
from pipeproof.model.context import CONNS, EPOCH, Ctx, context_machine
from pipeproof.model.delivery import DELIVERED, Delivery, delivery_machine
from pipeproof.model.run import AGENT_EVENTS, Run, run_machine
from pipeproof.model.spec import Config, Machine, Transition

FAMILIES = ("conn", "ctx", "run", "event")


def input_choices(action: Action) -> tuple[dict[str, bool], ...]:
    """Every combination of the boolean inputs a ``conn`` action declares (``({},)`` for none):
    the explorer and Z3 try each, the shell supplies the real fact."""
    return tuple(dict(zip(action.inputs, combo, strict=True))
                 for combo in itertools.product((False, True), repeat=len(action.inputs)))


def reads_inputs(t: Transition, inputs: dict[str, bool]) -> bool:
    """Whether ``t``'s guard reads one of ``inputs`` set to True: a True choice that the
    transition ignores would only repeat the all-False successor."""
    read = {n for kind, n in t.guard.names() if kind == "input"}
    return not any(v for k, v in inputs.items() if k not in read)


@dataclass(frozen=True)
class Bounds:
    """The finite instance the explorer and Hypothesis check (docs/model.md, "bounds")."""

    users: int = 2
    sessions_per_user: int = 2
    events_per_user: int = 2
    max_attempts: int = 2
    buffer_max: int = 1
    error_budget: int = 1  # malformed frames answered before the next one closes invalid_message
    # Ticks of model time. 0 and 0 is the untimed abstraction: a timeout may fire at any moment
    # after its trigger (racing the ack), the clock never ticks, and no horizon is checked.
    ack_timeout: int = 1
    resume_window: int = 1
    max_steps: int = 1
    max_connections_per_user: int = 1
    max_connections_per_account: int = 2
    runs: int = -1  # users 0..runs-1 have an agent run (-1: every user); others only connect
    frames: bool = True  # client data frames (pipelining, handling); off: only init/ack/drop
    clock: bool = True  # model time (timeouts, resume window, liveness horizon)
    drain: bool = True  # server shutdown (DRAINING)

    def __post_init__(self) -> None:
        for name in ("users", "sessions_per_user", "events_per_user", "max_attempts"):
            if getattr(self, name) < 1:
                raise ModelDefinitionError("system", "bounds", f"{name} must be at least 1")
        if self.ack_timeout < 0 or self.resume_window < 0:
            raise ModelDefinitionError("system", "bounds", "ack_timeout and resume_window must be >= 0")
        if self.events_per_user < 2:
            raise ModelDefinitionError("system", "bounds", "events_per_user must be at least 2 (start + terminal)")

    @property
    def timed(self) -> bool:
        return self.clock and (self.ack_timeout > 0 or self.resume_window > 0)

    @property
    def sessions(self) -> int:
        return self.users * self.sessions_per_user

    def describe(self) -> str:
        return (
            f"{self.users} users x {self.sessions_per_user} sessions x {self.events_per_user} events"
            f" x {self.max_attempts} attempts (buffer {self.buffer_max}, ack_timeout {self.ack_timeout},"
            f" resume_window {self.resume_window}, per-user limit {self.max_connections_per_user},"
            f" per-account limit {self.max_connections_per_account})"
        )


class State(NamedTuple):
    """One global state. Hashable; the explorer stores these."""

    conns: tuple[Config, ...]  # per session slot
    ctxs: tuple[Config, ...]  # per user
    runs: tuple[Config, ...]  # per user (one run each)
    events: tuple[tuple[Config, ...], ...]  # per user: the stream, seq = index + 1
    kinds: tuple[tuple[str, ...], ...]  # per user: the agent event kind at each seq
    resume: tuple[int, ...]  # per session: last_seq sent with resume (-1: none)
    epoch_seen: tuple[int, ...]  # per session: context epoch handed to it (0: none)


class Firing(NamedTuple):
    """One component transition inside a step (what the step properties inspect)."""

    family: str
    index: tuple[int, ...]  # type: ignore[assignment]  # shadows tuple.index; the name reads best
    transition: Transition
    before: Config
    after: Config


class Step(NamedTuple):
    action: str
    actor: str  # "client", "server" or "clock"
    args: tuple[int, ...]
    firings: tuple[Firing, ...]
    after: State

    def describe(self, system: System) -> str:
        return system.describe_step(self)


RouteFn = Callable[["System", State, int, int], bool]


def same_user(system: System, state: State, session: int, user: int) -> bool:
    """A session reads and acks only its own user's stream (docs/protocol.md section 3)."""
    return system.owner(session) == user


@dataclass(frozen=True)
class SystemModel:
    """The four machines plus the glue choices; mutants are ``replace``-d copies of this."""

    connection: Machine
    context: Machine
    delivery: Machine
    run: Machine
    route: RouteFn = same_user
    name: str = "reference"


def reference_model(bounds: Bounds) -> SystemModel:
    """The model the protocol describes, at ``bounds``."""
    return SystemModel(
        connection=CONNECTION.with_params(buffer_max=bounds.buffer_max, error_budget=bounds.error_budget),
        context=context_machine(bounds.max_connections_per_user),
        delivery=delivery_machine(bounds.max_attempts, bounds.ack_timeout, bounds.resume_window),
        run=run_machine(bounds.max_steps),
    )


@dataclass
class System:
    """Successor function over ``State`` for one ``SystemModel`` at one ``Bounds``."""

    bounds: Bounds
    model: SystemModel = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = reference_model(self.bounds)

    # -- indexing ------------------------------------------------------------------------------
    def owner(self, session: int) -> int:
        return session // self.bounds.sessions_per_user

    def sessions_of(self, user: int) -> range:
        k = self.bounds.sessions_per_user
        return range(user * k, (user + 1) * k)

    def initial(self) -> State:
        b = self.bounds
        m = self.model
        return State(
            conns=tuple(m.connection.initial_config() for _ in range(b.sessions)),
            ctxs=tuple(m.context.initial_config() for _ in range(b.users)),
            runs=tuple(m.run.initial_config() for _ in range(b.users)),
            events=tuple(() for _ in range(b.users)),
            kinds=tuple(() for _ in range(b.users)),
            resume=tuple(-1 for _ in range(b.sessions)),
            epoch_seen=tuple(0 for _ in range(b.sessions)),
        )

    # -- derived facts (inputs to guards) ------------------------------------------------------
    def live_session(self, state: State, session: int) -> bool:
        conn = state.conns[session]
        return conn[0] is Conn.READY and bool(conn[1][ACK_SENT])

    def has_session(self, state: State, user: int) -> bool:
        """Some session routed to ``user``'s stream is READY and acked: it can take an event now."""
        return any(
            self.live_session(state, s) and self.model.route(self, state, s, user)
            for s in range(self.bounds.sessions)
        )

    def account_full(self, state: State) -> bool:
        # One account holds every user in the finite instance: the per-account limit is global.
        total = sum(int(c[1][CONNS]) for c in state.ctxs)
        return total >= self.bounds.max_connections_per_account

    def delivered_prefix(self, state: State, user: int) -> int:
        """Highest seq N such that the client has received every event 1..N of ``user``'s stream."""
        n = 0
        for cfg in state.events[user]:
            if not cfg[1][DELIVERED]:
                break
            n += 1
        return n

    # -- the successor function ----------------------------------------------------------------
    def successors(self, state: State) -> Iterator[Step]:
        yield from self._client_steps(state)
        yield from self._server_steps(state)
        if self.bounds.clock:
            yield from self._clock_steps(state)

    def _fire(self, machine: Machine, cfg: Config, event: str, inputs: dict[str, bool] | None = None
              ) -> list[tuple[Transition, Config]]:
        if event not in machine.events_from[cfg[0]]:
            return []
        return machine.fire_all(cfg, event, inputs)

    def _conn_steps(self, state: State, s: int, ca: Action, name: str | None = None) -> Iterator[Step]:
        """Fire a ``conn`` action's connection event alone, detaching from the context when an
        attached socket closes (model/composition.py)."""
        m = self.model
        event, action, actor = ca.event, name or ca.name, ca.actor
        if event not in m.connection.events_from[state.conns[s][0]]:
            return
        fired = [(t, after) for inputs in input_choices(ca)
                 for t, after in m.connection.fire_all(state.conns[s], event, inputs) if reads_inputs(t, inputs)]
        for t, after in fired:
            firings = [Firing("conn", (s,), t, state.conns[s], after)]
            ctxs = state.ctxs
            if state.conns[s][0] in ATTACHED and t.target not in ATTACHED:
                u = self.owner(s)
                det = self._fire(m.context, ctxs[u], "detach")
                if not det:
                    continue  # the registry refuses: no consistent successor (caught by invariants)
                dt, dafter = det[0]
                firings.append(Firing("ctx", (u,), dt, ctxs[u], dafter))
                ctxs = _set(ctxs, u, dafter)
            yield Step(action, actor, (s,), tuple(firings),
                       state._replace(conns=_set(state.conns, s, after), ctxs=ctxs))

    def _client_steps(self, state: State) -> Iterator[Step]:
        for s in range(self.bounds.sessions):
            if not self.model.connection.events_from[state.conns[s][0]]:
                continue  # a closed socket does nothing
            for ca in CLIENT_CONN_ACTIONS:
                if not ca.flag or getattr(self.bounds, ca.flag):
                    yield from self._conn_steps(state, s, ca)
                if ca.name == "client_init" and state.conns[s][0] is Conn.OPEN:
                    prefix = self.delivered_prefix(state, self.owner(s))
                    if prefix > 0:
                        for step in self._conn_steps(state, s, ca, "client_init_resume"):
                            yield step._replace(after=step.after._replace(resume=_set(state.resume, s, prefix)))
            if self.live_session(state, s):
                yield from self._ack_steps(state, s)
                u = self.owner(s)
                for t, after in self._fire(self.model.run, state.runs[u], "cancel"):
                    yield Step("client_cancel", "client", (s,), (Firing("run", (u,), t, state.runs[u], after),),
                               state._replace(runs=_set(state.runs, u, after)))

    def _ack_steps(self, state: State, s: int) -> Iterator[Step]:
        """Cumulative acks through seq n, for any stream this session is routed to."""
        for u in range(self.bounds.users):
            if not self.model.route(self, state, s, u):
                continue
            prefix = self.delivered_prefix(state, u)
            for n in range(1, prefix + 1):
                if state.events[u][n - 1][0] in self.model.delivery.terminal:
                    continue
                for firings, events in self._ack_through(state, u, n):
                    yield Step("client_ack", "client", (s, u, n), firings,
                               state._replace(events=_set(state.events, u, events)))

    def _ack_through(
        self, state: State, u: int, n: int
    ) -> Iterator[tuple[tuple[Firing, ...], tuple[Config, ...]]]:
        """The effect of a cumulative ack through ``n``: one outcome, or none when the ack could
        not have been sent (it names an event the client never received)."""
        firings: list[Firing] = []
        events = list(state.events[u])
        for i in range(n):
            cfg = events[i]
            if cfg[0] in self.model.delivery.terminal:
                continue
            fired = self._fire(self.model.delivery, cfg, "ack")
            if not fired:
                return
            t, after = fired[0]
            firings.append(Firing("event", (u, i + 1), t, cfg, after))
            events[i] = after
        yield tuple(firings), tuple(events)

    def _server_steps(self, state: State) -> Iterator[Step]:
        m = self.model
        for s in range(self.bounds.sessions):
            if not m.connection.events_from[state.conns[s][0]]:
                continue
            yield from self._resolve_steps(state, s)
            for ca in SERVER_CONN_ACTIONS:
                if not ca.flag or getattr(self.bounds, ca.flag):
                    yield from self._conn_steps(state, s, ca)
            yield from self._send_steps(state, s)
        for u in range(self.bounds.users):
            for t, after in self._fire(m.context, state.ctxs[u], "expire"):
                yield Step("server_expire_context", "server", (u,), (Firing("ctx", (u,), t, state.ctxs[u], after),),
                           state._replace(ctxs=_set(state.ctxs, u, after)))
            yield from self._run_steps(state, u)
            has = self.has_session(state, u)
            for i, cfg in enumerate(state.events[u]):
                for event in ("ack_timeout", "no_session_timeout"):
                    for t, after in self._fire(m.delivery, cfg, event, {"has_session": has}):
                        yield Step(f"server_{event}", "server", (u, i + 1),
                                   (Firing("event", (u, i + 1), t, cfg, after),),
                                   state._replace(events=_set(state.events, u, _set(state.events[u], i, after))))

    def _resolve_steps(self, state: State, s: int) -> Iterator[Step]:
        """Atomic get-or-create of the user's context, then READY (or a limit rejection)."""
        m = self.model
        conn = state.conns[s]
        if not m.connection.transitions_from(conn[0], "auth_ok") and not m.connection.transitions_from(
            conn[0], "limit_reject"
        ):
            return
        u = self.owner(s)
        full = self.account_full(state)
        for event in ("create", "attach", "reject_limit"):
            for ct, cafter in self._fire(m.context, state.ctxs[u], event, {"account_full": full}):
                conn_event = "limit_reject" if event == "reject_limit" else "auth_ok"
                for t, after in self._fire(m.connection, conn, conn_event):
                    firings = [Firing("ctx", (u,), ct, state.ctxs[u], cafter), Firing("conn", (s,), t, conn, after)]
                    nxt = state._replace(
                        conns=_set(state.conns, s, after),
                        ctxs=_set(state.ctxs, u, cafter),
                        epoch_seen=_set(state.epoch_seen, s, int(cafter[1][EPOCH]) if conn_event == "auth_ok" else 0),
                    )
                    if conn_event == "auth_ok" and state.resume[s] > 0:
                        # Resume acks everything through last_seq (section 5).
                        for acks, events in self._ack_through(nxt, u, state.resume[s]):
                            yield Step("server_resolve", "server", (s,), (*firings, *acks),
                                       nxt._replace(events=_set(nxt.events, u, events)))
                        continue
                    yield Step("server_resolve", "server", (s,), tuple(firings), nxt)

    def _send_steps(self, state: State, s: int) -> Iterator[Step]:
        """Write the oldest sendable event of a routed stream; the write may succeed or fail."""
        m = self.model
        conn = state.conns[s]
        for u in range(self.bounds.users):
            if not m.route(self, state, s, u):
                continue
            for i, cfg in enumerate(state.events[u]):
                sends = self._fire(m.delivery, cfg, "send")
                if not sends:
                    continue
                for ct, cafter in self._fire(m.connection, conn, "deliver"):
                    for t, after in sends:
                        yield Step("server_send", "server", (s, u, i + 1),
                                   (Firing("conn", (s,), ct, conn, cafter), Firing("event", (u, i + 1), t, cfg, after)),
                                   state._replace(conns=_set(state.conns, s, cafter),
                                                  events=_set(state.events, u, _set(state.events[u], i, after))))
                    for ft, fafter in self._fire(m.delivery, cfg, "send_failed"):
                        for step in self._conn_steps(state, s, SEND_ERROR, "server_send_failed"):
                            nxt = step.after._replace(
                                events=_set(step.after.events, u, _set(state.events[u], i, fafter)))
                            yield Step("server_send_failed", "server", (s, u, i + 1),
                                       (*step.firings, Firing("event", (u, i + 1), ft, cfg, fafter)), nxt)
                break  # in order: only the oldest sendable event of a stream goes next

    def _run_steps(self, state: State, u: int) -> Iterator[Step]:
        m = self.model
        if state.ctxs[u][0] is not Ctx.LIVE:
            return  # a run belongs to a live context
        if 0 <= self.bounds.runs <= u:
            return
        cfg = state.runs[u]
        appended = len(state.events[u])
        for event in m.run.events:
            if event == "cancel":
                continue  # the client's action
            for t, after in self._fire(m.run, cfg, event):
                firings = [Firing("run", (u,), t, cfg, after)]
                nxt = state._replace(runs=_set(state.runs, u, after))
                if event in AGENT_EVENTS:
                    # An emission that leaves the run unfinished keeps one slot for its terminal
                    # event, so every run can finish within the bounds.
                    room = self.bounds.events_per_user - appended - (0 if t.target in m.run.terminal else 1)
                    if room <= 0:
                        continue
                    new = m.delivery.initial_config()
                    firings.append(Firing("event", (u, appended + 1), _APPEND, new, new))
                    nxt = nxt._replace(
                        events=_set(state.events, u, (*state.events[u], new)),
                        kinds=_set(state.kinds, u, (*state.kinds[u], event)),
                    )
                yield Step(f"server_run_{event}", "server", (u,), tuple(firings), nxt)

    def _clock_steps(self, state: State) -> Iterator[Step]:
        """Model time passes for every live event at once, unless a deadline is due."""
        m = self.model
        firings: list[Firing] = []
        events = list(state.events)
        for u in range(self.bounds.users):
            has = self.has_session(state, u)
            stream = list(events[u])
            for i, cfg in enumerate(stream):
                if cfg[0] in m.delivery.terminal:
                    continue
                fired = self._fire(m.delivery, cfg, "tick", {"has_session": has})
                if not fired:
                    return
                t, after = fired[0]
                firings.append(Firing("event", (u, i + 1), t, cfg, after))
                stream[i] = after
            events[u] = tuple(stream)
        if firings:
            yield Step("tick", "clock", (), tuple(firings), state._replace(events=tuple(events)))

    # -- rendering -----------------------------------------------------------------------------
    def describe_step(self, step: Step) -> str:
        who = {"client": "client", "server": "server", "clock": "clock"}[step.actor]
        owner = self.owner(step.args[0]) if BY_NAME.get(step.action, _NO_ACTION).args == ("session",) \
            and step.args else None
        args = describe_args(step.action, step.args, owner)
        changes = "; ".join(
            f"{f.family}[{','.join(map(str, f.index))}] {f.transition.event}: {_show(self, f.family, f.before)}"
            f" -> {_show(self, f.family, f.after)}"
            for f in step.firings
        )
        return f"{who:<6} {step.action}({', '.join(args)}): {changes}"

    def machine(self, family: str) -> Machine:
        return {"conn": self.model.connection, "ctx": self.model.context, "run": self.model.run,
                "event": self.model.delivery}[family]


def _show(system: System, family: str, cfg: Config) -> str:
    return system.machine(family).describe(cfg)


# The connection half of server_send_failed (its event half is the delivery machine's send_failed).
SEND_ERROR = Action("server_send_failed", "server", "conn", (Fires("conn", ("send_error",)),),
                     doc="the connection half of server_send_failed")
_NO_ACTION = Action("", "server", "", ())

_APPEND = Transition(APPEND, Delivery.PENDING, Delivery.PENDING, doc="appended to the durable stream")


def _set(tup: tuple, index: int, value: object) -> tuple:  # type: ignore[type-arg]
    return (*tup[:index], value, *tup[index + 1:])


def with_model(system: System, model: SystemModel) -> System:
    return replace(system, model=model)


__all__ = [
    "CLIENT_CONN_ACTIONS", "SERVER_CONN_ACTIONS", "Bounds", "Ctx", "Firing", "Run", "State", "Step",
    "System", "SystemModel", "reference_model",
]
