"""The composed system as Promela, generated from the one declaration (docs/proofs.md, "The SPIN engine").

``generate(system)`` reads a :class:`~pipeproof.model.system.System` (its ``SystemModel``, so every
mutant, and its ``Bounds``) and writes one Promela process whose reachable states and transitions are
exactly the explorer's (model/check/explorer.py):

- **state vector**: one global per field of :class:`~pipeproof.model.system.State` at these bounds:
  each session's connection configuration, each user's context and run configuration, each user's
  stream as ``events_per_user`` delivery slots plus its length and its event kinds, each session's
  resume claim and context epoch. Slots past a stream's length keep the delivery machine's initial
  configuration and kind 0, and no other variable is in the vector (property flags and
  temporaries are ``hidden``), so the map from an explorer ``State`` to a Promela state
  (``encode``) is a bijection on the reachable states. Each variable is an ``unsigned`` of the
  bits its machine needs for the values it reaches alone (``_types``);
- **one do-option per explorer step**: a system action of model/composition.py at concrete
  arguments, with each component transition it may fire chosen statically where the explorer tries
  every enabled transition (``fire_all``) and as an in-order chain where it takes the first enabled
  one (cumulative acks, the clock tick, the detach of a closing socket). Each option is one
  ``d_step`` whose first statement is the option's whole enabling condition, so one explorer
  ``Step`` is one atomic SPIN transition and the counts agree (pan reports one more transition:
  the initial state it stores);
- guards and updates are folded from the declared ``Expr`` trees (``Expr.translate``, the fold the
  Z3 encoding uses), parameters inlined from the machines at these bounds; the glue (resolve,
  send/send_failed of the oldest sendable event, cumulative acks, resume, run appends with the room
  rule, the clock tick, detach on close, routing) is generated here, mirroring model/system.py
  action by action. A routing function this module has no mirror for is an error, never a guess;
- **properties**: every invariant of model/invariants.py becomes assertions: step properties
  inside each step, on the firings and their before-state; state properties in one more option,
  enabled only in a state that violates one (so it adds no transition where they hold);
  quiescence in a ``timeout`` option. Each property has a hidden flag so pan reports its first
  violation once and goes on (``-c0 -e``: one trail per violated property). ``#define ONLY k``
  arms only property ``k`` (1-based in ``PromelaModel.properties``) so a trail replays to its own
  violation.

Each option prints ``STEP <id>``: a replayed trail names its options, and ``PromelaModel.options``
maps an id back to the action, its arguments and its statically chosen transitions
(model/check/spin.py turns that back into explorer steps).
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from pipeproof.errors import ModelDefinitionError
from pipeproof.model import mutants
from pipeproof.model.composition import CLIENT_CONN_ACTIONS, SERVER_CONN_ACTIONS, Action
from pipeproof.model.connection import ACK_SENT, ATTACHED, CONNECTION, HANDLE_EVENTS, Conn
from pipeproof.model.context import CONNS, EPOCH, INSTANCES, Ctx
from pipeproof.model.delivery import AGE, ATTEMPT, DELIVERED, RANK, Delivery
from pipeproof.model.expr import Expr, Ops, Value
from pipeproof.model.invariants import INVARIANTS
from pipeproof.model.run import AGENT_EVENTS, CANCEL_REQUESTED, TERMINAL_EVENTS
from pipeproof.model.spec import Config, Kind, Machine, Transition
from pipeproof.model.system import NODE_LOST, SEND_ERROR, State, System, input_choices, reads_inputs, same_user
from pipeproof.protocol import Property

RANGE = "value_out_of_range"
"""The flag raised when a computed value does not fit its Promela type: the encoding, not the model,
is at fault, so a run that raises it is inconclusive."""
STATE_CHECK = "state_check"
"""The action name of the option that checks the state properties (no explorer step)."""
QUIESCENT = "quiescent"
"""The action name of the option that checks quiescence (``timeout``: no other option enabled)."""


@dataclass(frozen=True)
class Choice:
    """A component transition an option fires by construction (not by an in-order chain)."""

    family: str
    index: tuple[int, ...]
    transition: Transition


@dataclass(frozen=True)
class Option:
    """One do-option of the generated process: one kind of explorer step at concrete arguments."""

    id: int
    action: str
    args: tuple[int, ...]
    choices: tuple[Choice, ...]


@dataclass(frozen=True)
class PromelaModel:
    """The generated program and what is needed to read its trails back."""

    text: str
    options: tuple[Option, ...]
    properties: tuple[str, ...]  # flag k+1 of ``ONLY`` is properties[k]; RANGE is last
    untranslated: tuple[str, ...]  # invariants without a Promela form (reported unknown, never holds)
    model_name: str

    def is_check(self, oid: int) -> bool:
        """Whether option ``oid`` checks properties instead of taking an explorer step."""
        return self.options[oid].action in (STATE_CHECK, QUIESCENT)


# -- expressions --------------------------------------------------------------------------------


def _const(v: Value) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v) if v >= 0 else f"({v})"


_PROMELA_OPS: dict[str, str] = {"and": "&&", "or": "||"}
OPS = Ops(
    binop=lambda op, a, b: f"({a} {_PROMELA_OPS.get(op, op)} {b})",
    neg=lambda a: f"(!{a})",
    ite=lambda c, a, b: f"({c} -> {a} : {b})",
    const=_const,
)
"""The Promela fold of an ``Expr`` (``Expr.translate``): every node parenthesised, so precedence
never matters; if-then-else is Promela's conditional expression."""


def _all(parts: Sequence[str]) -> str:
    kept = [p for p in parts if p != "1"]
    if "0" in kept:
        return "0"
    return "(" + " && ".join(kept) + ")" if kept else "1"


def _any(parts: Sequence[str]) -> str:
    kept = [p for p in parts if p != "0"]
    if "1" in kept:
        return "1"
    return "(" + " || ".join(kept) + ")" if kept else "0"


def _not(p: str) -> str:
    return {"1": "0", "0": "1"}.get(p, f"(!{p})")


# -- the generator ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Firing:
    """A component transition at a concrete component, with its inputs as Promela expressions."""

    family: str
    index: tuple[int, ...]
    machine: Machine
    transition: Transition
    inputs: Mapping[str, str]


@dataclass(frozen=True)
class _Chain:
    """The explorer's "first enabled transition of ``event``" for one component, applied when
    ``when`` holds; ``required``: the step exists only if some transition is enabled then."""

    family: str
    index: tuple[int, ...]
    event: str
    inputs: Mapping[str, str]
    when: str
    required: bool = True


