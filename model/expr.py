"""A tiny expression language for guards and updates.

Guards and variable updates are data, not Python lambdas, so that one declaration can be
evaluated by the explorer and Hypothesis, translated to Z3, and printed on a diagram without a
second hand-kept copy (docs/architecture.md, "one declaration"). The language has just what the
protocol's machines need: integer and boolean variables, machine parameters (bounds such as
``max_attempts``), inputs the composed system supplies at fire time (``has_session``),
constants, arithmetic, comparison, boolean connectives and if-then-else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Value = int | bool


class Expr:
    """Base of every expression node. Operators build new nodes; ``evaluate`` computes a value."""

    def evaluate(self, env: Env) -> Value:
        raise NotImplementedError

    def names(self) -> frozenset[tuple[str, str]]:
        """Every (kind, name) this expression reads: kind is ``var``, ``param`` or ``input``."""
        raise NotImplementedError

    def render(self) -> str:
        raise NotImplementedError

    def translate(self, leaf: Callable[[str, str], Any], ops: Ops) -> Any:
        """Fold the tree into another representation (Z3 terms); ``leaf(kind, name)`` maps names."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.render()

    # Arithmetic and comparison build nodes. ``==`` stays Python identity-of-value equality
    # (nodes are hashable dataclasses), so equality of expressions is spelled ``.eq()``.
    def __add__(self, other: ExprLike) -> Expr:
        return BinOp("+", self, lift(other))

    def __sub__(self, other: ExprLike) -> Expr:
        return BinOp("-", self, lift(other))

    def __mul__(self, other: ExprLike) -> Expr:
        return BinOp("*", self, lift(other))

    def __lt__(self, other: ExprLike) -> Expr:
        return BinOp("<", self, lift(other))

    def __le__(self, other: ExprLike) -> Expr:
        return BinOp("<=", self, lift(other))

    def __gt__(self, other: ExprLike) -> Expr:
        return BinOp(">", self, lift(other))

    def __ge__(self, other: ExprLike) -> Expr:
        return BinOp(">=", self, lift(other))

    def __and__(self, other: ExprLike) -> Expr:
        return BinOp("and", self, lift(other))

    def __or__(self, other: ExprLike) -> Expr:
        return BinOp("or", self, lift(other))

    def __invert__(self) -> Expr:
        return Not(self)

    def eq(self, other: ExprLike) -> Expr:
        return BinOp("==", self, lift(other))

    def ne(self, other: ExprLike) -> Expr:
        return BinOp("!=", self, lift(other))


ExprLike = Expr | int | bool


@dataclass(frozen=True)
class Env:
    """Values for one evaluation: the machine's variables, its parameters and the fire-time inputs."""

    vars: Mapping[str, Value]
    params: Mapping[str, Value]
    inputs: Mapping[str, Value]


@dataclass(frozen=True)
class Ops:
    """How to combine translated children; the Z3 encoding supplies its own (model/check/z3enc.py)."""

    binop: Callable[[str, Any, Any], Any]
    neg: Callable[[Any], Any]
    ite: Callable[[Any, Any, Any], Any]
    const: Callable[[Value], Any]


@dataclass(frozen=True, eq=True)
class Const(Expr):
    value: Value

    def evaluate(self, env: Env) -> Value:
        return self.value

    def names(self) -> frozenset[tuple[str, str]]:
        return frozenset()

    def render(self) -> str:
        if isinstance(self.value, bool):
            return "true" if self.value else "false"
        return str(self.value)

    def translate(self, leaf: Callable[[str, str], Any], ops: Ops) -> Any:
        return ops.const(self.value)

    __hash__ = object.__hash__


@dataclass(frozen=True, eq=True)
class _Name(Expr):
    name: str
    kind = "var"

    def names(self) -> frozenset[tuple[str, str]]:
        return frozenset({(self.kind, self.name)})

    def render(self) -> str:
        return self.name

    def translate(self, leaf: Callable[[str, str], Any], ops: Ops) -> Any:
        return leaf(self.kind, self.name)

    __hash__ = object.__hash__


@dataclass(frozen=True, eq=True)
class Var(_Name):
    """A machine variable (declared with ``VarDecl``)."""

    kind = "var"

    def evaluate(self, env: Env) -> Value:
        return env.vars[self.name]


