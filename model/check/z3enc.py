"""Z3 encoding of one declared machine (docs/proofs.md, "encoding"; docs/protocol.md sections 1, 3-5).

Nothing here restates a transition. A :class:`MachineEnc` reads a :class:`~pipeproof.model.spec.Machine`
and derives, for every declared transition, its Z3 relation ``source /\\ guard /\\ target /\\ updates``
(guards and updates translated from the expression AST with :meth:`Expr.translate`, variables not
updated framed to their old value). States become an ``EnumSort``; ``int`` variables ``Int``,
``bool`` variables ``Bool``. Parameters are either the machine's concrete values (a finite
instance) or symbolic ``Int`` constants (the parametric proofs, model/check/z3system.py).

tests/model/test_z3enc.py cross-checks the relation against ``Machine.fire_all`` and the
python-statemachine ``Runner`` on every (state, event) pair, so the encoding cannot drift.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import z3

from pipeproof.model.expr import Ops, Value, lift
from pipeproof.model.spec import Config, Machine, Transition

Term = Any
"""A Z3 expression (z3 ships no type information)."""

_ENUMS: dict[tuple[str, tuple[str, ...]], EnumEnc] = {}


@dataclass(frozen=True)
class EnumEnc:
    """A Python enum (or a list of names) as a Z3 ``EnumSort``; one sort per distinct member list."""

    name: str
    sort: Term
    members: tuple[str, ...]
    consts: tuple[Term, ...]

    def __getitem__(self, member: str | enum.Enum) -> Term:
        key = member.name if isinstance(member, enum.Enum) else member
        return self.consts[self.members.index(key)]

    def decode(self, value: Term) -> str:
        """The member name of a model value (``model.eval(term)``)."""
        for name, c in zip(self.members, self.consts, strict=True):
            if z3.eq(c, value):
                return name
        raise KeyError(f"{value} is not a member of {self.name}")

    def one_of(self, term: Term, members: Sequence[str | enum.Enum]) -> Term:
        return z3.Or([term == self[m] for m in members]) if members else z3.BoolVal(False)


def enum_sort(name: str, members: Sequence[str]) -> EnumEnc:
    """The Z3 ``EnumSort`` for ``members``; cached because Z3 rejects two datatypes with one name."""
    key = (name, tuple(members))
    found = _ENUMS.get(key)
    if found is not None:
        return found
    # A second member list under the same name (a mutant adding a state) gets a distinct sort name.
    sort_name = name if not any(k[0] == name for k in _ENUMS) else f"{name}_{len(_ENUMS)}"
    sort, consts = z3.EnumSort(sort_name, [f"{sort_name}.{m}" for m in members])
    enc = EnumEnc(sort_name, sort, tuple(members), tuple(consts))
    _ENUMS[key] = enc
    return enc


def states_enum(machine: Machine) -> EnumEnc:
    return enum_sort(machine.states.__name__, [s.name for s in machine.states])


def value_term(value: Value) -> Term:
    return z3.BoolVal(value) if isinstance(value, bool) else z3.IntVal(value)


def _binop(op: str, a: Term, b: Term) -> Term:
    if op == "and":
        return z3.And(a, b)
    if op == "or":
        return z3.Or(a, b)
    table: dict[str, Callable[[Term, Term], Term]] = {
        "+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
        "<": lambda x, y: x < y, "<=": lambda x, y: x <= y, ">": lambda x, y: x > y,
        ">=": lambda x, y: x >= y, "==": lambda x, y: x == y, "!=": lambda x, y: x != y,
    }
    return table[op](a, b)


Z3_OPS = Ops(binop=_binop, neg=z3.Not, ite=z3.If, const=value_term)
"""How ``Expr.translate`` folds a guard or update into a Z3 term."""


@dataclass(frozen=True)
class ZCfg:
    """A machine configuration as Z3 terms: the control state and each variable."""

    state: Term
    vars: Mapping[str, Term]

    def __getitem__(self, name: str) -> Term:
        return self.vars[name]


class MachineEnc:
    """The Z3 view of one ``Machine``; ``params`` maps parameter names to Z3 terms (default: concrete)."""

    def __init__(self, machine: Machine, params: Mapping[str, Term] | None = None) -> None:
        self.machine = machine
        self.states = states_enum(machine)
        self.params: dict[str, Term] = (
            dict(params) if params is not None else {k: value_term(v) for k, v in machine.params.items()}
        )

    # -- sorts and fresh configurations -----------------------------------------------------------
    def var_sort(self, name: str) -> Term:
        decl = next(v for v in self.machine.variables if v.name == name)
        return z3.BoolSort() if decl.type is bool else z3.IntSort()

    def fresh(self, prefix: str) -> ZCfg:
        return ZCfg(
            z3.Const(f"{prefix}.state", self.states.sort),
            {v.name: z3.Const(f"{prefix}.{v.name}", self.var_sort(v.name)) for v in self.machine.variables},
        )

    def concrete(self, config: Config) -> ZCfg:
        return ZCfg(self.states[config[0]],
                    {n: value_term(v) for n, v in zip(self.machine.var_names, config[1], strict=True)})

    def initial(self) -> ZCfg:
        return self.concrete(self.machine.initial_config())

    def decode(self, model: Term, cfg: ZCfg) -> Config:
        """The Python configuration a Z3 model assigns to ``cfg``."""
        state = self.machine.states[self.states.decode(model.eval(cfg.state, model_completion=True))]
        values: list[Value] = []
        for v in self.machine.variables:
            val = model.eval(cfg.vars[v.name], model_completion=True)
            values.append(z3.is_true(val) if v.type is bool else val.as_long())
        return (state, tuple(values))

    def eq(self, a: ZCfg, b: ZCfg) -> Term:
        return z3.And(a.state == b.state, *[a.vars[n] == b.vars[n] for n in self.machine.var_names])

    # -- expressions -----------------------------------------------------------------------------
    def _leaf(self, cfg: ZCfg, inputs: Mapping[str, Term]) -> Callable[[str, str], Term]:
        def leaf(kind: str, name: str) -> Term:
            if kind == "var":
                return cfg.vars[name]
            if kind == "param":
                return self.params[name]
            return inputs[name]

        return leaf

    def guard(self, t: Transition, cfg: ZCfg, inputs: Mapping[str, Term] | None = None) -> Term:
        """``source /\\ guard`` of ``t`` in ``cfg``: the transition is enabled."""
        g = t.guard.translate(self._leaf(cfg, inputs or {}), Z3_OPS)
        return z3.And(cfg.state == self.states[t.source], g)

    def update(self, t: Transition, cfg: ZCfg, inputs: Mapping[str, Term] | None = None) -> ZCfg:
        """The configuration after ``t`` (simultaneous assignment; unmentioned variables framed)."""
        leaf = self._leaf(cfg, inputs or {})
        upd = dict(t.updates)
        return ZCfg(
            self.states[t.target],
            {n: (lift(upd[n]).translate(leaf, Z3_OPS) if n in upd else cfg.vars[n]) for n in self.machine.var_names},
        )

    def relation(self, t: Transition, pre: ZCfg, post: ZCfg, inputs: Mapping[str, Term] | None = None) -> Term:
        """``t`` as a relation between two configurations."""
        return z3.And(self.guard(t, pre, inputs), self.eq(post, self.update(t, pre, inputs)))

    def transitions(self, event: str) -> tuple[Transition, ...]:
        return tuple(t for t in self.machine.transitions if t.event == event)

    def event_relation(self, event: str, pre: ZCfg, post: ZCfg, inputs: Mapping[str, Term] | None = None) -> Term:
        """Every successor ``Machine.fire_all(pre, event)`` gives: the disjunction of the event's transitions."""
        return z3.Or([self.relation(t, pre, post, inputs) for t in self.transitions(event)] or [z3.BoolVal(False)])

    def enabled(self, event: str, cfg: ZCfg, inputs: Mapping[str, Term] | None = None) -> Term:
        return z3.Or([self.guard(t, cfg, inputs) for t in self.transitions(event)] or [z3.BoolVal(False)])

    def first_guard(self, t: Transition, cfg: ZCfg, inputs: Mapping[str, Term] | None = None) -> Term:
        """``t`` is the first enabled transition of its event (what ``fire_all(...)[0]`` picks)."""
        earlier = []
        for u in self.machine.transitions:
            if u is t:
                break
            if u.event == t.event and u.source is t.source:
                earlier.append(z3.Not(self.guard(u, cfg, inputs)))
        return z3.And(self.guard(t, cfg, inputs), *earlier)

    def fire_first(self, event: str, cfg: ZCfg, inputs: Mapping[str, Term] | None = None) -> tuple[Term, ZCfg]:
        """(enabled, successor) of the first enabled transition, as an if-then-else over the
        declaration order; the successor is ``cfg`` itself when nothing is enabled."""
        result = cfg
        enabled = z3.BoolVal(False)
        for t in reversed(self.transitions(event)):
            g = self.guard(t, cfg, inputs)
            nxt = self.update(t, cfg, inputs)
            result = ZCfg(z3.If(g, nxt.state, result.state),
                          {n: z3.If(g, nxt.vars[n], result.vars[n]) for n in self.machine.var_names})
            enabled = z3.Or(g, enabled)
        return z3.simplify(enabled), result