@dataclass
class _Draft:
    """One option being built: its enabling conditions, the transitions it fires by construction,
    its in-order chains and the glue's own writes (``extra``)."""

    action: str
    args: tuple[int, ...]
    guard: list[str] = field(default_factory=list)
    static: list[_Firing] = field(default_factory=list)
    chains: list[_Chain] = field(default_factory=list)
    extra: list[tuple[str, str]] = field(default_factory=list)  # (variable, value on the pre-state)
    sessions: list[int] = field(default_factory=list)  # sessions the step reads through
    ack_session: int | None = None

    def copy(self) -> _Draft:
        return _Draft(self.action, self.args, list(self.guard), list(self.static), list(self.chains),
                      list(self.extra), list(self.sessions), self.ack_session)


class _Gen:
    """Writes the Promela for one System (model/system.py is the reference for every routine)."""

    def __init__(self, system: System, *, trace_states: bool = False) -> None:
        self.system = system
        self.trace_states = trace_states
        self.b = system.bounds
        self.m = system.model
        self.route = _route_table(system)
        self.K = self.b.events_per_user
        self.S = self.b.sessions
        self.U = self.b.users
        self.N = self.b.nodes
        # Nodes (docs/model.md, "nodes"): a one-node instance has no node variables at all (its
        # leases are a function of the rest), so its program is the one it always was.
        self.multi = self.N > 1
        self.machines: dict[str, Machine] = {"conn": self.m.connection, "ctx": self.m.context,
                                             "run": self.m.run, "event": self.m.delivery}
        self.temps = 0
        self.max_temps = 0
        self.types = {family: _types(m) for family, m in self.machines.items()}
        names = {i.name for i in INVARIANTS}
        self.props: tuple[str, ...] = tuple(p for p in _TRANSLATED if p in names)
        self.untranslated = tuple(i.name for i in INVARIANTS if i.name not in _TRANSLATED)

    # -- names -------------------------------------------------------------------------------
    def var(self, family: str, index: tuple[int, ...], name: str) -> str:
        if family == "event":
            return f"ev{index[0]}_{index[1]}_{name}"
        return f"{family}{index[0]}_{name}"

    def st(self, family: str, index: tuple[int, ...]) -> str:
        return self.var(family, index, "st")

    def const(self, family: str, state: enum.Enum) -> str:
        return f"{family.upper()}_{state.name}"

    def is_in(self, family: str, index: tuple[int, ...], states: object) -> str:
        members = [s for s in self.machines[family].states if s in states]  # type: ignore[operator]
        return _any([f"({self.st(family, index)} == {self.const(family, s)})" for s in members])

    def ev(self, u: int, i: int) -> tuple[int, int]:
        """The event at 0-based position ``i`` of ``u``'s stream (named by its seq)."""
        return (u, i + 1)

    def length(self, u: int) -> str:
        return f"len{u}"

    # -- derived facts (model/system.py) -------------------------------------------------------
    def live(self, s: int) -> str:
        ack = self.m.connection.var_names[ACK_SENT]
        return f"({self.st('conn', (s,))} == {self.const('conn', Conn.READY)} && {self.var('conn', (s,), ack)})"

    def has_session(self, u: int) -> str:
        if self.multi and self.m.session_view == "owner_node":
            low = self.lowest("holds", u)
            return _any([_all([f"({low} == {s % self.N})", self.live(s)]) for s in range(self.S) if self.route(s, u)])
        return _any([_all([self.live(s), self.node_up(s)]) for s in range(self.S) if self.route(s, u)])

    def account_full(self, s: int) -> str:
        if self.m.limit_count == "per_node":
            mine = [f"({self.is_in('conn', (x,), ATTACHED)} -> 1 : 0)" for x in range(s % self.N, self.S, self.N)]
            return f"(({' + '.join(mine)}) >= {self.b.max_connections_per_account})"
        conns = self.m.context.var_names[CONNS]
        total = " + ".join(self.var("ctx", (u,), conns) for u in range(self.U))
        return f"(({total}) >= {self.b.max_connections_per_account})"

    # -- nodes (model/system.py, "nodes") ------------------------------------------------------
    def up(self, n: int) -> str:
        return f"up{n}"

    def node_up(self, s: int) -> str:
        """The session's node is alive ("1" with one node)."""
        return self.up(s % self.N) if self.multi else "1"

    def bit(self, name: str, u: int, n: int) -> str:
        return f"{name}{u}_{n}"

    def holder_live(self, name: str, u: int) -> str:
        """Some live node acts as ``u``'s delivery owner (``holds``) or run holder (``rholds``)."""
        if not self.multi:
            return "1"  # node 0, from the first append on (delivery) or always (the run)
        return _any([_all([self.bit(name, u, n), self.up(n)]) for n in range(self.N)])

    def lowest(self, name: str, u: int) -> str:
        """The lowest live node with ``name``'s bit for ``u`` (-1: none), as one expression."""
        out = "(-1)"
        for n in range(self.N - 1, -1, -1):
            out = f"(({self.bit(name, u, n)} && {self.up(n)}) -> {n} : {out})"
        return out

    def lease_dead_or_free(self, u: int) -> str:
        """The store's delivery lease of ``u`` is free (0: the holder plus one) or names a dead node."""
        return _any([f"(lease{u} == 0)", *(f"((lease{u} == {n + 1}) && !{self.up(n)})" for n in range(self.N))])

    def terminal(self, u: int, i: int) -> str:
        return self.is_in("event", self.ev(u, i), self.m.delivery.terminal)

    def in_stream(self, u: int, i: int) -> str:
        return f"({self.length(u)} > {i})"

    def prefix_at_least(self, u: int, n: int) -> str:
        delivered = self.m.delivery.var_names[DELIVERED]
        return _all([f"({self.length(u)} >= {n})",
                     *(self.var("event", self.ev(u, i), delivered) for i in range(n))])

    def prefix(self, u: int) -> str:
        return "(" + " + ".join(f"({self.prefix_at_least(u, n)} -> 1 : 0)" for n in range(1, self.K + 1)) + ")"

    def active_conn(self) -> frozenset[enum.Enum]:
        """Connection states a socket acts in (the explorer skips a session with no event)."""
        return frozenset(st for st, evs in self.m.connection.events_from.items() if evs)

    # -- machine transitions -------------------------------------------------------------------
    def firing(self, family: str, index: tuple[int, ...], t: Transition,
               inputs: Mapping[str, str] | None = None) -> _Firing:
        m = self.machines[family]
        given = {k: _const(v) for k, v in m.input_defaults.items()}
        given.update(inputs or {})
        return _Firing(family, index, m, t, given)

    def leaf(self, f: _Firing) -> Callable[[str, str], str]:
        def leaf(kind: str, name: str) -> str:
            if kind == "var":
                return self.var(f.family, f.index, name)
            if kind == "param":
                return _const(f.machine.params[name])
            if name not in f.inputs:
                raise ModelDefinitionError(f.machine.name, "promela_inputs",
                                           f"transition {f.transition.key} reads input {name!r}, which the "
                                           "system does not supply to this event")
            return f.inputs[name]

        return leaf

    def expr(self, f: _Firing, e: Expr) -> str:
        text: str = e.translate(self.leaf(f), OPS)
        return text

    def enabled(self, f: _Firing) -> str:
        t = f.transition
        return _all([f"({self.st(f.family, f.index)} == {self.const(f.family, t.source)})", self.expr(f, t.guard)])

    def post(self, f: _Firing, name: str) -> str:
        """The value of variable ``name`` after ``f``, as an expression on the pre-state."""
        for n, e in f.transition.assignments:
            if n == name:
                return self.expr(f, e)
        return self.var(f.family, f.index, name)

    def transitions(self, family: str, event: str) -> list[Transition]:
        """The machine's transitions of ``event`` in declaration order (what ``fire_all`` tries)."""
        return [t for t in self.machines[family].transitions if t.event == event]

    def assignments(self, f: _Firing) -> list[tuple[str, str, _Type]]:
        """(variable, value, type) written by ``f``; the type is the range check the value needs."""
        out = [(self.st(f.family, f.index), self.const(f.family, f.transition.target), _STATE)]
        types = self.types[f.family]
        for name, e in f.transition.assignments:
            out.append((self.var(f.family, f.index, name), self.expr(f, e), types[name]))
        return out

    # -- step properties (model/invariants.py, the step_check of each) ---------------------------
    def step_violations(self, f: _Firing, d: _Draft) -> list[tuple[str, str]]:
        """(property, condition on the pre-state) for each step property ``f`` may violate inside
        option ``d``; "1" where the transition alone decides it."""
        t = f.transition
        out: list[tuple[str, str]] = []
        if f.family == "conn":
            ack = self.var("conn", f.index, self.m.connection.var_names[ACK_SENT])
            if t.event in HANDLE_EVENTS:
                out.append((Property.NO_MESSAGE_BEFORE_READY, "1" if t.source is not Conn.READY else _not(ack)))
            if t.event == "send_ack" and t.source is not Conn.READY:
                out.append((Property.READY_BEFORE_ACK, "1"))
            if t.event in _TIMEOUT_EVENTS and (t.target is not Conn.CLOSED or t.close is None):
                out.append((TIMEOUTS_CLOSE, "1"))
        elif f.family == "event":
            if t.event == "send" and t.source in self.m.delivery.terminal:
                out.append((Property.ACKED_NEVER_RESENT, "1"))
            src, dst = Delivery(t.source.value), Delivery(t.target.value)
            if RANK[dst] < RANK[src] or (src in self.m.delivery.terminal and dst is not src):
                out.append((Property.MONOTONIC_EVENT_STATE, "1"))
            sessions = [*d.sessions, *(() if d.ack_session is None else (d.ack_session,))]
            if any(self.system.owner(s) != f.index[0] for s in sessions):
                out.append((Property.NO_CROSS_USER_READ, "1"))
            if t.event == "no_session_timeout" and t.target is Delivery.ESCALATED:
                ready = _any([_all([self.live(s), self.node_up(s)]) for s in self.system.sessions_of(f.index[0])])
                out.append((Property.NO_SESSION_ONLY_WHEN_NONE_READY, ready))
        elif f.family == "ctx":
            if t.event in ("create", "attach") and not (t.source is Ctx.LIVE and t.event == "attach"):
                epoch = self.m.context.var_names[EPOCH]
                out.append((Property.EXPIRED_CONTEXT_NEVER_REUSED,
                            f"({self.post(f, epoch)} <= {self.var('ctx', f.index, epoch)})"))
        elif f.family == "run" and t.event == "agent_started":
            out.append((Property.CANCEL_BEFORE_START_WINS,
                        self.var("run", f.index, self.m.run.var_names[CANCEL_REQUESTED])))
        return [(p, c) for p, c in out if p in self.props and c != "0"]

    # -- state properties (model/invariants.py, the state_check of each) -------------------------
    def state_violations(self) -> list[tuple[str, str]]:
        """(property, condition) pairs: the state violates the property when a condition holds."""
        out: list[tuple[str, str]] = []
        conn, ctx, dl = self.m.connection, self.m.context, self.m.delivery
        ack = conn.var_names[ACK_SENT]
        for s in range(self.S):
            ok = self.is_in("conn", (s,), {Conn.READY, Conn.DRAINING, Conn.CLOSED})
            out.append((Property.READY_BEFORE_ACK, _all([self.var("conn", (s,), ack), _not(ok)])))
        horizon = int(dl.params["horizon"])
        cap = int(dl.params["max_attempts"])
        names = dl.var_names
        for u in range(self.U):
            for i in range(self.K):
                e = self.ev(u, i)
                acked = f"({self.st('event', e)} == {self.const('event', Delivery.ACKED)})"
                never = _all([acked, _not(self.var("event", e, names[DELIVERED]))])
                late = f"({self.var('event', e, names[AGE])} > {horizon})"
                live = _all([self.in_stream(u, i), _not(self.terminal(u, i))])
                out.append((Property.EVERY_EVENT_ACKED_OR_ESCALATED,
                            _any([_all([self.in_stream(u, i), never]),
                                  _all([live, _any([late, _not(self.can_progress(u, i))])])])))
                out.append((Property.ATTEMPTS_BOUNDED,
                            _all([self.in_stream(u, i), f"({self.var('event', e, names[ATTEMPT])} > {cap})"])))
        cn = ctx.var_names
        for u in range(self.U):
            epoch, conns, inst = (self.var("ctx", (u,), cn[k]) for k in (EPOCH, CONNS, INSTANCES))
            mine = list(self.system.sessions_of(u))
            live_ctx = f"({self.st('ctx', (u,))} == {self.const('ctx', Ctx.LIVE)})"
            bad = [f"({inst} > 1)", f"({live_ctx} != ({inst} == 1))"]
            bad += [_all([self.is_in("conn", (s,), ATTACHED), f"(epoch_seen{s} != {epoch})"]) for s in mine]
            out.append((Property.ONE_CONTEXT_PER_USER, _any(bad)))
            attached = " + ".join(f"({self.is_in('conn', (s,), ATTACHED)} -> 1 : 0)" for s in mine) or "0"
            out.append((Property.CONNECTION_LIMITS_RESPECTED,
                        _any([f"({conns} > {self.b.max_connections_per_user})", f"({conns} != ({attached}))"])))
            out.append((Property.RUN_EVENTS_WELL_ORDERED, self.ill_ordered(u)))
        total = " + ".join(self.var("ctx", (u,), cn[CONNS]) for u in range(self.U))
        out.append((Property.CONNECTION_LIMITS_RESPECTED, f"(({total}) > {self.b.max_connections_per_account})"))
        if self.multi:
            for u in range(self.U):
                for name in ("holds", "rholds"):
                    out.append((Property.ONE_LIVE_OWNER, _any([
                        _all([self.bit(name, u, a), self.up(a), self.bit(name, u, b), self.up(b)])
                        for a, b in itertools.combinations(range(self.N), 2)])))
        return [(p, c) for p, c in out if p in self.props and c != "0"]

    def can_progress(self, u: int, i: int) -> str:
        """invariants._can_progress: a timeout or tick enabled, or a send on a live session."""
        has = self.has_session(u)
        e = self.ev(u, i)
        ticks = [self.enabled(self.firing("event", e, t, {"has_session": has}))
                 for t in self.transitions("event", "tick")]
        moves = [self.enabled(self.firing("event", e, t, {"has_session": has}))
                 for ev in ("ack_timeout", "no_session_timeout") for t in self.transitions("event", ev)]
        sends = [self.enabled(self.firing("event", e, t)) for t in self.transitions("event", "send")]
        return _any([*ticks, _all([self.can_decide(u), _any([*moves, _all([has, _any(sends)])])])])

    def can_decide(self, u: int) -> str:
        """System.can_decide: a live node owns ``u``'s delivery, or one could adopt it now."""
        if not self.multi:
            return "1"  # node 0 owns every stream with an event
        owner = self.holder_live("holds", u)
        free = self.may_take(u)
        return _any([owner, *(_all([self.up(n), _not(self.bit("holds", u, n)), free]) for n in range(self.N))])

    def may_take(self, u: int) -> str:
        """System._may_take: the compare-and-set finds the lease free, or a dead holder (when
        survivors adopt); without compare-and-set, always."""
        if not self.m.cas:
            return "1"
        return self.lease_dead_or_free(u) if self.m.adopt else f"(lease{u} == 0)"

    def ill_ordered(self, u: int) -> str:
        """invariants.well_ordered(kinds) != "" for ``u``'s stream, as one expression.

        The function stops at the first problem, but each position's check reads only the kinds
        before it and whether a tool is open there, and "a tool is open before i" is "some
        tool_executing before i with no tool_completed after it" whether or not an earlier
        position had a problem. So "some position has a problem" is exactly "a problem is found".
        """
        k = [f"kind{u}_{i + 1}" for i in range(self.K)]
        n = self.length(u)
        started, failed = _kind("agent_started"), _kind("agent_failed")
        executing, completed = _kind("tool_executing"), _kind("tool_completed")

        def is_(i: int, kind: str) -> str:
            return f"({k[i]} == {kind})"

        def terminal(i: int) -> str:
            return _any([is_(i, _kind(e)) for e in AGENT_EVENTS if e in TERMINAL_EVENTS])

        def open_before(i: int) -> str:
            return _any([_all([is_(j, executing), *(_not(is_(m, completed)) for m in range(j + 1, i))])
                         for j in range(i)])

        first = _all([f"({n} > 0)", _not(is_(0, started)), _not(_all([f"({n} == 1)", is_(0, failed)]))])
        problems = [first]
        for i in range(self.K):
            here = _any([
                terminal(i - 1) if i > 0 else "0",
                is_(i, started) if i > 0 else "0",
                _all([is_(i, executing), open_before(i)]),
                _all([is_(i, completed), _not(open_before(i))]),
                _all([terminal(i), open_before(i)]),
            ])
            problems.append(_all([f"({n} > {i})", here]))
        return _any(problems)

    def quiescent_violation(self) -> str:
        return _any([_all([self.in_stream(u, i), _not(self.terminal(u, i))])
                     for u in range(self.U) for i in range(self.K)])

    # -- the steps (model/system.py System.successors) -----------------------------------------
    def drafts(self) -> Iterator[_Draft]:
        yield from self.client_drafts()
        yield from self.server_drafts()
        if self.b.clock:
            yield from self.clock_drafts()

    def conn_drafts(self, s: int, ca: Action, name: str | None = None, alive: bool = True) -> Iterator[_Draft]:
        """System._conn_steps: the connection event alone, with the detach of a closing socket, on
        a live node (``alive`` false: the socket of a crashed node, server_node_lost)."""
        for inputs in input_choices(ca):
            for t in self.transitions("conn", ca.event):
                if not reads_inputs(t, inputs):
                    continue
                f = self.firing("conn", (s,), t, {k: _const(v) for k, v in inputs.items()})
                up = self.node_up(s)
                d = _Draft(name or ca.name, (s,), [self.enabled(f), up if alive else _not(up)], [f], sessions=[s])
                if t.source in ATTACHED and t.target not in ATTACHED:
                    u = self.system.owner(s)
                    d.chains.append(_Chain("ctx", (u,), "detach", {}, "1"))
                yield d

    def client_drafts(self) -> Iterator[_Draft]:
        active = self.active_conn()
        for s in range(self.S):
            u = self.system.owner(s)
            for ca in CLIENT_CONN_ACTIONS:
                if not ca.flag or getattr(self.b, ca.flag):
                    yield from self.conn_drafts(s, ca)
                if ca.name == "client_init":
                    for d in self.conn_drafts(s, ca, "client_init_resume"):
                        d.guard += [f"({self.st('conn', (s,))} == {self.const('conn', Conn.OPEN)})",
                                    self.prefix_at_least(u, 1)]
                        d.extra.append((f"resume{s}", self.prefix(u)))
                        yield d
            if Conn.READY not in active:
                continue
            for v in range(self.U):
                if not self.route(s, v):
                    continue
                for n in range(1, self.K + 1):
                    d = _Draft("client_ack", (s, v, n), [self.live(s), self.prefix_at_least(v, n),
                                                         _not(self.terminal(v, n - 1)), self.node_up(s)],
                               ack_session=s)
                    self.ack_through(d, v, n)
                    yield d
            for t in self.transitions("run", "cancel"):
                f = self.firing("run", (u,), t)
                yield _Draft("client_cancel", (s,), [self.live(s), self.node_up(s), self.enabled(f)], [f])

    def ack_through(self, d: _Draft, u: int, n: int) -> None:
        """System._ack_through: every live event 1..n takes its first enabled ack, or no step."""
        for i in range(n):
            d.chains.append(_Chain("event", self.ev(u, i), "ack", {}, _not(self.terminal(u, i))))

    def server_drafts(self) -> Iterator[_Draft]:
        for s in range(self.S):
            yield from self.resolve_drafts(s)
            for ca in SERVER_CONN_ACTIONS:
                if not ca.flag or getattr(self.b, ca.flag):
                    yield from self.conn_drafts(s, ca)
            yield from self.send_drafts(s)
        for u in range(self.U):
            for t in self.transitions("ctx", "expire"):
                f = self.firing("ctx", (u,), t)
                yield _Draft("server_expire_context", (u,), [self.enabled(f)], [f])
            yield from self.run_drafts(u)
            has = self.has_session(u)
            owner = self.holder_live("holds", u)
            for i in range(self.K):
                for event in ("ack_timeout", "no_session_timeout"):
                    for t in self.transitions("event", event):
                        f = self.firing("event", self.ev(u, i), t, {"has_session": has})
                        yield _Draft(f"server_{event}", self.ev(u, i),
                                     [self.in_stream(u, i), owner, self.enabled(f)], [f])
        if self.multi:
            yield from self.node_drafts()

    def resolve_drafts(self, s: int) -> Iterator[_Draft]:
        """System._resolve_steps: atomic get-or-create, then READY or a limit rejection."""
        u = self.system.owner(s)
        full = self.account_full(s)
        epoch = self.m.context.var_names[EPOCH]
        for event in ("create", "attach", "reject_limit"):
            for ct in self.transitions("ctx", event):
                cf = self.firing("ctx", (u,), ct, {"account_full": full})
                conn_event = "limit_reject" if event == "reject_limit" else "auth_ok"
                for t in self.transitions("conn", conn_event):
                    f = self.firing("conn", (s,), t)
                    seen = self.post(cf, epoch) if conn_event == "auth_ok" else "0"
                    d = _Draft("server_resolve", (s,), [self.enabled(cf), self.enabled(f), self.node_up(s)], [cf, f],
                               extra=[(f"epoch_seen{s}", seen)], sessions=[s])
                    if conn_event != "auth_ok":
                        yield d
                        continue
                    plain = d.copy()
                    plain.guard.append(f"(resume{s} == 0)")
                    yield plain
                    for r in range(1, self.K + 1):
                        resumed = d.copy()
                        resumed.guard += [f"(resume{s} == {r})", f"({self.length(u)} >= {r})"]
                        self.ack_through(resumed, u, r)
                        yield resumed

    def send_drafts(self, s: int) -> Iterator[_Draft]:
        """System._send_steps: the oldest sendable event of each routed stream, written or failed."""
        for u in range(self.U):
            if not self.route(s, u):
                continue

            def sendable(i: int, u: int = u) -> str:
                return _any([self.enabled(self.firing("event", self.ev(u, i), t))
                             for t in self.transitions("event", "send")])

            # Only the live owner decides a send; a session on another node is its relay's, which
            # is behind until it reads the SENT record (System._send_steps).
            relay: list[tuple[str, str]] = []
            if self.multi:
                n = s % self.N
                behind, holds = self.bit("behind", u, n), self.bit("holds", u, n)
                relay = [(behind, f"({behind} || !{holds})")]
            for i in range(self.K):
                e = self.ev(u, i)
                oldest = [self.in_stream(u, i), sendable(i), *(_not(sendable(j)) for j in range(i)),
                          self.node_up(s), self.holder_live("holds", u)]
                for ct in self.transitions("conn", "deliver"):
                    deliver = self.firing("conn", (s,), ct)
                    for t in self.transitions("event", "send"):
                        f = self.firing("event", e, t)
                        yield _Draft("server_send", (s, *e), [*oldest, self.enabled(deliver), self.enabled(f)],
                                     [deliver, f], extra=list(relay), sessions=[s])
                    for ft in self.transitions("event", "send_failed"):
                        failed = self.firing("event", e, ft)
                        for d in self.conn_drafts(s, SEND_ERROR, "server_send_failed"):
                            d.args = (s, *e)
                            d.guard = [*oldest, self.enabled(deliver), *d.guard, self.enabled(failed)]
                            d.static.append(failed)
                            yield d

    def run_drafts(self, u: int) -> Iterator[_Draft]:
        """System._run_steps: a run step of a live context; agent events append with the room rule."""
        if 0 <= self.b.runs <= u:
            return
        live_ctx = f"({self.st('ctx', (u,))} == {self.const('ctx', Ctx.LIVE)})"
        for event in self.m.run.events:
            if event == "cancel":
                continue
            for t in self.transitions("run", event):
                f = self.firing("run", (u,), t)
                base = _Draft(f"server_run_{event}", (u,), [live_ctx, self.holder_live("rholds", u), self.enabled(f)],
                              [f])
                if event not in AGENT_EVENTS:
                    yield base
                    continue
                for n in range(self.K + 1):
                    room = self.K - n - (0 if t.target in self.m.run.terminal else 1)
                    if room <= 0:
                        continue
                    d = base.copy()
                    d.guard.append(f"({self.length(u)} == {n})")
                    e = self.ev(u, n)
                    init_state, init_vals = self.m.delivery.initial_config()
                    d.extra += [(self.st("event", e), self.const("event", init_state)),
                                *((self.var("event", e, name), _const(v))
                                  for name, v in zip(self.m.delivery.var_names, init_vals, strict=True)),
                                (f"kind{u}_{n + 1}", _kind(event)), (self.length(u), str(n + 1))]
                    if self.multi:
                        # The appending node (the lowest live run holder) takes a free or dead lease.
                        take, holder = self.lease_dead_or_free(u), self.lowest("rholds", u)
                        d.extra.append((f"lease{u}", f"({take} -> ({holder} + 1) : lease{u})"))
                        d.extra += [(self.bit("holds", u, k),
                                     f"({self.bit('holds', u, k)} || ({take} && ({holder} == {k})))")
                                    for k in range(self.N)]
                    yield d

    def node_drafts(self) -> Iterator[_Draft]:
        """System._node_lost_steps, _crash_steps, _adopt_steps, _catch_up_steps, in its rule order."""
        for s in range(self.S):
            yield from self.conn_drafts(s, NODE_LOST, alive=False)
        if self.b.crashes:
            for n in range(self.N):
                others = _any([self.up(k) for k in range(self.N) if k != n])
                clear = [(self.bit(name, u, n), "0") for u in range(self.U) for name in ("holds", "rholds", "behind")]
                yield _Draft("server_node_crash", (n,), [self.up(n), others], extra=[(self.up(n), "0"), *clear])
        run_terminal = self.m.run.terminal
        for u in range(self.U):
            for n in range(self.N):
                live = _any([_all([self.in_stream(u, i), _not(self.terminal(u, i))]) for i in range(self.K)])
                local = _any([self.live(s) for s in self.system.sessions_of(u) if s % self.N == n])
                guard = [self.up(n), _not(self.bit("holds", u, n)), _any([live, local]), self.may_take(u)]
                yield _Draft("server_adopt_delivery", (u, n), guard,
                             extra=[(f"lease{u}", str(n + 1)), (self.bit("holds", u, n), "1")])
                if not 0 <= self.b.runs <= u:
                    guard = [self.up(n), _not(self.bit("rholds", u, n)),
                             f"({self.st('ctx', (u,))} == {self.const('ctx', Ctx.LIVE)})",
                             _not(self.is_in("run", (u,), run_terminal))]
                    if self.m.cas:
                        guard.append(_any([f"((rlease{u} == {k}) && !{self.up(k)})" for k in range(self.N)]))
                    yield _Draft("server_adopt_run", (u, n), guard,
                                 extra=[(f"rlease{u}", str(n)), (self.bit("rholds", u, n), "1")])
                behind = self.bit("behind", u, n)
                yield _Draft("server_relay_catch_up", (u, n), [behind], extra=[(behind, "0")])

    def relay_behind(self) -> str:
        """Some live relay has not read its user's SENT records (relay_within_poll_bound)."""
        return _any([_all([self.bit("behind", u, n), self.up(n)]) for u in range(self.U) for n in range(self.N)])

    def clock_drafts(self) -> Iterator[_Draft]:
        """System._clock_steps: every live event ticks at once, or the clock does not move."""
        d = _Draft("tick", ())
        if self.multi and self.m.poll:
            d.guard.append(_not(_any([self.bit("behind", u, n) for u in range(self.U) for n in range(self.N)])))
        live = []
        for u in range(self.U):
            has = self.has_session(u)
            for i in range(self.K):
                when = _all([self.in_stream(u, i), _not(self.terminal(u, i))])
                live.append(when)
                d.chains.append(_Chain("event", self.ev(u, i), "tick", {"has_session": has}, when))
        d.guard.append(_any(live))
        yield d

    # -- emission ------------------------------------------------------------------------------
    def temp(self) -> str:
        name = f"t{self.temps}"
        self.temps += 1
        self.max_temps = max(self.max_temps, self.temps)
        return name

    def flag(self, prop: str, cond: str) -> str:
        return f"if :: (!{prop} && {cond}) -> {prop} = 1; assert(!{prop}) :: else -> skip fi"

    def guard(self, d: _Draft) -> str:
        """The option's whole enabling condition: its own conditions and every required chain."""
        return _all([*d.guard, *(self.chain_guard(c) for c in d.chains)])

    def chain_guard(self, c: _Chain) -> str:
        if not c.required:
            return "1"
        opts = [self.enabled(self.firing(c.family, c.index, t, c.inputs)) for t in self.transitions(c.family, c.event)]
        return _any([_not(c.when), _any(opts)])

    def store(self, writes: list[tuple[str, str, _Type]]) -> tuple[list[str], list[str]]:
        """Simultaneous assignment: non-constant values go through temporaries (read on the
        pre-state), each checked against its variable's Promela range; then every variable is
        written."""
        compute: list[str] = []
        assign: list[str] = []
        for var, value, typ in writes:
            if typ is _STATE or _LITERAL.match(value):
                assign.append(f"{var} = {value}")
                continue
            tmp = self.temp()
            compute.append(f"{tmp} = {value}")
            compute.append(self.flag(RANGE, f"({tmp} < {typ.lo} || {tmp} > {typ.hi})"))
            assign.append(f"{var} = {tmp}")
        return compute, assign

    def chain_code(self, c: _Chain, d: _Draft) -> str:
        branches = []
        for t in self.transitions(c.family, c.event):
            f = self.firing(c.family, c.index, t, c.inputs)
            checks = [self.flag(p, cond) for p, cond in self.step_violations(f, d)]
            compute, assign = self.store(self.assignments(f))
            branches.append((self.enabled(f), [*checks, *compute, *assign]))
        code = "skip"
        for cond, body in reversed(branches):
            code = f"if :: {cond} -> {'; '.join(body) or 'skip'} :: else -> {code} fi"
        return f"if :: {c.when} -> {code} :: else -> skip fi" if c.when != "1" else code

    def emit(self, oid: int, d: _Draft) -> str:
        self.temps = 0
        body = [f'printf("STEP {oid}\\n")']
        for f in d.static:
            body += [self.flag(p, cond) for p, cond in self.step_violations(f, d)]
        if d.action == "tick" and self.multi and Property.RELAY_WITHIN_POLL_BOUND in self.props:
            body.append(self.flag(Property.RELAY_WITHIN_POLL_BOUND, self.relay_behind()))
        writes = [w for f in d.static for w in self.assignments(f)]
        writes += [(var, value, _BYTE) for var, value in d.extra]
        compute, assign = self.store(writes)
        body += compute
        body += [self.chain_code(c, d) for c in d.chains]
        body += assign
        if self.trace_states:
            body = [self.dump("PRE"), *body, self.dump("POST")]
        args = ", ".join(map(str, d.args))
        return _option(f"{oid}: {d.action}({args})", self.guard(d), body)

    def check_option(self, oid: int, guards: Sequence[str]) -> str:
        """The state properties, once per state: enabled only in a state that violates one not yet
        reported, so in a model where they hold it never adds a transition. A state where it is
        the only enabled option is quiescent, which ``timeout`` would not see, so it checks
        quiescence itself."""
        by_prop: dict[str, list[str]] = {}
        for p, cond in self.state_violations():
            by_prop.setdefault(p, []).append(cond)
        pending = {p: _all([f"(!{p})", _any(conds)]) for p, conds in by_prop.items()}
        body = [f'printf("STEP {oid}\\n")', *(self.flag(p, _any(conds)) for p, conds in by_prop.items())]
        if Property.EVERY_EVENT_ACKED_OR_ESCALATED in self.props:
            body.append(self.flag(Property.EVERY_EVENT_ACKED_OR_ESCALATED,
                                  _all([_not(_any(guards)), self.quiescent_violation()])))
        return _option(f"{oid}: the state properties, on a state that violates one", _any(list(pending.values())),
                       body)

    def dump(self, tag: str) -> str:
        names = list(self.encode(self.system.initial()))
        return f'printf("{tag}' + " %d" * len(names) + '\\n", ' + ", ".join(names) + ")"

    def declarations(self) -> list[str]:
        out: list[str] = []
        for family, machine in self.machines.items():
            for k, member in enumerate(machine.states):
                out.append(f"#define {self.const(family, member)} {k}")
        for k, kind in enumerate(AGENT_EVENTS, 1):
            out.append(f"#define {_kind(kind)} {k}")
        out.append("")

        def component(family: str, index: tuple[int, ...]) -> None:
            m = self.machines[family]
            state, values = m.initial_config()
            line = [_unsigned(self.st(family, index), len(m.states) - 1, self.const(family, state))]
            for decl, v in zip(m.variables, values, strict=True):
                line.append(self.types[family][decl.name].declare(self.var(family, index, decl.name), _const(v)))
            out.append("; ".join(line) + ";")

        for s in range(self.S):
            component("conn", (s,))
        for u in range(self.U):
            component("ctx", (u,))
            component("run", (u,))
            out.append(_unsigned(self.length(u), self.K, "0") + ";")
            for i in range(self.K):
                component("event", self.ev(u, i))
                out.append(_unsigned(f"kind{u}_{i + 1}", len(AGENT_EVENTS), "0") + ";")
        epoch = self.types["ctx"][self.m.context.var_names[EPOCH]]
        for s in range(self.S):
            # resume holds last_seq (always > 0 when set); 0 stands for the explorer's -1 (none).
            out.append(_unsigned(f"resume{s}", self.K, "0") + "; " + epoch.declare(f"epoch_seen{s}", "0") + ";")
        if self.multi:
            # lease holds the holder plus one (0: free); rlease the run's holder.
            out.append("; ".join(_unsigned(self.up(n), 1, "1") for n in range(self.N)) + ";")
            for u in range(self.U):
                home = self.system.run_home(u)
                line = [_unsigned(f"lease{u}", self.N, "0"), _unsigned(f"rlease{u}", self.N - 1, str(home))]
                line += [_unsigned(self.bit(name, u, n), 1, "1" if name == "rholds" and n == home else "0")
                         for name in ("holds", "rholds", "behind") for n in range(self.N)]
                out.append("; ".join(line) + ";")
        return out

    def encode(self, state: State) -> dict[str, int]:
        """The Promela values of an explorer ``State`` (the bijection of the module docstring)."""
        out: dict[str, int] = {}

        def put(family: str, index: tuple[int, ...], cfg: Config) -> None:
            m = self.machines[family]
            out[self.st(family, index)] = list(m.states).index(cfg[0])
            for name, v in zip(m.var_names, cfg[1], strict=True):
                out[self.var(family, index, name)] = int(v)

        for s in range(self.S):
            put("conn", (s,), state.conns[s])
            out[f"resume{s}"] = max(state.resume[s], 0)
            out[f"epoch_seen{s}"] = state.epoch_seen[s]
        initial = self.m.delivery.initial_config()
        for u in range(self.U):
            put("ctx", (u,), state.ctxs[u])
            put("run", (u,), state.runs[u])
            out[self.length(u)] = len(state.events[u])
            for i in range(self.K):
                live = i < len(state.events[u])
                put("event", self.ev(u, i), state.events[u][i] if live else initial)
                out[f"kind{u}_{i + 1}"] = _kind_code(state.kinds[u][i]) if live else 0
        if self.multi:
            for n in range(self.N):
                out[self.up(n)] = int(state.up[n])
            for u in range(self.U):
                out[f"lease{u}"] = state.lease[u] + 1
                out[f"rlease{u}"] = state.run_lease[u]
                for name, mask in (("holds", state.holds[u]), ("rholds", state.run_holds[u])):
                    for n in range(self.N):
                        out[self.bit(name, u, n)] = mask >> n & 1
                for n in range(self.N):
                    out[self.bit("behind", u, n)] = state.behind[u * self.N + n]
        return out

    def probe(self, states: Sequence[State]) -> str:
        """A Promela program that loads each state and prints ``PROBE n`` and, per state
        property, whether the generated predicate finds it violated (1) or not (0): the test
        holding these predicates to model/invariants.py runs it with ``spin`` (no compiler)."""
        by_prop: dict[str, list[str]] = {}
        for p, cond in self.state_violations():
            by_prop.setdefault(p, []).append(cond)
        props = list(by_prop)
        names = list(self.encode(self.system.initial()))
        rows = [self.encode(st) for st in states]
        width = len(names)
        load = [f"table[{n * width + k}] = {row[name]}" for n, row in enumerate(rows) for k, name in enumerate(names)]
        unpack = [f"{name} = table[i * {width} + {k}]" for k, name in enumerate(names)]
        verdicts = ", ".join(f"({_any(by_prop[p])} -> 1 : 0)" for p in props)
        return "\n".join([
            f"/* probe: {' '.join(props)} */", *self.declarations(),
            f"short table[{max(1, len(rows) * width)}];", "int i;",
            "active proctype probe() {",
            "  d_step { " + "; ".join(load or ["skip"]) + " };",
            "  i = 0;",
            f"  do :: i < {len(rows)} -> d_step {{ " + "; ".join(unpack)
            + '; printf("PROBE %d' + " %d" * len(props) + f'\\n", i, {verdicts}); i++ }}',
            "  :: else -> break",
            "  od",
            "}", ""])

    def generate(self) -> PromelaModel:
        options: list[Option] = []
        bodies: list[str] = []
        guards: list[str] = []
        for d in self.drafts():
            guard = self.guard(d)
            if guard == "0":
                continue  # statically impossible (a pruned combination): no step of the explorer
            oid = len(options)
            options.append(Option(oid, d.action, d.args,
                                  tuple(Choice(f.family, f.index, f.transition) for f in d.static)))
            bodies.append(self.emit(oid, d))
            guards.append(guard)
        cid = len(options)
        options.append(Option(cid, STATE_CHECK, (), ()))
        bodies.append(self.check_option(cid, guards))
        qid = len(options)
        options.append(Option(qid, QUIESCENT, (), ()))
        if Property.EVERY_EVENT_ACKED_OR_ESCALATED in self.props:
            p = Property.EVERY_EVENT_ACKED_OR_ESCALATED
            bodies.append(_option(f"{qid}: quiescence: no step is enabled and some event is live",
                                  f"timeout && !{p} && {self.quiescent_violation()}",
                                  [f'printf("STEP {qid}\\n")', f"{p} = 1", f"assert(!{p})"]))
        flags = (*self.props, RANGE)
        head = [
            f"/* pipeproof: model {self.m.name!r} at {self.b.describe()}",
            "   Generated from the machine declarations (model/check/promela.py); do not edit.",
            "   One d_step per explorer step; ONLY=k arms property k alone (trail replay). */",
            "#ifndef ONLY",
            "#define ONLY 0",
            "#endif",
            *self.declarations(),
            "",
            "/* property flags and temporaries: hidden, outside the state vector */",
        ]
        for k, flag in enumerate(flags, 1):
            head += [f"#if ONLY == 0 || ONLY == {k}", f"hidden byte {flag} = 0;", "#else",
                     f"hidden byte {flag} = 1;", "#endif"]
        head += [f"hidden int t{k};" for k in range(self.max_temps)]
        head += ["", "active proctype system() {", "end:", "  do"]
        text = "\n".join([*head, *bodies, "  od", "}", ""])
        return PromelaModel(text, tuple(options), flags, self.untranslated, self.m.name)


