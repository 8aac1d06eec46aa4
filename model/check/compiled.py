"""The composed system compiled for the explorer: interned states, memoized rules and checks
(docs/model.md, "explorer").

Nothing here knows a machine, a transition or an invariant. Three generic devices make the
explorer's inner loop cheap:

- **Interned states.** A global state is a flat tuple of small ints: one position per session's
  connection, per user's context, run, stream length, stream slot, kinds sequence, and per
  session's resume point and context epoch. Component values are interned per family (an id per
  distinct configuration), so hashing a state hashes a few ints. ``decode`` gives the ``State``
  back; only misses and counterexample paths need it.
- **Memoized rules.** ``System.successors`` is a sequence of rules (model/system.py ``_rules``),
  each a pure function that reads the state only through ``_Reads``. Run on the interned state,
  a rule's reads are recorded in order; its steps (as writes to positions) are stored in a
  decision tree keyed by the values it read. Any later state that agrees on those values gets
  the same steps without running the rule: a deterministic function that read the same values
  took the same path and read nothing else. The derived facts (``has_session`` per user,
  ``account_full``) are memoized the same way and appended to the state's vector; the route
  function is probed once and treated as a table when it never looks at the state.
- **Memoized checks.** A step invariant's verdict is stored with the step it judged when the
  check looked only at the step's action, arguments and firings (which the rule's reads fix);
  a check that reads the state before or after is run again on every step it judges. A state
  invariant is memoized on the ``State`` fields it read (a decision tree over field values).
  Reads are seen through a proxy (:class:`_Watched`) that records every attribute and item
  access, so no check is ever skipped that could fire.

The one assumption is the model's own: rules, checks and the route function are pure functions
of what they are given (no clock, no randomness, nothing kept between calls, no identity or type
test on the state object, which the proxy cannot see). A rule caught reading differently on the
same answers is refused with a ``ModelDefinitionError``, and a counterexample's rebuilt path must
reach the states the search recorded. Everything is built lazily during one exploration and
thrown away after it.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Hashable, Iterator
from typing import Any, cast

from pipeproof.errors import ModelDefinitionError
from pipeproof.model.invariants import Invariant
from pipeproof.model.spec import Config
from pipeproof.model.system import State, Step, System, _apply, _Local, _rules

Vec = tuple[Any, ...]
"""A state's base tuple followed by what is derived from it (see ``Compiled.vectorize``)."""

_MISSING: Any = object()  # no branch for this value yet (distinct from every leaf)

_NODE_FIELDS = {"up": "up0", "lease": "lease0", "holds": "holds0", "run_lease": "rlease0",
                "run_holds": "rholds0", "behind": "behind0"}
"""The node fields of ``State`` and their base offsets (each written at a flat index)."""


class _Node:
    """An inner node of a decision tree: which position to look at, one child per value seen."""

    __slots__ = ("kids", "pos")

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self.kids: dict[Hashable, Any] = {}


class _Memo:
    """A pure function of a vector, memoized on the positions it read, in the order it read them.

    ``evaluate(vec)`` returns (positions read, result). The tree's root asks for the first
    position every evaluation reads; each answer leads to the next position that evaluation read,
    and so on to the result. Determinism makes this exact: an evaluation that sees the same
    answers asks the same next question.
    """

    __slots__ = ("evaluate", "name", "root")

    def __init__(self, name: str, evaluate: Callable[[Vec], tuple[list[int], Any]]) -> None:
        self.name = name
        self.evaluate = evaluate
        self.root: Any = _MISSING

    def get(self, vec: Vec) -> Any:
        node = self.root
        while type(node) is _Node:
            node = node.kids.get(vec[node.pos], _MISSING)
        if node is _MISSING:
            return self.miss(vec)
        return node

    def miss(self, vec: Vec) -> Any:
        trace, leaf = self.evaluate(vec)
        if not trace:
            if self.root is not _MISSING and self.root is not leaf:
                raise self._nondeterministic("read nothing once and something another time")
            self.root = leaf
            return leaf
        if self.root is _MISSING:
            self.root = _Node(trace[0])
        node = self.root
        last = len(trace) - 1
        for j, pos in enumerate(trace):
            if type(node) is not _Node or node.pos != pos:
                raise self._nondeterministic(f"read position {pos} where an earlier run read another")
            key = vec[pos]
            if j == last:
                node.kids[key] = leaf
            else:
                child = node.kids.get(key, _MISSING)
                if child is _MISSING:
                    child = node.kids[key] = _Node(trace[j + 1])
                node = child
        return leaf

    def _nondeterministic(self, why: str) -> ModelDefinitionError:
        return ModelDefinitionError("system", "deterministic_rules", f"{self.name} is not a pure function: {why}")