@dataclass(frozen=True, eq=True)
class Param(_Name):
    """A machine parameter: a bound fixed for a run (``max_attempts``, ``buffer_max``)."""

    kind = "param"

    def evaluate(self, env: Env) -> Value:
        return env.params[self.name]


@dataclass(frozen=True, eq=True)
class Input(_Name):
    """A fact the composed system supplies when it fires the event (``has_session``)."""

    kind = "input"

    def evaluate(self, env: Env) -> Value:
        return env.inputs[self.name]

    def render(self) -> str:
        return f"?{self.name}"


_BINOPS: dict[str, Callable[[Any, Any], Value]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "and": lambda a, b: bool(a) and bool(b),
    "or": lambda a, b: bool(a) or bool(b),
}


@dataclass(frozen=True, eq=True)
class BinOp(Expr):
    op: str
    left: Expr
    right: Expr

    def evaluate(self, env: Env) -> Value:
        return _BINOPS[self.op](self.left.evaluate(env), self.right.evaluate(env))

    def names(self) -> frozenset[tuple[str, str]]:
        return self.left.names() | self.right.names()

    def render(self) -> str:
        op = {"and": "&&", "or": "||"}.get(self.op, self.op)
        return f"({self.left.render()} {op} {self.right.render()})"

    def translate(self, leaf: Callable[[str, str], Any], ops: Ops) -> Any:
        return ops.binop(self.op, self.left.translate(leaf, ops), self.right.translate(leaf, ops))

    __hash__ = object.__hash__


@dataclass(frozen=True, eq=True)
class Not(Expr):
    operand: Expr

    def evaluate(self, env: Env) -> Value:
        return not self.operand.evaluate(env)

    def names(self) -> frozenset[tuple[str, str]]:
        return self.operand.names()

    def render(self) -> str:
        return f"!{self.operand.render()}"

    def translate(self, leaf: Callable[[str, str], Any], ops: Ops) -> Any:
        return ops.neg(self.operand.translate(leaf, ops))

    __hash__ = object.__hash__


@dataclass(frozen=True, eq=True)
class Ite(Expr):
    """If-then-else; used for capped counters such as ``min(idle + 1, resume_window)``."""

    cond: Expr
    then: Expr
    other: Expr

    def evaluate(self, env: Env) -> Value:
        return self.then.evaluate(env) if self.cond.evaluate(env) else self.other.evaluate(env)

    def names(self) -> frozenset[tuple[str, str]]:
        return self.cond.names() | self.then.names() | self.other.names()

    def render(self) -> str:
        return f"({self.cond.render()} ? {self.then.render()} : {self.other.render()})"

    def translate(self, leaf: Callable[[str, str], Any], ops: Ops) -> Any:
        return ops.ite(
            self.cond.translate(leaf, ops), self.then.translate(leaf, ops), self.other.translate(leaf, ops)
        )

    __hash__ = object.__hash__


TRUE: Expr = Const(True)
FALSE: Expr = Const(False)


def lift(value: ExprLike) -> Expr:
    """Turn a Python literal into a ``Const``; expressions pass through."""
    if isinstance(value, Expr):
        return value
    return Const(value)


def capped_inc(name: str, cap: Expr, by: ExprLike = 1) -> Expr:
    """``min(name + by, cap)``: a counter that saturates, keeping the state space finite."""
    nxt = Var(name) + by
    return Ite(nxt > cap, cap, nxt)


def to_python(expr: Expr, var_index: Mapping[str, int], params: Mapping[str, Value]) -> str:
    """Python source for ``expr`` over a variables tuple ``v`` and an inputs mapping ``i``.

    Parameters are inlined as literals. The source comes only from this module's own node types,
    never from user text, so compiling it is as safe as the declaration itself; it exists because
    the explorer evaluates guards millions of times and a tree walk with dict lookups is ~20x slower.
    """

    def leaf(kind: str, name: str) -> str:
        if kind == "var":
            return f"v[{var_index[name]}]"
        if kind == "param":
            return repr(params[name])
        return f"i[{name!r}]"

    pyops = {"and": "and", "or": "or"}
    ops = Ops(
        binop=lambda op, a, b: f"({a} {pyops.get(op, op)} {b})",
        neg=lambda a: f"(not {a})",
        ite=lambda c, a, b: f"({a} if {c} else {b})",
        const=repr,
    )
    result: str = expr.translate(leaf, ops)
    return result