def _option(comment: str, guard: str, body: Sequence[str]) -> str:
    return f"  /* {comment} */\n  :: d_step {{ {guard} ->\n       " + ";\n       ".join(body) + "\n     }"


TIMEOUTS_CLOSE = "timeouts_close_the_socket"
_TIMEOUT_EVENTS: frozenset[str] = frozenset(t.event for t in CONNECTION.transitions if t.kind is Kind.TIMEOUT)
"""The connection's own timeouts, as invariants.py's timeouts_close_the_socket reads them (from the
reference declaration, so a mutant that swallows one is still judged by the protocol's list)."""

_TRANSLATED: tuple[str, ...] = (
    Property.NO_MESSAGE_BEFORE_READY,
    Property.READY_BEFORE_ACK,
    Property.EVERY_EVENT_ACKED_OR_ESCALATED,
    Property.ACKED_NEVER_RESENT,
    Property.MONOTONIC_EVENT_STATE,
    Property.ATTEMPTS_BOUNDED,
    Property.ONE_CONTEXT_PER_USER,
    Property.EXPIRED_CONTEXT_NEVER_REUSED,
    Property.CONNECTION_LIMITS_RESPECTED,
    Property.NO_CROSS_USER_READ,
    Property.RUN_EVENTS_WELL_ORDERED,
    Property.CANCEL_BEFORE_START_WINS,
    TIMEOUTS_CLOSE,
    Property.ONE_LIVE_OWNER,
    Property.NO_SESSION_ONLY_WHEN_NONE_READY,
    Property.RELAY_WITHIN_POLL_BOUND,
)
"""The invariants this module has a Promela form for (model/invariants.py is the reference; the
state-count, mutant and predicate tests in tests/model/check/ hold the two together)."""