class _Table:
    """Interned values of one family: id 0 is reserved for an empty stream slot."""

    __slots__ = ("ids", "values")

    def __init__(self) -> None:
        self.ids: dict[Hashable, int] = {}
        self.values: list[Any] = [None]

    def intern(self, value: Hashable) -> int:
        got = self.ids.get(value)
        if got is None:
            got = self.ids[value] = len(self.values)
            self.values.append(value)
        return got


class Item:
    """One step of a memoized rule: its writes to base positions, its coverage, its checks.

    ``checks`` holds, per step invariant that had something to say or must be asked each time,
    the messages it returned or ``None`` (it read the state: run it again on every occurrence).
    ``slow`` is set while coverage is still to be recorded or a check is attached, so the
    explorer's loop tests one flag per step.
    """

    __slots__ = ("checks", "cover", "fresh", "local", "slow", "writes")

    def __init__(self, writes: tuple[tuple[int, Any], ...], local: _Local, cover: tuple[tuple[str, str], ...],
                 checks: tuple[tuple[Invariant, tuple[str, ...] | None], ...]) -> None:
        self.writes = writes
        self.local = local
        self.cover = cover
        self.checks = checks
        self.fresh = True
        self.slow = True


class _Group:
    """Consecutive rules whose first read is the same position: that position is looked up once
    and answers with the rules' subtrees, rules that have nothing to offer left out."""

    __slots__ = ("memos", "plans", "pos")

    def __init__(self, pos: int, memos: list[_Memo]) -> None:
        self.pos = pos
        self.memos = memos
        self.plans: dict[Hashable, tuple[tuple[_Memo, Any], ...]] = {}

    def build(self, vec: Vec) -> tuple[tuple[_Memo, Any], ...]:
        plan: list[tuple[_Memo, Any]] = []
        for memo in self.memos:
            memo.get(vec)  # make sure the branch for this value exists
            root = memo.root
            node = root.kids[vec[root.pos]] if type(root) is _Node else root
            if type(node) is _Node or node:
                plan.append((memo, node))
        out = self.plans[vec[self.pos]] = tuple(plan)
        return out


class _Watched:
    """A ``State`` that records what is read of it: field names, or ``"*"`` for anything else
    (indexing, iteration, comparison, methods). Checks and route functions see this instead of the
    state when the compiler needs to know whether, and what, they read."""

    __slots__ = ("_state", "reads")

    def __init__(self, state: State) -> None:
        self._state = state
        self.reads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.reads.append(name if name in State._fields else "*")
        return getattr(self._state, name)

    def _whole(self) -> State:
        self.reads.append("*")
        return self._state

    def __getitem__(self, key: Any) -> Any:
        return self._whole()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._whole())

    def __len__(self) -> int:
        return len(self._whole())

    def __contains__(self, item: object) -> bool:
        return item in self._whole()

    def __eq__(self, other: object) -> bool:
        return self._whole() == (other._whole() if isinstance(other, _Watched) else other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self._whole())

    def __bool__(self) -> bool:
        return bool(self._whole())

    def __repr__(self) -> str:
        return repr(self._whole())


def _watched(state: State) -> tuple[State, _Watched]:
    w = _Watched(state)
    return cast(State, w), w


