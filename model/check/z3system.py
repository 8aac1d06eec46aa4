"""The composed system in Z3: state, Init and Next derived from the four machine declarations
(docs/proofs.md, "the composed system"; docs/protocol.md sections 1, 3, 4, 5).

A system state is a set of arrays indexed by the families of model/system.py: ``conn.*``
(Session -> ...), ``ctx.*`` and ``run.*`` (User -> ...), ``event.*`` (User x Int seq -> ...), the
stream length ``len``, the agent event ``kinds`` (User x Int -> Kind), the client's ``resume``
claim and the context ``epoch_seen`` per session. Every system action is a disjunction of
*cases*; a case fixes which declared transition each touched component takes (all known to Python,
so the glue can branch on them exactly as model/system.py does), conjoins the components'
relations built by :class:`~pipeproof.model.check.z3enc.MachineEnc` (guard + update from the declaration)
and writes the results back with ``Store``: everything the case does not touch is framed.

Two universes share this code:

- *symbolic* (the proofs): ``Session`` and ``User`` are uninterpreted sorts, ``owner`` an
  uninterpreted function, every bound an ``Int`` constant with only its documented positivity
  assumption (:meth:`Universe.symbolic`). Quantifiers over sessions, users and seqs stay ``ForAll``.
- *finite* (BMC, traces, the cross-check with the explorer): the bounds of a scenario, sessions and
  users as enum sorts, every quantifier expanded, so queries are quantifier-free and models decode
  to :class:`~pipeproof.model.system.State` values that ``System.successors`` can replay.

Ghost state, used only by proofs, never restricting a real step (each ghost update is a total
function of the pre-state): ``wo`` (User -> the well-ordering automaton's state after reading the
stream, :func:`pipeproof.model.check.z3wo.wo_step`), ``total`` (the sum of ``ctx.conns`` over users, kept by adding each
step's delta: a step changes at most one user's count), ``slot``/``holder`` (a bijection between a
user's attached sessions and ``0 .. conns-1``: the first-order way to say "conns counts the
attached sockets", which FOL cannot count directly).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import z3

from pipeproof.errors import ModelDefinitionError
from pipeproof.model.check.z3enc import MachineEnc, Term, ZCfg, value_term
from pipeproof.model.check.z3universe import Universe
from pipeproof.model.check.z3wo import KIND, WO, wo_run
from pipeproof.model.check.z3wo import wo_next as _wo_next
from pipeproof.model.composition import BY_NAME, CLIENT_CONN_ACTIONS, SERVER_CONN_ACTIONS, Action
from pipeproof.model.connection import ATTACHED, Conn
from pipeproof.model.context import CONNS, Ctx
from pipeproof.model.run import AGENT_EVENTS
from pipeproof.model.spec import Config, Transition
from pipeproof.model.system import (
    NODE_LOST,
    SEND_ERROR,
    State,
    SystemModel,
    input_choices,
    reads_inputs,
    same_user,
)

FAMILY_MACHINE = {"conn": "connection", "ctx": "context", "run": "run", "event": "delivery"}
NODE_FIELDS = frozenset({"up", "holds", "run_holds", "behind"})
"""Fields with a node dimension (an ``Int`` 0 .. N-1; the other ``Int`` dimension is a seq)."""
BOOL_MASKS = ("holds", "run_holds")
"""model/system.py keeps these as bitmasks over nodes; here they are ``User x Node -> Bool``."""
INDEX = {"conn": "S", "ctx": "U", "run": "U", "event": "UI"}

# -- the state ------------------------------------------------------------------------------------
St = dict[str, Term]
"""One symbolic system state: field name ("conn.state", "event.attempt", "len", ...) -> Z3 term."""


@dataclass
class ZFiring:
    """One component transition inside a case (what the step properties inspect). ``mass``
    firings (a cumulative ack, a tick) touch many events: ``pre``/``post`` are then None."""

    family: str
    index: tuple[Term, ...]
    transition: Transition
    pre: ZCfg | None
    post: ZCfg | None


@dataclass
class Case:
    """One way an action can fire: its guard over the pre-state and arguments, and its post-state."""

    action: str
    actor: str
    args: tuple[Term, ...]
    guard: Term
    post: St
    firings: list[ZFiring]
    sessions: list[Term]  # sessions whose reads no_cross_user_read constrains
    pre: St | None = None  # the state the case fires from (step properties about sessions read it)


Route = Callable[[Universe, St, Term, Term], Term]


def _route_same_user(u: Universe, st: St, s: Term, user: Term) -> Term:
    return u.owner(s) == user


def _route_any(u: Universe, st: St, s: Term, user: Term) -> Term:
    return z3.BoolVal(True)


def route_mirror(model: SystemModel) -> Route:
    """The Z3 mirror of the model's routing glue; an unknown route is an error, never a guess."""
    from pipeproof.model import mutants

    table: dict[object, Route] = {same_user: _route_same_user, mutants._any_stream: _route_any}
    found = table.get(model.route)
    if found is None:
        raise ModelDefinitionError("system", "z3_route", f"no Z3 mirror for route {model.route!r}")
    return found