@dataclass(frozen=True)
class _Type:
    """A variable's Promela type: ``unsigned`` of just enough bits when the machine bounds its
    values, else a byte or a short with a run-time range check (``RANGE``)."""

    lo: int
    hi: int

    def declare(self, name: str, initial: str) -> str:
        if self.lo >= 0 and self.hi < 256:
            return _unsigned(name, self.hi, initial)
        return f"short {name} = {initial}"


_STATE = _Type(0, 0)  # a control state: always one of the declared constants
_BYTE = _Type(0, 255)
_SHORT = _Type(-32768, 32767)
_LOCAL_LIMIT = 200_000  # configurations one machine may reach alone before its ranges are given up


def _unsigned(name: str, hi: int, initial: str) -> str:
    bits = max(1, hi.bit_length())
    return f"bit {name} = {initial}" if bits == 1 else f"unsigned {name} : {bits} = {initial}"


def _types(m: Machine) -> dict[str, _Type]:
    """The range of every variable of ``m`` over the configurations it reaches *alone*, with every
    input free: the composed system only ever fires ``m``'s own transitions on some inputs (and
    appends initial configurations), so this contains every value it can hold there. A variable
    that grows without bound alone (an epoch counter: the system bounds it, the machine does not)
    gets a byte (a short below zero) and the run-time range check."""
    names = m.var_names
    ints = {v.name for v in m.variables if v.type is not bool}
    lo = dict.fromkeys(names, 0)
    hi = dict.fromkeys(names, 0)
    wide: set[str] = set()
    choices = [dict(zip(m.inputs, combo, strict=True))
               for combo in itertools.product((False, True), repeat=len(m.inputs))]
    if any(t is not bool for t in m.inputs.values()):
        wide = set(ints)
    start = m.initial_config()
    seen = {start}
    todo = [start]
    while todo and not wide >= ints:
        cfg = todo.pop()
        for k, value in zip(names, cfg[1], strict=True):
            lo[k], hi[k] = min(lo[k], int(value)), max(hi[k], int(value))
            if k in ints and not -128 <= int(value) <= 255:
                wide.add(k)
        if any(not -128 <= int(value) <= 255 for value in cfg[1]):
            continue  # past any byte: this variable is unbounded alone; stop following it
        for inputs in choices:
            for _t, nxt in m.fire_all(cfg, None, inputs):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        if len(seen) > _LOCAL_LIMIT:
            wide = set(ints)
    out: dict[str, _Type] = {}
    for v in m.variables:
        if v.type is bool:
            out[v.name] = _Type(0, 1)
        elif v.name in wide:
            out[v.name] = _BYTE if lo[v.name] >= 0 else _SHORT
        else:
            out[v.name] = _Type(lo[v.name], hi[v.name])
    return out