class _Tracer:
    """``_Reads`` over a vector, recording each position read (once, in order)."""

    __slots__ = ("_seen", "_state", "c", "trace", "vec")

    def __init__(self, c: Compiled, vec: Vec) -> None:
        self.c = c
        self.vec = vec
        self.trace: list[int] = []
        self._seen: set[int] = set()
        self._state: State | None = None

    def _read(self, pos: int) -> Any:
        if pos not in self._seen:
            self._seen.add(pos)
            self.trace.append(pos)
        return self.vec[pos]

    def conn(self, s: int) -> Config:
        return cast(Config, self.c.conns.values[self._read(self.c.conn0 + s)])

    def ctx(self, u: int) -> Config:
        return cast(Config, self.c.ctxs.values[self._read(self.c.ctx0 + u)])

    def run(self, u: int) -> Config:
        return cast(Config, self.c.runs.values[self._read(self.c.run0 + u)])

    def stream_len(self, u: int) -> int:
        return cast(int, self._read(self.c.len0 + u))

    def event(self, u: int, i: int) -> Config:
        if not 0 <= i < self.c.slots:
            raise IndexError(f"stream slot {i} outside events_per_user {self.c.slots}")
        return cast(Config, self.c.events.values[self._read(self.c.ev0 + u * self.c.slots + i)])

    def kinds(self, u: int) -> tuple[str, ...]:
        return cast(tuple[str, ...], self.c.kinds.values[self._read(self.c.kinds0 + u)])

    def resume(self, s: int) -> int:
        return cast(int, self._read(self.c.resume0 + s))

    def up(self, n: int) -> bool:
        return cast(bool, self._read(self.c.up0 + n))

    def lease(self, u: int) -> int:
        return cast(int, self._read(self.c.lease0 + u))

    def holds(self, u: int) -> int:
        return cast(int, self._read(self.c.holds0 + u))

    def run_lease(self, u: int) -> int:
        return cast(int, self._read(self.c.rlease0 + u))

    def run_holds(self, u: int) -> int:
        return cast(int, self._read(self.c.rholds0 + u))

    def behind(self, u: int, n: int) -> int:
        return cast(int, self._read(self.c.behind0 + u * self.c.nodes + n))

    def has_session(self, u: int) -> bool:
        return cast(bool, self._read(self.c.has0 + u))

    def account_full(self, n: int = 0) -> bool:
        return cast(bool, self._read(self.c.full + n))

    def routed(self, s: int, u: int) -> bool:
        c = self.c
        if c.routes is not None:
            return c.routes[s][u]
        self._read(c.whole)  # the route looks at the state: it depends on all of it
        if self._state is None:
            self._state = c.decode(self.vec[c.whole])
        return c.system.model.route(c.system, self._state, s, u)


