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

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

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
        return self._live(state.conns[session])

    def has_session(self, state: State, user: int) -> bool:
        """Some session routed to ``user``'s stream is READY and acked: it can take an event now."""
        return self._has_session(_StateReads(self, state), user)

    def account_full(self, state: State) -> bool:
        return self._account_full(_StateReads(self, state))

    def delivered_prefix(self, state: State, user: int) -> int:
        """Highest seq N such that the client has received every event 1..N of ``user``'s stream."""
        return self._delivered_prefix(_StateReads(self, state), user)

    # The same facts over ``_Reads``: the rules below read a state only through that interface,
    # so the explorer's fast path (model/check/compiled.py) can see exactly what each one read.
    @staticmethod
    def _live(conn: Config) -> bool:
        return conn[0] is Conn.READY and bool(conn[1][ACK_SENT])

    def _has_session(self, v: _Reads, user: int) -> bool:
        return any(self._live(v.conn(s)) and v.routed(s, user) for s in range(self.bounds.sessions))

    def _account_full(self, v: _Reads) -> bool:
        # One account holds every user in the finite instance: the per-account limit is global.
        total = sum(int(v.ctx(u)[1][CONNS]) for u in range(self.bounds.users))
        return total >= self.bounds.max_connections_per_account

    def _delivered_prefix(self, v: _Reads, user: int) -> int:
        n = 0
        for i in range(v.stream_len(user)):
            if not v.event(user, i)[1][DELIVERED]:
                break
            n += 1
        return n

    # -- the successor function ----------------------------------------------------------------
    def successors(self, state: State) -> Iterator[Step]:
        """Every step enabled in ``state``: the rules of :func:`_rules` in order, each yielding
        its local steps, applied to ``state``."""
        v = _StateReads(self, state)
        for rule, arg in _rules(self.bounds):
            for local in rule(self, v, *arg):
                yield Step(local.action, local.actor, local.args, local.firings, _apply(state, local.writes))

    def _fire(self, machine: Machine, cfg: Config, event: str, inputs: dict[str, bool] | None = None
              ) -> list[tuple[Transition, Config]]:
        if event not in machine.events_from[cfg[0]]:
            return []
        return machine.fire_all(cfg, event, inputs)

    def _conn_steps(self, v: _Reads, s: int, ca: Action, name: str | None = None) -> Iterator[_Local]:
        """Fire a ``conn`` action's connection event alone, detaching from the context when an
        attached socket closes (model/composition.py)."""
        m = self.model
        event, action, actor = ca.event, name or ca.name, ca.actor
        conn = v.conn(s)
        if event not in m.connection.events_from[conn[0]]:
            return
        if ca.inputs:
            fired = [(t, after) for inputs in input_choices(ca)
                     for t, after in m.connection.fire_all(conn, event, inputs) if reads_inputs(t, inputs)]
        else:
            fired = m.connection.fire_all(conn, event)  # the one choice, {}, which every guard reads
        for t, after in fired:
            firings = [Firing("conn", (s,), t, conn, after)]
            writes: list[_Write] = [("conns", s, after)]
            if conn[0] in ATTACHED and t.target not in ATTACHED:
                u = self.owner(s)
                ctx = v.ctx(u)
                det = self._fire(m.context, ctx, "detach")
                if not det:
                    continue  # the registry refuses: no consistent successor (caught by invariants)
                dt, dafter = det[0]
                firings.append(Firing("ctx", (u,), dt, ctx, dafter))
                writes.append(("ctxs", u, dafter))
            yield _Local(action, actor, (s,), tuple(firings), tuple(writes))

    def _client_conn_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        conn = v.conn(s)
        if not self.model.connection.events_from[conn[0]]:
            return  # a closed socket does nothing
        for ca in CLIENT_CONN_ACTIONS:
            if not ca.flag or getattr(self.bounds, ca.flag):
                yield from self._conn_steps(v, s, ca)
            if ca.name == "client_init" and conn[0] is Conn.OPEN:
                prefix = self._delivered_prefix(v, self.owner(s))
                if prefix > 0:
                    for local in self._conn_steps(v, s, ca, "client_init_resume"):
                        yield local._replace(writes=(*local.writes, ("resume", s, prefix)))

    def _client_ack_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        conn = v.conn(s)
        if self.model.connection.events_from[conn[0]] and self._live(conn):
            yield from self._ack_steps(v, s)

    def _client_cancel_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        conn = v.conn(s)
        if not (self.model.connection.events_from[conn[0]] and self._live(conn)):
            return
        u = self.owner(s)
        cfg = v.run(u)
        for t, after in self._fire(self.model.run, cfg, "cancel"):
            yield _Local("client_cancel", "client", (s,), (Firing("run", (u,), t, cfg, after),), (("runs", u, after),))

    def _ack_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        """Cumulative acks through seq n, for any stream this session is routed to."""
        for u in range(self.bounds.users):
            if not v.routed(s, u):
                continue
            prefix = self._delivered_prefix(v, u)
            for n in range(1, prefix + 1):
                if v.event(u, n - 1)[0] in self.model.delivery.terminal:
                    continue
                for firings, writes in self._ack_through(v, u, n):
                    yield _Local("client_ack", "client", (s, u, n), firings, writes)

    def _ack_through(self, v: _Reads, u: int, n: int) -> Iterator[tuple[tuple[Firing, ...], tuple[_Write, ...]]]:
        """The effect of a cumulative ack through ``n``: one outcome, or none when the ack could
        not have been sent (it names an event the client never received)."""
        firings: list[Firing] = []
        writes: list[_Write] = []
        for i in range(n):
            cfg = v.event(u, i)
            if cfg[0] in self.model.delivery.terminal:
                continue
            fired = self._fire(self.model.delivery, cfg, "ack")
            if not fired:
                return
            t, after = fired[0]
            firings.append(Firing("event", (u, i + 1), t, cfg, after))
            writes.append(("events", (u, i), after))
        yield tuple(firings), tuple(writes)

    def _resolve_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        """Atomic get-or-create of the user's context, then READY (or a limit rejection)."""
        m = self.model
        conn = v.conn(s)
        if not m.connection.events_from[conn[0]]:
            return
        if not m.connection.transitions_from(conn[0], "auth_ok") and not m.connection.transitions_from(
            conn[0], "limit_reject"
        ):
            return
        u = self.owner(s)
        full = v.account_full()
        ctx = v.ctx(u)
        for event in ("create", "attach", "reject_limit"):
            for ct, cafter in self._fire(m.context, ctx, event, {"account_full": full}):
                conn_event = "limit_reject" if event == "reject_limit" else "auth_ok"
                for t, after in self._fire(m.connection, conn, conn_event):
                    firings = (Firing("ctx", (u,), ct, ctx, cafter), Firing("conn", (s,), t, conn, after))
                    writes: tuple[_Write, ...] = (
                        ("conns", s, after), ("ctxs", u, cafter),
                        ("epoch_seen", s, int(cafter[1][EPOCH]) if conn_event == "auth_ok" else 0),
                    )
                    if conn_event == "auth_ok":
                        resume = v.resume(s)
                        if resume > 0:
                            # Resume acks everything through last_seq (section 5).
                            for acks, events in self._ack_through(v, u, resume):
                                yield _Local("server_resolve", "server", (s,), (*firings, *acks), (*writes, *events))
                            continue
                    yield _Local("server_resolve", "server", (s,), firings, writes)

    def _server_conn_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        if not self.model.connection.events_from[v.conn(s)[0]]:
            return
        for ca in SERVER_CONN_ACTIONS:
            if not ca.flag or getattr(self.bounds, ca.flag):
                yield from self._conn_steps(v, s, ca)

    def _send_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        """Write the oldest sendable event of a routed stream; the write may succeed or fail."""
        m = self.model
        conn = v.conn(s)
        if not m.connection.events_from[conn[0]]:
            return
        delivers = self._fire(m.connection, conn, "deliver")
        if not delivers:
            return  # nothing can be written on this socket (read first: it is the cheapest test)
        for u in range(self.bounds.users):
            if not v.routed(s, u):
                continue
            for i in range(v.stream_len(u)):
                cfg = v.event(u, i)
                sends = self._fire(m.delivery, cfg, "send")
                if not sends:
                    continue
                for ct, cafter in delivers:
                    for t, after in sends:
                        firings = (Firing("conn", (s,), ct, conn, cafter), Firing("event", (u, i + 1), t, cfg, after))
                        yield _Local("server_send", "server", (s, u, i + 1), firings,
                                     (("conns", s, cafter), ("events", (u, i), after)))
                    for ft, fafter in self._fire(m.delivery, cfg, "send_failed"):
                        for local in self._conn_steps(v, s, SEND_ERROR, "server_send_failed"):
                            yield _Local("server_send_failed", "server", (s, u, i + 1),
                                         (*local.firings, Firing("event", (u, i + 1), ft, cfg, fafter)),
                                         (*local.writes, ("events", (u, i), fafter)))
                break  # in order: only the oldest sendable event of a stream goes next

    def _expire_steps(self, v: _Reads, u: int) -> Iterator[_Local]:
        cfg = v.ctx(u)
        for t, after in self._fire(self.model.context, cfg, "expire"):
            yield _Local("server_expire_context", "server", (u,), (Firing("ctx", (u,), t, cfg, after),),
                         (("ctxs", u, after),))

    def _run_steps(self, v: _Reads, u: int) -> Iterator[_Local]:
        m = self.model
        if v.ctx(u)[0] is not Ctx.LIVE:
            return  # a run belongs to a live context
        if 0 <= self.bounds.runs <= u:
            return
        cfg = v.run(u)
        for event in m.run.events:
            if event == "cancel":
                continue  # the client's action
            for t, after in self._fire(m.run, cfg, event):
                firings = [Firing("run", (u,), t, cfg, after)]
                writes: list[_Write] = [("runs", u, after)]
                if event in AGENT_EVENTS:
                    # An emission that leaves the run unfinished keeps one slot for its terminal
                    # event, so every run can finish within the bounds.
                    appended = v.stream_len(u)
                    room = self.bounds.events_per_user - appended - (0 if t.target in m.run.terminal else 1)
                    if room <= 0:
                        continue
                    new = m.delivery.initial_config()
                    firings.append(Firing("event", (u, appended + 1), _APPEND, new, new))
                    writes += [("events", (u, appended), new), ("kinds", u, (*v.kinds(u), event))]
                yield _Local(f"server_run_{event}", "server", (u,), tuple(firings), tuple(writes))

    def _timeout_steps(self, v: _Reads, u: int, i: int) -> Iterator[_Local]:
        """The deadlines of event ``i`` of ``user``'s stream (one rule per stream slot)."""
        if i >= v.stream_len(u):
            return
        m = self.model
        cfg = v.event(u, i)
        events = [e for e in ("ack_timeout", "no_session_timeout") if e in m.delivery.events_from[cfg[0]]]
        if not events:
            return
        has = v.has_session(u)
        for event in events:
            for t, after in m.delivery.fire_all(cfg, event, {"has_session": has}):
                yield _Local(f"server_{event}", "server", (u, i + 1), (Firing("event", (u, i + 1), t, cfg, after),),
                             (("events", (u, i), after),))

    def _clock_steps(self, v: _Reads) -> Iterator[_Local]:
        """Model time passes for every live event at once, unless a deadline is due."""
        m = self.model
        firings: list[Firing] = []
        writes: list[_Write] = []
        for u in range(self.bounds.users):
            has: bool | None = None
            for i in range(v.stream_len(u)):
                cfg = v.event(u, i)
                if cfg[0] in m.delivery.terminal:
                    continue
                if has is None:
                    has = v.has_session(u)
                fired = self._fire(m.delivery, cfg, "tick", {"has_session": has})
                if not fired:
                    return
                t, after = fired[0]
                firings.append(Firing("event", (u, i + 1), t, cfg, after))
                writes.append(("events", (u, i), after))
        if firings:
            yield _Local("tick", "clock", (), tuple(firings), tuple(writes))

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