_LITERAL = re.compile(r"^(\(-\d+\)|\d+|[A-Z][A-Z0-9_]*)$")
"""A value that needs no temporary: a number or one of the generated #define constants."""


def _kind_code(event: str) -> int:
    return AGENT_EVENTS.index(event) + 1


def _kind(event: str) -> str:
    return f"KIND_{event.upper()}"


def _route_table(system: System) -> Callable[[int, int], bool]:
    """The routing glue as a static table: every known route reads only (session, user)."""
    known = {same_user, mutants._any_stream}
    if system.model.route not in known:
        raise ModelDefinitionError("system", "promela_route",
                                   f"no Promela mirror for route {system.model.route!r}"
                                   " (known: same_user, _any_stream)")
    init = system.initial()
    table = {(s, u): system.model.route(system, init, s, u)
             for s in range(system.bounds.sessions) for u in range(system.bounds.users)}
    return lambda s, u: table[(s, u)]


def generate(system: System, *, trace_states: bool = False) -> PromelaModel:
    """The Promela program for ``system`` (docs/proofs.md, "The SPIN engine"). ``trace_states``
    makes every step print the whole state vector before and after (a debugging aid: compile pan
    with ``-DPRINTF`` to see every transition it takes)."""
    return _Gen(system, trace_states=trace_states).generate()


def probe(system: System, states: Sequence[State]) -> tuple[str, tuple[str, ...]]:
    """The probe program for ``states`` (``_Gen.probe``) and the properties its columns name."""
    gen = _Gen(system)
    props = tuple(dict.fromkeys(p for p, _ in gen.state_violations()))
    return gen.probe(states), props


def encode(system: System, state: State) -> dict[str, int]:
    """The Promela variables' values for an explorer state of ``system``."""
    return _Gen(system).encode(state)


__all__ = [
    "OPS", "QUIESCENT", "RANGE", "STATE_CHECK", "Choice", "Option", "PromelaModel", "encode", "generate", "probe",
]