class Compiled:
    """One system prepared for exploration (see the module docstring).

    ``step_invariants`` are judged with each memoized step; ``violated`` is the explorer's
    violation table, read so that an invariant already violated is not asked again.
    """

    def __init__(self, system: System, step_invariants: tuple[Invariant, ...], violated: dict[str, Any]) -> None:
        self.system = system
        self.step_invariants = step_invariants
        self.violated = violated
        b = system.bounds
        S, U, K, N = b.sessions, b.users, b.events_per_user, b.nodes
        self.sessions, self.users, self.slots, self.nodes = S, U, K, N
        # Base layout: each State field is a contiguous range (state checks probe whole fields).
        self.conn0 = 0
        self.ctx0 = S
        self.run0 = S + U
        self.len0 = S + 2 * U  # events: the stream lengths, then the slots, user by user
        self.ev0 = S + 3 * U
        self.kinds0 = self.ev0 + U * K
        self.resume0 = self.kinds0 + U
        self.epoch0 = self.resume0 + S
        self.up0 = self.epoch0 + S  # nodes: up per node, then per user the leases and beliefs
        self.lease0 = self.up0 + N
        self.holds0 = self.lease0 + U
        self.rlease0 = self.holds0 + U
        self.rholds0 = self.rlease0 + U
        self.behind0 = self.rholds0 + U
        self.width = self.behind0 + U * N
        # The vector: the base, the base itself (for a route that reads the state), the derived facts.
        self.whole = self.width
        self.has0 = self.whole + 1
        self.full = self.has0 + U
        self.field_ranges = (
            (self.conn0, self.ctx0), (self.ctx0, self.run0), (self.run0, self.len0), (self.len0, self.kinds0),
            (self.kinds0, self.resume0), (self.resume0, self.epoch0), (self.epoch0, self.up0),
            (self.up0, self.lease0), (self.lease0, self.holds0), (self.holds0, self.rlease0),
            (self.rlease0, self.rholds0), (self.rholds0, self.behind0), (self.behind0, self.width),
        )
        assert len(self.field_ranges) == len(State._fields)
        self._slice_fields = operator.itemgetter(*(slice(a, z) for a, z in self.field_ranges))
        self.conns, self.ctxs, self.runs, self.events, self.kinds = (_Table() for _ in range(5))
        self.covered: dict[str, set[str]] = {}
        self.routes = self._probe_routes()
        self.derived = [
            *(_Memo(f"has_session(u{u})", self._derived(functools.partial(system._has_session, user=u)))
              for u in range(U)),
            *(_Memo(f"account_full(n{n})", self._derived(functools.partial(system._account_full, node=n)))
              for n in range(N)),
        ]
        self.rules = [
            _Memo(f"{rule.__name__}{args}", self._rule(rule, args)) for rule, args in _rules(b)
        ]
        self.groups: list[_Group] | None = None

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, state: State) -> tuple[int, ...]:
        K = self.slots
        events: list[int] = []
        for stream in state.events:
            if len(stream) > K:
                raise ModelDefinitionError("system", "bounds", f"a stream of {len(stream)} events > {K} slots")
            events += [self.events.intern(cfg) for cfg in stream] + [0] * (K - len(stream))
        return (
            *(self.conns.intern(c) for c in state.conns), *(self.ctxs.intern(c) for c in state.ctxs),
            *(self.runs.intern(c) for c in state.runs), *(len(stream) for stream in state.events), *events,
            *(self.kinds.intern(k) for k in state.kinds), *state.resume, *state.epoch_seen,
            *state.up, *state.lease, *state.holds, *state.run_lease, *state.run_holds, *state.behind,
        )

    def decode(self, base: tuple[int, ...]) -> State:
        K = self.slots
        ev = self.events.values
        return State(
            conns=tuple(self.conns.values[x] for x in base[self.conn0:self.ctx0]),
            ctxs=tuple(self.ctxs.values[x] for x in base[self.ctx0:self.run0]),
            runs=tuple(self.runs.values[x] for x in base[self.run0:self.len0]),
            events=tuple(
                tuple(ev[x] for x in base[self.ev0 + u * K:self.ev0 + u * K + base[self.len0 + u]])
                for u in range(self.users)
            ),
            kinds=tuple(self.kinds.values[x] for x in base[self.kinds0:self.resume0]),
            resume=base[self.resume0:self.epoch0],
            epoch_seen=base[self.epoch0:self.up0],
            up=cast(tuple[bool, ...], base[self.up0:self.lease0]),
            lease=base[self.lease0:self.holds0],
            holds=base[self.holds0:self.rlease0],
            run_lease=base[self.rlease0:self.rholds0],
            run_holds=base[self.rholds0:self.behind0],
            behind=base[self.behind0:self.width],
        )

    def vectorize(self, base: tuple[int, ...]) -> Vec:
        """The base, itself, then each derived fact (``has_session`` per user, ``account_full`` per node)."""
        ext = (*base, base)
        return (*ext, *[memo.get(ext) for memo in self.derived])

    def fields(self, base: tuple[int, ...]) -> Vec:
        """One value per ``State`` field (its range of the base), then the base: what state checks probe."""
        return (*self._slice_fields(base), base)

    # -- memoized functions ----------------------------------------------------------------------
    def _probe_routes(self) -> list[list[bool]] | None:
        """The route function as a table, when it never looks at the state (then it cannot depend on it)."""
        system = self.system
        init = system.initial()
        table: list[list[bool]] = []
        for s in range(self.sessions):
            row = []
            for u in range(self.users):
                proxy, w = _watched(init)
                row.append(system.model.route(system, proxy, s, u))
                if w.reads:
                    return None
            table.append(row)
        return table

    def _derived(self, fact: Callable[[_Tracer], bool]) -> Callable[[Vec], tuple[list[int], Any]]:
        def evaluate(ext: Vec) -> tuple[list[int], Any]:
            t = _Tracer(self, ext)
            value = fact(t)
            return t.trace, value

        return evaluate

    def _rule(self, rule: Callable[..., Iterator[_Local]], args: tuple[int, ...]
              ) -> Callable[[Vec], tuple[list[int], Any]]:
        def evaluate(vec: Vec) -> tuple[list[int], Any]:
            t = _Tracer(self, vec)
            locals_ = list(rule(self.system, t, *args))
            before = self.decode(vec[self.whole]) if locals_ and self.step_invariants else None
            return t.trace, tuple(self._item(t, local, before) for local in locals_)

        return evaluate

    def _item(self, t: _Tracer, local: _Local, before: State | None) -> Item:
        vec = t.vec
        writes: list[tuple[int, Any]] = []
        for name, index, value in local.writes:
            if name == "events":
                u, i = index
                length = vec[self.len0 + u]
                if not 0 <= i < self.slots or i > length:
                    raise ModelDefinitionError("system", "bounds", f"{local.action} writes stream slot {i} of {length}")
                if i == length:
                    if self.len0 + u not in t._seen:
                        # The new length is written for every state sharing this rule's result,
                        # so it must be one of the values the rule read.
                        raise ModelDefinitionError("system", "deterministic_rules",
                                                   f"{local.action} appends without reading the stream's length")
                    writes.append((self.len0 + u, length + 1))
                writes.append((self.ev0 + u * self.slots + i, self.events.intern(value)))
            elif name == "conns":
                writes.append((self.conn0 + index, self.conns.intern(value)))
            elif name == "ctxs":
                writes.append((self.ctx0 + index, self.ctxs.intern(value)))
            elif name == "runs":
                writes.append((self.run0 + index, self.runs.intern(value)))
            elif name == "kinds":
                writes.append((self.kinds0 + index, self.kinds.intern(value)))
            elif name == "resume":
                writes.append((self.resume0 + index, value))
            elif name == "epoch_seen":
                writes.append((self.epoch0 + index, value))
            elif name in _NODE_FIELDS:
                writes.append((getattr(self, _NODE_FIELDS[name]) + index, value))
            else:
                raise ModelDefinitionError("system", "declared_fields", f"{local.action} writes unknown field {name!r}")
        system = self.system
        cover = tuple((system.machine(f.family).name, f.transition.key) for f in local.firings)
        checks: list[tuple[Invariant, tuple[str, ...] | None]] = []
        if before is not None:
            after = _apply(before, local.writes)
            for inv in self.step_invariants:
                if inv.name in self.violated:
                    continue  # never asked again in this exploration
                assert inv.step_check is not None
                before_p, wb = _watched(before)
                after_p, wa = _watched(after)
                msgs = tuple(inv.step_check(system, Step(*local[:4], after_p), before_p))
                if wb.reads or wa.reads:
                    checks.append((inv, None))
                elif msgs:
                    checks.append((inv, msgs))
        return Item(tuple(writes), local, cover, tuple(checks))

    def state_memo(self, name: str, check: Callable[[System, State], list[str]]) -> _Memo:
        """A state check memoized on the fields it reads (probe ``fields(base)``)."""
        index = {f: k for k, f in enumerate(State._fields)}
        whole = len(State._fields)

        def evaluate(fv: Vec) -> tuple[list[int], Any]:
            proxy, w = _watched(self.decode(fv[whole]))
            msgs = tuple(check(self.system, proxy))
            trace = list(dict.fromkeys(index.get(f, whole) for f in w.reads))
            return trace, msgs

        return _Memo(name, evaluate)

    # -- successors ------------------------------------------------------------------------------
    def expand(self, vec: Vec) -> list[tuple[Item, ...]]:
        """The memoized steps of the state ``vec``, rule by rule in ``System.successors`` order."""
        groups = self.groups
        if groups is None:
            groups = self.groups = self._group(vec)
        out = []
        for g in groups:
            plan = g.plans.get(vec[g.pos], _MISSING)
            if plan is _MISSING:
                plan = g.build(vec)
            for memo, node in plan:
                while type(node) is _Node:
                    node = node.kids.get(vec[node.pos], _MISSING)
                if node is _MISSING:
                    node = memo.miss(vec)
                if node:
                    out.append(node)
        return out

    def _group(self, vec: Vec) -> list[_Group]:
        """Group consecutive rules by their first read (known once each has run: nothing is read
        before it, so it is the same for every state)."""
        groups: list[_Group] = []
        for memo in self.rules:
            memo.get(vec)
            pos = memo.root.pos if type(memo.root) is _Node else None
            if groups and pos is not None and groups[-1].pos == pos and type(groups[-1].memos[0].root) is _Node:
                groups[-1].memos.append(memo)
            else:
                groups.append(_Group(pos if pos is not None else 0, [memo]))
        return groups

    def successors(self, base: tuple[int, ...]) -> list[tuple[Item, tuple[int, ...]]]:
        """(item, next base) for every step of ``base``, in order (for tests and cross-checks)."""
        out = []
        for leaf in self.expand(self.vectorize(base)):
            for item in leaf:
                nxt = list(base)
                for p, value in item.writes:
                    nxt[p] = value
                out.append((item, tuple(nxt)))
        return out

    def step(self, base: tuple[int, ...], k: int, after: tuple[int, ...]) -> Step:
        """The ``k``-th step of ``base`` as ``System.successors`` gives it (with its ``State``),
        which must lead to ``after``: a counterexample's path is rebuilt from these."""
        state = self.decode(base)
        for j, step in enumerate(self.system.successors(state)):
            if j == k:
                if step.after != self.decode(after):
                    break
                return step
        raise ModelDefinitionError("system", "deterministic_rules",
                                   f"step {k} of {state} is not the one the compiled explorer took")