_Write = tuple[str, Any, Any]
"""One component a step changes: (State field, index, new value). ``events`` is indexed by
(user, position); a position equal to the stream's length appends."""


class _Local(NamedTuple):
    """A step as a rule yields it: what it fired and what it writes, not yet applied to a state."""

    action: str
    actor: str
    args: tuple[int, ...]
    firings: tuple[Firing, ...]
    writes: tuple[_Write, ...]


class _Reads(Protocol):
    """What a rule may read of a global state, one component at a time (docs/model.md, "explorer").

    The rules read a state only through this interface. ``System.successors`` reads a ``State``
    (:class:`_StateReads`); the explorer's fast path (model/check/compiled.py) reads its interned
    encoding and records every read, so it can reuse a rule's result for every state that agrees
    on what the rule read. ``has_session``, ``account_full`` and ``routed`` are the derived facts
    (System._has_session, System._account_full, the model's route function).
    """

    def conn(self, s: int) -> Config: ...
    def ctx(self, u: int) -> Config: ...
    def run(self, u: int) -> Config: ...
    def stream_len(self, u: int) -> int: ...
    def event(self, u: int, i: int) -> Config: ...
    def kinds(self, u: int) -> tuple[str, ...]: ...
    def resume(self, s: int) -> int: ...
    def has_session(self, u: int) -> bool: ...
    def account_full(self) -> bool: ...
    def routed(self, s: int, u: int) -> bool: ...