class SysEnc:
    """Init and Next of one ``SystemModel`` over one ``Universe``."""

    def __init__(self, model: SystemModel, universe: Universe) -> None:
        self.model = model
        self.u = universe
        machines = {"conn": model.connection, "ctx": model.context, "run": model.run, "event": model.delivery}
        self.encs: dict[str, MachineEnc] = {}
        for fam, m in machines.items():
            params = {k: universe.params[k] for k in m.params} if universe.symbolic else None
            self.encs[fam] = MachineEnc(m, params)
        self.route = route_mirror(model)
        b = universe.bounds
        self.frames = b.frames if b else True
        self.drain = b.drain if b else True
        self.clock = b.clock if b else True
        self.run_users: tuple[Term, ...] | None = None
        if b is not None and b.runs >= 0:
            self.run_users = tuple(universe.users[: b.runs])
        self._fresh = itertools.count()
        # Nodes (docs/model.md, "nodes"): the symbolic universe has any number, so every node case
        # exists there; a one-node finite instance has none of them (as in model/system.py).
        self.multi = universe.symbolic or universe.n_int > 1
        self.crashes = universe.symbolic or (b is not None and b.crashes)

    # -- fields -----------------------------------------------------------------------------------
    def _dom(self, fam_index: str) -> list[Term]:
        return {"S": [self.u.S], "U": [self.u.U], "UI": [self.u.U, z3.IntSort()]}[fam_index]

    def fields(self) -> dict[str, list[Term]]:
        """Field name -> [domain sorts..., range sort]; the state vector."""
        out: dict[str, list[Term]] = {}
        for fam, enc in self.encs.items():
            dom = self._dom(INDEX[fam])
            out[f"{fam}.state"] = [*dom, enc.states.sort]
            for v in enc.machine.var_names:
                out[f"{fam}.{v}"] = [*dom, enc.var_sort(v)]
        U, S, I = self.u.U, self.u.S, z3.IntSort()  # noqa: E741 - sort names, as in the docs
        B = z3.BoolSort()
        out.update({
            "len": [U, I], "kinds": [U, I, KIND.sort], "wo": [U, WO.sort], "resume": [S, I],
            "epoch_seen": [S, I], "total": [I],
            "up": [I, B], "lease": [U, I], "holds": [U, I, B], "run_lease": [U, I], "run_holds": [U, I, B],
            "behind": [U, I, B],
        })
        if self.u.symbolic:
            # The slot bijection is proof-only; the finite universe counts with sums instead.
            out.update({"slot": [S, I], "holder": [U, I, S]})
        return out

    def indices(self, sorts: list[Term], name: str = "") -> list[tuple[Term, ...]]:
        """Every index of a field in the finite universe (seqs 1..K; nodes 0..N-1 in a node field)."""
        doms = []
        for srt in sorts[:-1]:
            if srt == self.u.S:
                doms.append(self.u.sessions)
            elif srt == self.u.U:
                doms.append(self.u.users)
            elif name in NODE_FIELDS:
                doms.append(tuple(z3.IntVal(k) for k in range(self.u.n_int)))
            else:
                doms.append(tuple(z3.IntVal(k) for k in range(1, self.u.k_int + 1)))
        return list(itertools.product(*doms))

    def fresh_state(self, tag: str) -> St:
        """A state of fresh variables. Finite universe: one scalar per index, the field an array
        term built from them (reads at known indices reduce to the scalar; no array equalities)."""
        st: St = {}
        for name, sorts in self.fields().items():
            if len(sorts) == 1:
                st[name] = z3.Const(f"{tag}.{name}", sorts[0])
            elif self.u.symbolic:
                st[name] = z3.Array(f"{tag}.{name}", *sorts)
            else:
                arr = z3.Array(f"{tag}.{name}.rest", *sorts)  # outside the instance: never read for a verdict
                for idx in self.indices(sorts, name):
                    label = ",".join(str(x) for x in idx)
                    arr = z3.Store(arr, *idx, z3.Const(f"{tag}.{name}[{label}]", sorts[-1]))
                st[name] = arr
        st["hs"] = z3.Function(f"{tag}.has_session", self.u.U, z3.BoolSort())
        return st

    def scalars(self, st: St) -> Iterator[tuple[str, tuple[Term, ...], Term]]:
        """(field, index, term) for every scalar of a finite-universe state."""
        for name, sorts in self.fields().items():
            if len(sorts) == 1:
                yield name, (), st[name]
            else:
                for idx in self.indices(sorts, name):
                    yield name, idx, z3.Select(st[name], *idx)

    def initial_state(self, tag: str = "init") -> St:
        """Init: every component in its declared initial configuration, every stream empty."""
        st = self.fresh_state(tag)  # stream contents beyond ``len`` (= 0) are left unconstrained
        for fam in ("conn", "ctx", "run"):
            enc = self.encs[fam]
            init = enc.initial()
            dom = self._dom(INDEX[fam])[0]
            st[f"{fam}.state"] = z3.K(dom, init.state)
            for v in enc.machine.var_names:
                st[f"{fam}.{v}"] = z3.K(dom, init.vars[v])
        st["len"] = z3.K(self.u.U, z3.IntVal(0))
        st["wo"] = z3.K(self.u.U, WO["EMPTY"])
        st["resume"] = z3.K(self.u.S, z3.IntVal(-1))
        st["epoch_seen"] = z3.K(self.u.S, z3.IntVal(0))
        st["total"] = z3.IntVal(0)
        uu, n = z3.Const("init!u", self.u.U), z3.Int("init!n")
        st["up"] = z3.K(z3.IntSort(), z3.BoolVal(True))
        st["lease"] = z3.K(self.u.U, z3.IntVal(-1))
        st["holds"] = z3.Lambda([uu, n], z3.BoolVal(False))
        st["run_lease"] = z3.Lambda([uu], self.u.home(uu))
        st["run_holds"] = z3.Lambda([uu, n], n == self.u.home(uu))
        st["behind"] = z3.Lambda([uu, n], z3.BoolVal(False))
        return st

    def cfg(self, st: St, fam: str, idx: tuple[Term, ...]) -> ZCfg:
        enc = self.encs[fam]
        return ZCfg(z3.Select(st[f"{fam}.state"], *idx),
                    {v: z3.Select(st[f"{fam}.{v}"], *idx) for v in enc.machine.var_names})

    def put(self, st: St, fam: str, idx: tuple[Term, ...], cfg: ZCfg) -> St:
        out = dict(st)
        out[f"{fam}.state"] = z3.Store(st[f"{fam}.state"], *idx, cfg.state)
        for v, t in cfg.vars.items():
            out[f"{fam}.{v}"] = z3.Store(st[f"{fam}.{v}"], *idx, t)
        return out

    # -- derived facts (model/system.py's glue) ---------------------------------------------------
    def live_session(self, st: St, s: Term) -> Term:
        c = self.cfg(st, "conn", (s,))
        return z3.And(c.state == self.encs["conn"].states[Conn.READY], c["ack_sent"])

    def attached(self, st: St, s: Term) -> Term:
        return self.encs["conn"].states.one_of(z3.Select(st["conn.state"], s), sorted(ATTACHED, key=str))

    def node_up(self, st: St, n: Term) -> Term:
        return z3.Select(st["up"], n)

    def session_node_up(self, st: St, s: Term) -> Term:
        """The session's node is alive (always, in a one-node instance)."""
        return self.node_up(st, self.u.node(s)) if self.multi else z3.BoolVal(True)

    def ready_somewhere(self, st: St, user: Term) -> Term:
        """The store's view (model/system.py ``_has_session``): a READY, acked session routed to
        ``user`` on a live node."""
        return self.u.exists("S", lambda s: z3.And(self.live_session(st, s), self.route(self.u, st, s, user),
                                                   self.session_node_up(st, s)))

    def lowest(self, st: St, field: str, user: Term) -> Term:
        """The lowest live node whose ``field`` bit is set for ``user`` (-1: none); finite universe."""
        out: Term = z3.IntVal(-1)
        for k in range(self.u.n_int - 1, -1, -1):
            n = z3.IntVal(k)
            live = z3.And(z3.Select(st[field], user, n), self.node_up(st, n)) if self.multi \
                else z3.Select(st[field], user, n)
            out = z3.If(live, n, out)
        return out

    def live_holder(self, st: St, field: str, user: Term) -> Term:
        """Some live node acts as ``user``'s delivery owner (``holds``) or run holder (``run_holds``)."""
        return self.u.exists_node(lambda n: z3.And(z3.Select(st[field], user, n), self.node_up(st, n)), "h")

    def has_session(self, st: St, user: Term, exact: bool = False) -> Term:
        """``has_session`` as the owner supplies it. ``exact`` (the escalation's re-read of the
        sessions table) states it even in the proofs; elsewhere the proofs leave it free."""
        if self.model.session_view == "owner_node":
            if self.u.symbolic:
                return st["hs"](user)  # a mutant's view: free in the proofs, BMC decides
            owner = self.lowest(st, "holds", user)
            return z3.And(owner >= 0, self.u.exists("S", lambda s: z3.And(
                self.live_session(st, s), self.route(self.u, st, s, user), self.u.node(s) == owner)))
        if self.u.symbolic and not exact:
            # The proofs leave has_session free (any value): no safety invariant but
            # no_session_only_when_none_ready depends on it, and a Next with more behaviours proves
            # at least as much (docs/proofs.md, "weakenings"); the escalation case states it exactly.
            return st["hs"](user)
        return self.ready_somewhere(st, user)

    def account_full(self, st: St, s: Term | None = None) -> Term:
        if self.model.limit_count == "per_node" and s is not None:
            if self.u.symbolic:
                return z3.Const(f"account_full_on_node#{next(self._fresh)}", z3.BoolSort())  # free: BMC decides
            return z3.Sum([z3.If(z3.And(self.attached(st, x), self.u.node(x) == self.u.node(s)), 1, 0)
                           for x in self.u.sessions]) >= self.u.max_account
        return st["total"] >= self.u.max_account

    def in_stream(self, st: St, user: Term, i: Term) -> Term:
        return z3.And(i >= 1, i <= z3.Select(st["len"], user))

    def live_event(self, st: St, user: Term, i: Term) -> Term:
        ev = self.encs["event"]
        state = z3.Select(st["event.state"], user, i)
        terminal = ev.states.one_of(state, sorted(ev.machine.terminal, key=str))
        return z3.And(self.in_stream(st, user, i), z3.Not(terminal))

    def delivered(self, st: St, user: Term, i: Term) -> Term:
        return z3.Select(st["event.delivered"], user, i)

    def prefix_at_least(self, st: St, user: Term, n: Term) -> Term:
        """``delivered_prefix(user) >= n``: the client holds every event 1..n."""
        return z3.And(n <= z3.Select(st["len"], user),
                      self.u.forall("Int", lambda i: z3.Implies(z3.And(i >= 1, i <= n),
                                                                self.delivered(st, user, i)), "p"))

    # -- fresh arguments --------------------------------------------------------------------------
    def arg(self, tag: str, name: str, sort: str) -> Term:
        srt = {"S": self.u.S, "U": self.u.U, "Int": z3.IntSort()}[sort]
        return z3.Const(f"{tag}.{name}#{next(self._fresh)}", srt)

    def args(self, tag: str, *spec: tuple[str, str]) -> Iterator[tuple[Term, ...]]:
        """Action arguments: fresh constants (symbolic), or every concrete value (finite: each case
        then reads and writes known indices only, which keeps BMC queries small)."""
        if self.u.symbolic:
            yield tuple(self.arg(tag, name, sort) for name, sort in spec)
            return
        doms = {"S": self.u.sessions, "U": self.u.users,
                "Int": tuple(z3.IntVal(k) for k in range(1, self.u.k_int + 1))}
        yield from itertools.product(*(doms[sort] for _name, sort in spec))

    # -- cases ------------------------------------------------------------------------------------
    def cases(self, pre: St, tag: str) -> list[Case]:
        """Every case of every action from ``pre``; arguments are fresh constants named by ``tag``."""
        out: list[Case] = []
        for builder in (self._client_cases, self._server_session_cases, self._server_user_cases, self._node_cases,
                        self._clock_cases):
            out.extend(builder(pre, tag))
        return out

    def next_formula(self, pre: St, post: St, tag: str) -> tuple[Term, list[tuple[Term, Case]]]:
        """Next(pre, post): one indicator picks the case; its guard holds and each field of
        ``post`` is that case's value (fields it does not touch keep ``pre``'s). Returns the formula
        and (indicator, case) pairs, for traces and step properties."""
        cases = self.cases(pre, tag)
        # One Boolean per case, exactly one true (cheaper for the SAT core than an integer choice).
        tagged = [(z3.Bool(f"{tag}.case{k}"), c) for k, c in enumerate(cases)]
        inds = [ind for ind, _ in tagged]
        parts = [z3.Or(inds), z3.AtMost(*inds, 1)]
        parts += [z3.Implies(ind, c.guard) for ind, c in tagged]
        for name, sorts in self.fields().items():
            val = pre[name]
            for ind, c in reversed(tagged):
                if not c.post[name].eq(pre[name]):
                    val = z3.If(ind, c.post[name], val)
            if len(sorts) == 1 or self.u.symbolic:
                parts.append(post[name] == val)
            else:
                # Finite universe: equate scalars, never whole arrays (no extensionality to reason about).
                parts.extend(z3.Select(post[name], *idx) == z3.Select(val, *idx) for idx in self.indices(sorts, name))
        return z3.And(parts), tagged

    def state_eq(self, a: St, b: St) -> Term:
        return z3.And([a[n] == b[n] for n in self.fields()])

    # client actions (model/system.py _client_steps)
    def _client_cases(self, pre: St, tag: str) -> Iterator[Case]:
        for (s,) in self.args(tag, ("s", "S")):
            yield from self._client_session_cases(pre, s, tag)
        for s, ack_user, n in self.args(tag, ("s", "S"), ("ack_user", "U"), ("n", "Int")):
            # client_ack: cumulative through n, on a stream routed to s.
            draft = _Draft(self, pre, (s, ack_user, n))
            draft.guard(self.live_session(pre, s), self.route(self.u, pre, s, ack_user), n >= 1,
                        self.prefix_at_least(pre, ack_user, n), self.live_event(pre, ack_user, n),
                        self.session_node_up(pre, s))
            self._ack_through(draft, ack_user, n)
            yield draft.case("client_ack", "client", sessions=[s])

    def _client_session_cases(self, pre: St, s: Term, tag: str) -> Iterator[Case]:
        conn = self.encs["conn"]
        for ca in CLIENT_CONN_ACTIONS:
            if not ca.flag or getattr(self, ca.flag):
                yield from self._conn_cases(pre, s, ca)
        user = self.u.owner(s)
        # client_init_resume: a plain init that carries the client's delivered prefix.
        if self.u.symbolic:
            p = self.arg(tag, "prefix", "Int")
            prefix_def = z3.And(self.prefix_at_least(pre, user, p),
                                z3.Or(p == z3.Select(pre["len"], user), z3.Not(self.delivered(pre, user, p + 1))))
            extra: tuple[Term, ...] = (p,)
        else:
            p = z3.Sum([z3.If(self.prefix_at_least(pre, user, z3.IntVal(n)), 1, 0) for n in range(1, self.u.k_int + 1)])
            prefix_def, extra = z3.BoolVal(True), ()
        for case in self._conn_cases(pre, s, BY_NAME["client_init"], "client_init_resume"):
            is_open = z3.Select(pre["conn.state"], s) == conn.states[Conn.OPEN]
            case.guard = z3.And(case.guard, is_open, p > 0, prefix_def)
            case.post["resume"] = z3.Store(case.post["resume"], s, p)
            case.args = (s, *extra)
            yield case
        for t in self.encs["run"].transitions("cancel"):
            draft = _Draft(self, pre, (s,))
            draft.guard(self.live_session(pre, s), self.session_node_up(pre, s))
            draft.fire("run", (user,), t)
            yield draft.case("client_cancel", "client")

    def _conn_cases(self, pre: St, s: Term, ca: Action, name: str | None = None, alive: bool = True
                    ) -> Iterator[Case]:
        """A ``conn`` action's connection event alone, detaching from the context when an attached
        socket closes (model/composition.py); on a live node, or (``alive`` false: the socket of a
        crashed node) on a dead one."""
        conn = self.encs["conn"]
        event, action, actor = ca.event, name or ca.name, ca.actor
        for t, inputs in ((t, i) for i in input_choices(ca) for t in conn.transitions(event)
                          if reads_inputs(t, i)):
            detaching = t.source in ATTACHED and t.target not in ATTACHED
            for dt in (self.encs["ctx"].transitions("detach") if detaching else (None,)):
                draft = _Draft(self, pre, (s,))
                if self.multi:
                    up = self.node_up(pre, self.u.node(s))
                    draft.guard(up if alive else z3.Not(up))
                draft.fire("conn", (s,), t, dict(inputs))
                if dt is not None:
                    draft.fire("ctx", (self.u.owner(s),), dt, first=True)
                    if self.u.symbolic:
                        draft.ghost_detach(s)
                yield draft.case(action, actor, sessions=[s])

    def _ack_through(self, draft: _Draft, user: Term, n: Term) -> None:
        """The ack event on every live event 1..n of ``user``'s stream (first enabled transition each);
        no case at all when one of them cannot take it."""
        ev = self.encs["event"]
        pre = draft.pre
        first = ev.transitions("ack")
        draft.mass("event", user, first, lambda uu, i: z3.And(uu == user, i <= n, self.live_event(pre, uu, i)),
                   lambda cfg: ev.fire_first("ack", cfg))

    # server actions per session (model/system.py _server_steps, _resolve_steps, _send_steps)
    def _server_session_cases(self, pre: St, tag: str) -> Iterator[Case]:
        for (s,) in self.args(tag, ("s", "S")):
            yield from self._server_one_session(pre, s)
        for s, user, i in self.args(tag, ("s", "S"), ("send_user", "U"), ("i", "Int")):
            yield from self._send_cases(pre, s, user, i)

    def _server_one_session(self, pre: St, s: Term) -> Iterator[Case]:
        yield from self._resolve_cases(pre, s)
        for ca in SERVER_CONN_ACTIONS:
            if not ca.flag or getattr(self, ca.flag):
                yield from self._conn_cases(pre, s, ca)

    def _resolve_cases(self, pre: St, s: Term) -> Iterator[Case]:
        """Atomic get-or-create of the owner's context, then READY (or a limit rejection)."""
        user = self.u.owner(s)
        full = self.account_full(pre, s)
        for ctx_event in ("create", "attach", "reject_limit"):
            conn_event = "limit_reject" if ctx_event == "reject_limit" else "auth_ok"
            for ct in self.encs["ctx"].transitions(ctx_event):
                for t in self.encs["conn"].transitions(conn_event):
                    for resumed in ((False, True) if conn_event == "auth_ok" else (False,)):
                        draft = _Draft(self, pre, (s,))
                        draft.guard(self.session_node_up(pre, s))
                        _, cafter = draft.fire("ctx", (user,), ct, {"account_full": full})
                        draft.fire("conn", (s,), t)
                        if self.u.symbolic and t.source not in ATTACHED and t.target in ATTACHED:
                            draft.ghost_attach(s, cafter["conns"])
                        seen = cafter["epoch"] if conn_event == "auth_ok" else z3.IntVal(0)
                        draft.post["epoch_seen"] = z3.Store(draft.post["epoch_seen"], s, seen)
                        last = z3.Select(pre["resume"], s)
                        if resumed:
                            # Resume acks everything through last_seq (section 5).
                            draft.guard(last > 0)
                            self._ack_through(draft, user, last)
                        elif conn_event == "auth_ok":
                            draft.guard(last <= 0)
                        yield draft.case("server_resolve", "server", sessions=[s])

    def _send_cases(self, pre: St, s: Term, user: Term, i: Term) -> Iterator[Case]:
        """Write the oldest sendable event of a routed stream; the write may succeed or fail."""
        ev, conn = self.encs["event"], self.encs["conn"]

        def sendable(j: Term) -> Term:
            return ev.enabled("send", self.cfg(pre, "event", (user, j)))

        oldest = z3.And(self.route(self.u, pre, s, user), self.in_stream(pre, user, i), sendable(i),
                        self.u.forall("Int", lambda j: z3.Implies(z3.And(j >= 1, j < i), z3.Not(sendable(j))), "j"))
        if self.multi:
            # Only the live delivery owner decides a send; a session on another node is its relay's.
            oldest = z3.And(oldest, self.session_node_up(pre, s), self.live_holder(pre, "holds", user))
        for ct in conn.transitions("deliver"):
            for t in ev.transitions("send"):
                draft = _Draft(self, pre, (s, user, i))
                draft.guard(oldest)
                draft.fire("conn", (s,), ct)
                draft.fire("event", (user, i), t)
                if self.multi:
                    n = self.u.node(s)
                    relay = z3.Not(z3.Select(pre["holds"], user, n))
                    draft.post["behind"] = z3.Store(draft.post["behind"], user, n,
                                                    z3.Or(z3.Select(pre["behind"], user, n), relay))
                yield draft.case("server_send", "server", sessions=[s])
        deliverable = conn.enabled("deliver", self.cfg(pre, "conn", (s,)))
        for ft in ev.transitions("send_failed"):
            for case in self._conn_cases(pre, s, SEND_ERROR, "server_send_failed"):
                draft = _Draft(self, pre, (s, user, i))
                draft.post, draft.guards, draft.firings = case.post, [case.guard], list(case.firings)
                draft.guard(oldest, deliverable)
                draft.fire("event", (user, i), ft)
                yield draft.case("server_send_failed", "server", sessions=[s])

    # server actions per user (expire, runs, delivery timeouts)
    def _server_user_cases(self, pre: St, tag: str) -> Iterator[Case]:
        for (user,) in self.args(tag, ("u", "U")):
            for t in self.encs["ctx"].transitions("expire"):
                draft = _Draft(self, pre, (user,))
                draft.fire("ctx", (user,), t)
                yield draft.case("server_expire_context", "server")
            yield from self._run_cases(pre, user)
        for user, i in self.args(tag, ("u", "U"), ("i", "Int")):
            yield from self._timeout_cases(pre, user, i)

    def _timeout_cases(self, pre: St, user: Term, i: Term) -> Iterator[Case]:
        for event in ("ack_timeout", "no_session_timeout"):
            # The escalation re-reads the sessions table: stated exactly even in the proofs.
            has = self.has_session(pre, user, exact=event == "no_session_timeout")
            for t in self.encs["event"].transitions(event):
                draft = _Draft(self, pre, (user, i))
                draft.guard(self.in_stream(pre, user, i))
                if self.multi:
                    draft.guard(self.live_holder(pre, "holds", user))
                draft.fire("event", (user, i), t, {"has_session": has})
                yield draft.case(f"server_{event}", "server")

    def _run_cases(self, pre: St, user: Term) -> Iterator[Case]:
        run, ev = self.encs["run"], self.encs["event"]
        length = z3.Select(pre["len"], user)
        # Fenced: a run steps only while a live node holds its lease; an append takes the delivery
        # lease when it is free or its holder's node is dead (model/system.py _run_steps). The
        # symbolic universe lets any live holder append (a superset of "the lowest").
        if self.u.symbolic:
            holder: Term = self.arg("run", "holder", "Int")
            fenced = z3.And(holder >= 0, holder < self.u.N, z3.Select(pre["run_holds"], user, holder),
                            self.node_up(pre, holder))
        else:
            holder = self.lowest(pre, "run_holds", user)
            fenced = holder >= 0
        lease = z3.Select(pre["lease"], user)
        take = z3.Or(lease < 0, z3.Not(self.node_up(pre, lease))) if self.multi else lease < 0
        for event in run.machine.events:
            if event == "cancel":
                continue  # the client's action
            for t in run.transitions(event):
                draft = _Draft(self, pre, (user,))
                draft.guard(z3.Select(pre["ctx.state"], user) == self.encs["ctx"].states[Ctx.LIVE])
                if self.run_users is not None:
                    draft.guard(z3.Or([user == x for x in self.run_users] or [z3.BoolVal(False)]))
                draft.guard(fenced)
                draft.fire("run", (user,), t)
                if event not in AGENT_EVENTS:
                    yield draft.case(f"server_run_{event}", "server")
                    continue
                # Room is kept for the terminal event, exactly as System._run_steps does.
                reserve = 0 if t.target in run.machine.terminal else 1
                draft.guard(self.u.K - length - reserve > 0)
                # Finite universe: one case per current length, so the append writes a known seq.
                lengths = [length] if self.u.symbolic else [z3.IntVal(k) for k in range(self.u.k_int)]
                for n in lengths:
                    d = draft.copy()
                    d.guard(length == n)
                    seq = n + 1
                    d.post = self.put(d.post, "event", (user, seq), ev.initial())
                    d.post["kinds"] = z3.Store(d.post["kinds"], user, seq, KIND[event])
                    d.post["len"] = z3.Store(d.post["len"], user, seq)
                    wo = z3.Select(pre["wo"], user)
                    d.post["wo"] = z3.Store(d.post["wo"], user, _wo_next(wo, event))
                    d.post["lease"] = z3.Store(d.post["lease"], user, z3.If(take, holder, lease))
                    d.post["holds"] = z3.Store(d.post["holds"], user, holder,
                                               z3.Or(take, z3.Select(pre["holds"], user, holder)))
                    yield d.case(f"server_run_{event}", "server")

    def _clock_cases(self, pre: St, tag: str) -> Iterator[Case]:
        """Model time passes for every live event at once, unless a deadline is due."""
        if not self.clock:
            return
        ev = self.encs["event"]
        draft = _Draft(self, pre, ())
        draft.guard(self.u.exists("U", lambda uu: self.u.exists(
            "Int", lambda i: self.live_event(pre, uu, i), "ti"), "tu"))
        if self.multi and self.model.poll:
            # A relay's poll is due before time passes (the poll bound), like a deadline.
            draft.guard(self.u.forall("U", lambda uu: self.u.forall_node(
                lambda n: z3.Not(z3.Select(pre["behind"], uu, n)), "tn"), "tu"))
        draft.mass("event", None, ev.transitions("tick"), lambda uu, i: self.live_event(pre, uu, i),
                   lambda cfg, uu: ev.fire_first("tick", cfg, {"has_session": self.has_session(pre, uu)}),
                   needs_user=True)
        yield draft.case("tick", "clock")

    # nodes (model/system.py _node_lost_steps, _crash_steps, _adopt_steps, _catch_up_steps)
    def _node_cases(self, pre: St, tag: str) -> Iterator[Case]:
        if not self.multi:
            return
        for (s,) in self.args(tag, ("s", "S")):
            yield from self._conn_cases(pre, s, NODE_LOST, alive=False)
        if self.crashes:
            for (n,) in self.node_args(tag, "crash"):
                draft = _Draft(self, pre, (n,))

                def survivor(k: Term, n: Term = n) -> Term:
                    return z3.And(k != n, self.node_up(pre, k))

                draft.guard(self.is_node(n), self.node_up(pre, n), self.u.exists_node(survivor, "survivor"))
                draft.post["up"] = z3.Store(pre["up"], n, z3.BoolVal(False))
                for name in ("holds", "run_holds", "behind"):
                    draft.post[name] = self._clear_node(pre[name], n)
                yield draft.case("server_node_crash", "server")
        for (user,) in self.args(tag, ("u", "U")):
            for (n,) in self.node_args(tag, "adopt"):
                lease = z3.Select(pre["lease"], user)
                yield from self._adopt_delivery_case(pre, user, n, lease)
                draft = _Draft(self, pre, (user, n))
                run = self.encs["run"]
                draft.guard(self.is_node(n), self.node_up(pre, n), z3.Not(z3.Select(pre["run_holds"], user, n)),
                            z3.Select(pre["ctx.state"], user) == self.encs["ctx"].states[Ctx.LIVE],
                            z3.Not(run.states.one_of(z3.Select(pre["run.state"], user),
                                                     sorted(run.machine.terminal, key=str))))
                if self.run_users is not None:
                    draft.guard(z3.Or([user == x for x in self.run_users] or [z3.BoolVal(False)]))
                if self.model.cas:
                    draft.guard(z3.Not(self.node_up(pre, z3.Select(pre["run_lease"], user))))
                draft.post["run_lease"] = z3.Store(pre["run_lease"], user, n)
                draft.post["run_holds"] = z3.Store(pre["run_holds"], user, n, z3.BoolVal(True))
                yield draft.case("server_adopt_run", "server")
            for (n,) in self.node_args(tag, "relay"):
                draft = _Draft(self, pre, (user, n))
                draft.guard(self.is_node(n), z3.Select(pre["behind"], user, n))
                draft.post["behind"] = z3.Store(pre["behind"], user, n, z3.BoolVal(False))
                yield draft.case("server_relay_catch_up", "server")

    def _adopt_delivery_case(self, pre: St, user: Term, n: Term, lease: Term) -> Iterator[Case]:
        draft = _Draft(self, pre, (user, n))
        # Worth taking: an unfinished event to adopt, or a READY session of the user on this node.
        local = self.u.exists("S", lambda s: z3.And(self.u.owner(s) == user, self.u.node(s) == n,
                                                    self.live_session(pre, s)), "cs")
        draft.guard(self.is_node(n), self.node_up(pre, n), z3.Not(z3.Select(pre["holds"], user, n)),
                    z3.Or(self.u.exists("Int", lambda i: self.live_event(pre, user, i), "ai"), local),
                    self.may_take(pre, user))
        draft.post["lease"] = z3.Store(pre["lease"], user, n)
        draft.post["holds"] = z3.Store(pre["holds"], user, n, z3.BoolVal(True))
        yield draft.case("server_adopt_delivery", "server")

    def may_take(self, st: St, user: Term) -> Term:
        """model/system.py ``_may_take``: the compare-and-set finds the lease free, or held by a
        dead node (when survivors adopt); without compare-and-set, always."""
        if not self.model.cas:
            return z3.BoolVal(True)
        lease = z3.Select(st["lease"], user)
        if not self.model.adopt:
            return lease < 0
        return z3.Or(lease < 0, z3.Not(self.node_up(st, lease)))

    def can_decide(self, st: St, user: Term) -> Term:
        """model/system.py ``can_decide``: a live node owns ``user``'s delivery or one could adopt it."""
        if not self.multi:
            return self.live_holder(st, "holds", user)
        free = self.may_take(st, user)
        return z3.Or(self.live_holder(st, "holds", user), self.u.exists_node(
            lambda n: z3.And(self.node_up(st, n), z3.Not(z3.Select(st["holds"], user, n)), free), "d"))

    def node_args(self, tag: str, name: str) -> Iterator[tuple[Term]]:
        """A node argument: a fresh constant (symbolic: each case guards it with
        :meth:`is_node`), or every node (finite)."""
        if self.u.symbolic:
            yield (self.arg(tag, name, "Int"),)
            return
        for k in range(self.u.n_int):
            yield (z3.IntVal(k),)

    def is_node(self, n: Term) -> Term:
        return z3.And(n >= 0, n < self.u.N) if self.u.symbolic else z3.BoolVal(True)

    def _clear_node(self, arr: Term, n: Term) -> Term:
        """``arr`` (User x Node -> Bool) with node ``n``'s column false (a crash forgets it)."""
        if self.u.symbolic:
            uu, k = z3.Const("clear!u", self.u.U), z3.Int("clear!n")
            return z3.Lambda([uu, k], z3.And(k != n, z3.Select(arr, uu, k)))
        out = arr
        for uu in self.u.users:
            out = z3.Store(out, uu, n, z3.BoolVal(False))
        return out

    # -- concrete states (finite universe) --------------------------------------------------------
    def state_formula(self, st: St, state: State) -> Term:
        """``st`` holds exactly ``state`` (ghost slot/holder left free; they never restrict a step)."""
        u = self.u
        parts: list[Term] = []

        def cfg_eq(fam: str, idx: tuple[Term, ...], config: Config) -> None:
            parts.append(self.encs[fam].eq(self.cfg(st, fam, idx), self.encs[fam].concrete(config)))

        for k, c in enumerate(state.conns):
            cfg_eq("conn", (u.sessions[k],), c)
            parts.append(z3.Select(st["resume"], u.sessions[k]) == state.resume[k])
            parts.append(z3.Select(st["epoch_seen"], u.sessions[k]) == state.epoch_seen[k])
        for k, c in enumerate(state.ctxs):
            cfg_eq("ctx", (u.users[k],), c)
        for k, c in enumerate(state.runs):
            cfg_eq("run", (u.users[k],), c)
        for k, stream in enumerate(state.events):
            parts.append(z3.Select(st["len"], u.users[k]) == len(stream))
            parts.append(z3.Select(st["wo"], u.users[k]) == WO[wo_run(state.kinds[k])])
            for i, c in enumerate(stream):
                cfg_eq("event", (u.users[k], z3.IntVal(i + 1)), c)
                parts.append(z3.Select(st["kinds"], u.users[k], i + 1) == KIND[state.kinds[k][i]])
        parts.append(st["total"] == sum(int(c[1][CONNS]) for c in state.ctxs))
        for k in range(u.n_int):
            n = z3.IntVal(k)
            parts.append(z3.Select(st["up"], n) == state.up[k])
            for j, uk in enumerate(u.users):
                parts.append(z3.Select(st["holds"], uk, n) == bool(state.holds[j] >> k & 1))
                parts.append(z3.Select(st["run_holds"], uk, n) == bool(state.run_holds[j] >> k & 1))
                parts.append(z3.Select(st["behind"], uk, n) == bool(state.behind[j * u.n_int + k]))
        for j, uk in enumerate(u.users):
            parts.append(z3.Select(st["lease"], uk) == state.lease[j])
            parts.append(z3.Select(st["run_lease"], uk) == state.run_lease[j])
        return z3.And(parts)

    def decode(self, model: Term, st: St) -> State:
        """The ``State`` a model assigns to ``st`` (finite universe)."""
        u = self.u

        def dec(fam: str, idx: tuple[Term, ...]) -> Config:
            return self.encs[fam].decode(model, self.cfg(st, fam, idx))

        def num(t: Term) -> int:
            v: int = model.eval(t, model_completion=True).as_long()
            return v

        def flag(t: Term) -> bool:
            return bool(z3.is_true(model.eval(t, model_completion=True)))

        def mask(name: str, uk: Term) -> int:
            return sum(1 << k for k in range(u.n_int) if flag(z3.Select(st[name], uk, z3.IntVal(k))))

        events, kinds = [], []
        for uk in u.users:
            n = num(z3.Select(st["len"], uk))
            events.append(tuple(dec("event", (uk, z3.IntVal(i))) for i in range(1, n + 1)))
            kinds.append(tuple(KIND.decode(model.eval(z3.Select(st["kinds"], uk, i), model_completion=True))
                               for i in range(1, n + 1)))
        return State(
            conns=tuple(dec("conn", (s,)) for s in u.sessions),
            ctxs=tuple(dec("ctx", (x,)) for x in u.users),
            runs=tuple(dec("run", (x,)) for x in u.users),
            events=tuple(events),
            kinds=tuple(kinds),
            resume=tuple(num(z3.Select(st["resume"], s)) for s in u.sessions),
            epoch_seen=tuple(num(z3.Select(st["epoch_seen"], s)) for s in u.sessions),
            up=tuple(flag(z3.Select(st["up"], z3.IntVal(k))) for k in range(u.n_int)),
            lease=tuple(num(z3.Select(st["lease"], x)) for x in u.users),
            holds=tuple(mask("holds", x) for x in u.users),
            run_lease=tuple(num(z3.Select(st["run_lease"], x)) for x in u.users),
            run_holds=tuple(mask("run_holds", x) for x in u.users),
            behind=tuple(int(flag(z3.Select(st["behind"], x, z3.IntVal(k)))) for x in u.users
                         for k in range(u.n_int)),
        )