class _StateReads:
    """:class:`_Reads` over a ``State``."""

    __slots__ = ("state", "system")

    def __init__(self, system: System, state: State) -> None:
        self.system = system
        self.state = state

    def conn(self, s: int) -> Config:
        return self.state.conns[s]

    def ctx(self, u: int) -> Config:
        return self.state.ctxs[u]

    def run(self, u: int) -> Config:
        return self.state.runs[u]

    def stream_len(self, u: int) -> int:
        return len(self.state.events[u])

    def event(self, u: int, i: int) -> Config:
        return self.state.events[u][i]

    def kinds(self, u: int) -> tuple[str, ...]:
        return self.state.kinds[u]

    def resume(self, s: int) -> int:
        return self.state.resume[s]

    def has_session(self, u: int) -> bool:
        return self.system._has_session(self, u)

    def account_full(self) -> bool:
        return self.system._account_full(self)

    def routed(self, s: int, u: int) -> bool:
        return self.system.model.route(self.system, self.state, s, u)


_Rule = Callable[..., Iterator[_Local]]


@functools.cache
def _rules(bounds: Bounds) -> tuple[tuple[_Rule, tuple[int, ...]], ...]:
    """The successor function's rules in the order ``System.successors`` yields their steps:
    per session the client's actions, then per session the server's, then per user the run,
    the context's expiry and each stream slot's deadlines, then the clock. Each rule is a
    ``System`` method and its arguments; the fast explorer memoizes each one separately."""
    client = (System._client_conn_steps, System._client_ack_steps, System._client_cancel_steps)
    server = (System._resolve_steps, System._server_conn_steps, System._send_steps)
    out: list[tuple[_Rule, tuple[int, ...]]] = []
    out += [(rule, (s,)) for s in range(bounds.sessions) for rule in client]
    out += [(rule, (s,)) for s in range(bounds.sessions) for rule in server]
    for u in range(bounds.users):
        out += [(System._expire_steps, (u,)), (System._run_steps, (u,))]
        out += [(System._timeout_steps, (u, i)) for i in range(bounds.events_per_user)]
    if bounds.clock:
        out.append((System._clock_steps, ()))
    return tuple(out)


_FIELD: dict[str, int] = {name: k for k, name in enumerate(State._fields)}
_EVENTS = _FIELD["events"]


def _apply(state: State, writes: tuple[_Write, ...]) -> State:
    """``state`` with ``writes`` applied, in order (Hypothesis and the reference explorer call
    this once per step, so it rebuilds only the tuples a write touches)."""
    parts: list[Any] = list(state)
    for name, index, value in writes:
        k = _FIELD[name]
        if k == _EVENTS:
            u, i = index
            events = parts[k]
            stream = events[u]
            stream = (*stream, value) if i == len(stream) else (*stream[:i], value, *stream[i + 1:])
            parts[k] = (*events[:u], stream, *events[u + 1:])
        else:
            field = parts[k]
            parts[k] = (*field[:index], value, *field[index + 1:])
    return State._make(parts)


def with_model(system: System, model: SystemModel) -> System:
    return replace(system, model=model)


__all__ = [
    "CLIENT_CONN_ACTIONS", "SERVER_CONN_ACTIONS", "Bounds", "Ctx", "Firing", "Run", "State", "Step",
    "System", "SystemModel", "reference_model",
]