class _Draft:
    """Builds one case: guards accumulate, component results are stored into the post-state."""

    def __init__(self, enc: SysEnc, pre: St, args: tuple[Term, ...]) -> None:
        self.enc = enc
        self.pre = pre
        self.post: St = dict(pre)
        self.args = args
        self.guards: list[Term] = []
        self.firings: list[ZFiring] = []

    def guard(self, *conds: Term) -> None:
        self.guards.extend(conds)

    def copy(self) -> _Draft:
        d = _Draft(self.enc, self.pre, self.args)
        d.post, d.guards, d.firings = dict(self.post), list(self.guards), list(self.firings)
        return d

    def fire(self, fam: str, idx: tuple[Term, ...], t: Transition, inputs: Mapping[str, Term] | None = None,
             first: bool = False) -> tuple[ZCfg, ZCfg]:
        enc = self.enc.encs[fam]
        zin = {k: (value_term(v) if isinstance(v, bool) else v) for k, v in (inputs or {}).items()}
        cfg = self.enc.cfg(self.post, fam, idx)
        self.guards.append(enc.first_guard(t, cfg, zin) if first else enc.guard(t, cfg, zin))
        after = enc.update(t, cfg, zin)
        self.post = self.enc.put(self.post, fam, idx, after)
        if fam == "ctx":
            # Ghost: the account total moves with the one user's count this step changes.
            self.post["total"] = self.post["total"] + (after["conns"] - cfg["conns"])
        self.firings.append(ZFiring(fam, idx, t, cfg, after))
        return cfg, after

    def mass(self, fam: str, user: Term | None, transitions: Sequence[Transition],
             selected: Callable[[Term, Term], Term], fire: Callable[..., tuple[Term, ZCfg]],
             needs_user: bool = False) -> None:
        """Fire an event on every selected event (u, i) at once (first enabled transition each);
        the case exists only if it is enabled on every one of them."""
        enc, u = self.enc, self.enc.u
        names = [f"{fam}.state", *(f"{fam}.{v}" for v in enc.encs[fam].machine.var_names)]

        def one(uu: Term, i: Term) -> tuple[Term, Term, ZCfg]:
            cfg = enc.cfg(self.post, fam, (uu, i))
            ok, after = fire(cfg, uu) if needs_user else fire(cfg)
            return selected(uu, i), ok, after

        if u.symbolic:
            uu, i = z3.Const("m!u", u.U), z3.Int("m!i")
            sel, ok, after = one(uu, i)
            self.guards.append(z3.ForAll([uu, i], z3.Implies(sel, ok)))
            vals = [after.state, *after.vars.values()]
            for name, val in zip(names, vals, strict=True):
                self.post[name] = z3.Lambda([uu, i], z3.If(sel, val, z3.Select(self.post[name], uu, i)))
        else:
            users = u.users if user is None else (user,)
            updates: list[tuple[Term, Term, Term, ZCfg]] = []
            for uu in users:
                for k in range(1, u.k_int + 1):
                    i = z3.IntVal(k)
                    sel, ok, after = one(uu, i)
                    self.guards.append(z3.Implies(sel, ok))
                    updates.append((uu, i, sel, after))
            for uu, i, sel, after in updates:
                vals = [after.state, *after.vars.values()]
                for name, val in zip(names, vals, strict=True):
                    old = z3.Select(self.post[name], uu, i)
                    self.post[name] = z3.Store(self.post[name], uu, i, z3.If(sel, val, old))
        for t in transitions:
            self.firings.append(ZFiring(fam, (user,) if user is not None else (), t, None, None))

    def ghost_attach(self, s: Term, conns_after: Term) -> None:
        user = self.enc.u.owner(s)
        self.post["slot"] = z3.Store(self.post["slot"], s, conns_after - 1)
        self.post["holder"] = z3.Store(self.post["holder"], user, conns_after - 1, s)

    def ghost_detach(self, s: Term) -> None:
        """The last slot's holder moves into the leaving session's slot: the bijection stays dense."""
        user = self.enc.u.owner(s)
        k = z3.Select(self.pre["slot"], s)
        last = z3.Select(self.pre["holder"], user, z3.Select(self.pre["ctx.conns"], user) - 1)
        self.post["slot"] = z3.Store(self.post["slot"], last, k)
        self.post["holder"] = z3.Store(self.post["holder"], user, k, last)

    def case(self, action: str, actor: str, sessions: Sequence[Term] = ()) -> Case:
        return Case(action, actor, self.args, z3.And(self.guards) if self.guards else z3.BoolVal(True),
                    self.post, self.firings, list(sessions), self.pre)

