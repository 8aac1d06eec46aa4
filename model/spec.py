"""Machines as data: states, variables, parameters, inputs and guarded transitions, declared once.

Every other artifact is derived from a ``Machine``: the python-statemachine class
(:func:`build_statemachine`), the explorer's successor function (model/system.py), the Hypothesis
rules (model/check/hypothesis_check.py), the Z3 transition relation and the DOT diagram. A machine is
validated when it is constructed: undeclared states or names, unreachable states, dead ends and
states from which no terminal (rest) state can be reached are rejected with a
:class:`~pipeproof.errors.ModelDefinitionError` naming the machine, the state and the rule.

The machine is pure: no clock, no I/O. Time is a variable the caller advances with an event.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from pipeproof.errors import IllegalTransition, ModelDefinitionError
from pipeproof.model.expr import TRUE, Env, Expr, ExprLike, Value, lift, to_python
from pipeproof.protocol import Close, Emit


class Kind(enum.Enum):
    """What a transition means to an architect; drives the diagram colours (docs/diagrams.md)."""

    HAPPY = "happy"
    ERROR = "error"
    TIMEOUT = "timeout"
    ESCALATION = "escalation"
    HOUSEKEEPING = "housekeeping"


@dataclass(frozen=True)
class VarDecl:
    """A small typed variable: ``int`` (bounded below by ``lo``) or ``bool``."""

    name: str
    type: type
    initial: Value
    lo: int = 0
    doc: str = ""


@dataclass(frozen=True)
class Transition:
    """One guarded transition ``source --event [guard] / updates--> target``.

    ``emits`` is what the server puts on the wire, typed (protocol/emits.py: ``Send``, ``Close``,
    ``Escalate``, ``Append``) so the server, the conformance kit, the trace checker and the
    diagrams read the same fact; ``invariants`` names the properties that constrain this edge.
    """

    event: str
    source: enum.Enum
    target: enum.Enum
    guard: Expr = TRUE
    updates: tuple[tuple[str, ExprLike], ...] = ()
    kind: Kind = Kind.HAPPY
    emits: Emit | None = None
    doc: str = ""
    invariants: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Literals in updates (``("queued", 0)``) become constants so every update is an Expr.
        object.__setattr__(self, "updates", tuple((n, lift(e)) for n, e in self.updates))

    @property
    def assignments(self) -> tuple[tuple[str, Expr], ...]:
        """``updates`` with every value an ``Expr`` (literals were lifted at construction)."""
        return tuple((n, lift(e)) for n, e in self.updates)

    @property
    def label(self) -> str:
        parts = [self.event]
        if self.guard is not TRUE:
            parts.append(f"[{self.guard.render()}]")
        if self.updates:
            parts.append("/ " + ", ".join(f"{n}:={e.render()}" for n, e in self.assignments))
        return " ".join(parts)

    @property
    def close(self) -> Close | None:
        """The close this transition sends, if it sends one."""
        return self.emits if isinstance(self.emits, Close) else None

    @property
    def key(self) -> str:
        """Stable identity used by coverage, mutants and diagrams."""
        return f"{self.source.name}--{self.event}-->{self.target.name}"


Config = tuple[enum.Enum, tuple[Value, ...]]
"""A machine's whole state: its control state and its variables in declaration order."""


@dataclass(frozen=True)
class Machine:
    """A declared state machine. Construction validates it (see module docstring)."""

    name: str
    states: type[enum.Enum]
    initial: enum.Enum
    terminal: frozenset[enum.Enum]
    transitions: tuple[Transition, ...]
    variables: tuple[VarDecl, ...] = ()
    params: Mapping[str, Value] = field(default_factory=dict)
    inputs: Mapping[str, type] = field(default_factory=dict)
    # The value an input takes when the caller does not supply it (the ordinary case: a frame
    # fits its budget). Checkers that must consider both values pass each explicitly.
    input_defaults: Mapping[str, Value] = field(default_factory=dict)
    doc: str = ""
    section: str = ""

    def __post_init__(self) -> None:
        validate(self)

    # -- derived views -------------------------------------------------------------------------
    @cached_property
    def events(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for t in self.transitions:
            seen.setdefault(t.event, None)
        return tuple(seen)

    @cached_property
    def var_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)

    def slot(self, name: str) -> int:
        """Where variable ``name`` sits in a configuration's values (derived from the declaration,
        so readers name the variable instead of hard-coding a position)."""
        try:
            return self.var_names.index(name)
        except ValueError:
            raise ModelDefinitionError(self.name, "declared_vars", f"no variable {name!r}") from None

    def value(self, config: Config, name: str) -> Value:
        """The value of variable ``name`` in ``config``."""
        return config[1][self.slot(name)]

    def transitions_from(self, state: enum.Enum, event: str | None = None) -> tuple[Transition, ...]:
        return tuple(
            t for t in self.transitions if t.source is state and (event is None or t.event == event)
        )

    @cached_property
    def _compiled(self) -> dict[tuple[enum.Enum, str | None], tuple[_Compiled, ...]]:
        """Guards and updates compiled to Python closures, indexed by (source, event)."""
        index = {n: k for k, n in enumerate(self.var_names)}
        table: dict[tuple[enum.Enum, str | None], list[_Compiled]] = {}
        for t in self.transitions:
            guard_src = to_python(t.guard, index, self.params)
            upd = dict(t.assignments)
            values = ", ".join(
                to_python(upd[n], index, self.params) if n in upd else f"v[{k}]" for k, n in enumerate(self.var_names)
            )
            guard = eval(f"lambda v, i: bool({guard_src})")
            update = eval(f"lambda v, i: ({values},)") if self.var_names else (lambda v, i: ())
            entry = _Compiled(t, guard, update)
            table.setdefault((t.source, t.event), []).append(entry)
            table.setdefault((t.source, None), []).append(entry)
        return {k: tuple(v) for k, v in table.items()}

    @cached_property
    def events_from(self) -> dict[enum.Enum, frozenset[str]]:
        """The events that have at least one transition out of each state (a fast pre-filter)."""
        out: dict[enum.Enum, set[str]] = {st: set() for st in self.states}
        for t in self.transitions:
            out[t.source].add(t.event)
        return {st: frozenset(evs) for st, evs in out.items()}

    def initial_config(self) -> Config:
        return (self.initial, tuple(v.initial for v in self.variables))

    def with_params(self, **params: Value) -> Machine:
        unknown = set(params) - set(self.params)
        if unknown:
            raise ModelDefinitionError(self.name, "declared_params", f"unknown parameters {sorted(unknown)}")
        return replace(self, params={**self.params, **params})

    # -- firing --------------------------------------------------------------------------------
    def with_defaults(self, inputs: Mapping[str, Value] | None) -> Mapping[str, Value]:
        if not self.input_defaults:
            return inputs or _NO_INPUTS
        return {**self.input_defaults, **(inputs or {})}

    def env(self, config: Config, inputs: Mapping[str, Value] | None = None) -> Env:
        return Env(dict(zip(self.var_names, config[1], strict=True)), self.params, self.with_defaults(inputs))

    def enabled(
        self, config: Config, event: str, inputs: Mapping[str, Value] | None = None
    ) -> tuple[Transition, ...]:
        """Every transition for ``event`` whose guard holds in ``config`` (usually zero or one)."""
        i = self.with_defaults(inputs)
        v = config[1]
        return tuple(c.transition for c in self._compiled.get((config[0], event), ()) if c.guard(v, i))

    def fire_all(
        self, config: Config, event: str | None, inputs: Mapping[str, Value] | None = None
    ) -> list[tuple[Transition, Config]]:
        """(transition, next config) for every enabled transition of ``event`` (``None``: any event)."""
        i = self.with_defaults(inputs)
        v = config[1]
        return [
            (c.transition, (c.transition.target, c.update(v, i)))
            for c in self._compiled.get((config[0], event), ())
            if c.guard(v, i)
        ]

    def apply(self, config: Config, transition: Transition, inputs: Mapping[str, Value] | None = None) -> Config:
        """The configuration after ``transition``; updates read the pre-state (simultaneous assignment)."""
        env = self.env(config, inputs)
        values = dict(env.vars)
        for name, expr in transition.assignments:
            values[name] = expr.evaluate(env)
        return (transition.target, tuple(values[n] for n in self.var_names))

    def evaluate_guard(self, config: Config, transition: Transition, inputs: Mapping[str, Value] | None = None) -> bool:
        """The declared guard evaluated by walking the expression tree (the reference semantics
        the compiled closures are tested against)."""
        return bool(transition.guard.evaluate(self.env(config, inputs)))

    def step(self, config: Config, event: str, inputs: Mapping[str, Value] | None = None) -> tuple[Transition, Config]:
        """Fire ``event`` deterministically: exactly the first enabled transition in declaration order.

        Raises :class:`IllegalTransition` when none is enabled: the server turns that into a
        documented close code, never a silent continue.
        """
        fired = self.fire_all(config, event, inputs)
        if not fired:
            raise IllegalTransition(self.name, event, config[0].name, self.describe(config))
        return fired[0]

    def successors(
        self, config: Config, inputs: Mapping[str, Value] | None = None
    ) -> Iterator[tuple[Transition, Config]]:
        yield from self.fire_all(config, None, inputs)

    def describe(self, config: Config) -> str:
        if not self.variables:
            return config[0].name
        vs = ", ".join(f"{n}={v}" for n, v in zip(self.var_names, config[1], strict=True))
        return f"{config[0].name}({vs})"


_NO_INPUTS: Mapping[str, Value] = {}


@dataclass(frozen=True)
class _Compiled:
    transition: Transition
    guard: Callable[[tuple[Value, ...], Mapping[str, Value]], bool]
    update: Callable[[tuple[Value, ...], Mapping[str, Value]], tuple[Value, ...]]


def validate(m: Machine) -> None:
    """Structural rules every machine must meet when it is defined (docs/model.md, "validation")."""
    states = set(m.states)
    if m.initial not in states:
        raise ModelDefinitionError(m.name, "declared_states", "initial state is not declared", str(m.initial))
    for s in m.terminal:
        if s not in states:
            raise ModelDefinitionError(m.name, "declared_states", "terminal state is not declared", str(s))
    if not m.terminal:
        raise ModelDefinitionError(m.name, "has_terminal", "a machine needs at least one terminal (rest) state")
    names = {v.name for v in m.variables}
    if len(names) != len(m.variables):
        raise ModelDefinitionError(m.name, "declared_vars", "a variable is declared twice")
    for t in m.transitions:
        for end, s in (("source", t.source), ("target", t.target)):
            if s not in states:
                raise ModelDefinitionError(
                    m.name, "declared_states", f"transition {t.event!r} has undeclared {end} {s!r}", str(s)
                )
        used = set(t.guard.names())
        for n, e in t.assignments:
            used |= {("var", n)} | set(e.names())
        for kind, n in used:
            declared = {"var": names, "param": set(m.params), "input": set(m.inputs)}[kind]
            if n not in declared:
                raise ModelDefinitionError(
                    m.name,
                    "declared_names",
                    f"transition {t.event!r} uses undeclared {kind} {n!r}",
                    t.source.name,
                )
    succ: dict[enum.Enum, set[enum.Enum]] = {s: set() for s in m.states}
    for t in m.transitions:
        succ[t.source].add(t.target)
    reach = _closure({m.initial}, succ)
    for s in m.states:
        if s not in reach:
            raise ModelDefinitionError(m.name, "no_unreachable_state", "unreachable from the initial state", s.name)
        if s not in m.terminal and not succ[s]:
            raise ModelDefinitionError(m.name, "no_dead_end", "dead end: no outgoing transition", s.name)
        if not (_closure({s}, succ) & m.terminal):
            raise ModelDefinitionError(m.name, "terminal_reachable", "no terminal state is reachable", s.name)


def _closure(start: set[enum.Enum], succ: Mapping[enum.Enum, set[enum.Enum]]) -> set[enum.Enum]:
    seen = set(start)
    todo = list(start)
    while todo:
        for n in succ[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


# -- python-statemachine ----------------------------------------------------------------------


class _Model:
    """The python-statemachine model object: holds the variables the guards read."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.values: dict[str, Value] = {v.name: v.initial for v in machine.variables}
        self.last: Transition | None = None


def build_statemachine(machine: Machine) -> type[Any]:
    """Derive a python-statemachine class from the declaration.

    One ``State`` per enum member; one ``Event`` per event name, joining that event's
    transitions in declaration order, each with a condition evaluating the declared guard and an
    action applying the declared updates. Terminal states without outgoing transitions are
    ``final``. Instances take a keyword ``inputs`` when an event is sent.
    """
    from statemachine import State, StateMachine

    outgoing = {t.source for t in machine.transitions}
    st: dict[enum.Enum, Any] = {}
    for s in machine.states:
        st[s] = State(
            s.name,
            value=s.name,
            initial=s is machine.initial,
            final=s in machine.terminal and s not in outgoing,
        )
    attrs: dict[str, Any] = {f"s_{s.name}": st[s] for s in machine.states}
    by_event: dict[str, Any] = {}
    for t in machine.transitions:
        tr = st[t.source].to(st[t.target], cond=_guard_callable(machine, t), on=_update_callable(machine, t))
        by_event[t.event] = tr if t.event not in by_event else by_event[t.event] | tr
    for event, trs in by_event.items():
        # Prefixed so an event called ``send`` cannot shadow ``StateMachine.send``.
        attrs[f"ev_{event}"] = trs
    attrs["_pipeproof_machine"] = machine
    return type(f"{machine.name.title().replace('_', '')}StateMachine", (StateMachine,), attrs)


def _guard_callable(machine: Machine, t: Transition) -> Any:
    def guard(model: _Model, inputs: Mapping[str, Value] | None = None) -> bool:
        return bool(t.guard.evaluate(Env(model.values, machine.params, machine.with_defaults(inputs))))

    guard.__name__ = f"guard_{t.key}"
    return guard


def _update_callable(machine: Machine, t: Transition) -> Any:
    def update(model: _Model, inputs: Mapping[str, Value] | None = None) -> None:
        env = Env(dict(model.values), machine.params, machine.with_defaults(inputs))
        for name, expr in t.assignments:
            model.values[name] = expr.evaluate(env)
        model.last = t

    update.__name__ = f"update_{t.key}"
    return update


class Runner:
    """A live instance of a machine for the I/O shell (impl/), with two interchangeable engines.

    ``engine="statemachine"`` drives a python-statemachine instance built from the declaration
    (:func:`build_statemachine`); ``engine="declaration"`` fires the declaration's compiled
    transitions directly, about 50x cheaper per transition, for hot paths such as event
    delivery. Both refuse exactly what the declaration refuses (tests/model/test_spec.py checks
    the two against each other on every (state, event) pair). ``start`` restores a stored
    configuration (an event or run recovered after a restart).

    ``fire`` raises :class:`IllegalTransition` (never returns a failure value); ``state`` and
    ``values`` expose the current configuration for the audit log.
    """

    def __init__(
        self,
        machine: Machine,
        sm_class: type[Any] | None = None,
        *,
        engine: str | None = None,
        start: Config | None = None,
    ) -> None:
        self.machine = machine
        self.engine = engine or "statemachine"
        if self.engine not in ("statemachine", "declaration"):
            raise ValueError(f"unknown engine {self.engine!r}")
        self.model = _Model(machine)
        begin = start if start is not None else machine.initial_config()
        self.model.values = dict(zip(machine.var_names, begin[1], strict=True))
        self._state = begin[0]
        self._vals = tuple(begin[1])  # the declaration engine's values, in var_names order
        self.sm: Any = None
        if self.engine == "statemachine":
            cls = sm_class or build_statemachine(machine)
            self.sm = cls(model=self.model, start_value=begin[0].name) if start is not None else cls(model=self.model)

    @property
    def state(self) -> enum.Enum:
        if self.sm is None:
            return self._state
        (current,) = tuple(self.sm.configuration)
        return self.machine.states[current.id.removeprefix("s_")]

    @property
    def config(self) -> Config:
        if self.sm is None:
            # The declaration engine keeps its values as the tuple fire() computed: the server
            # asks ``can`` for every frame, and rebuilding the tuple from the dict each time
            # showed in its profile.
            return (self._state, self._vals)
        return (self.state, tuple(self.model.values[n] for n in self.machine.var_names))

    @property
    def values(self) -> Mapping[str, Value]:
        return dict(self.model.values)

    def can(self, event: str, **inputs: Value) -> bool:
        return bool(self.machine.enabled(self.config, event, inputs))

    def fire(self, event: str, **inputs: Value) -> Transition:
        source = self.state
        if event not in self.machine.events:
            raise IllegalTransition(self.machine.name, event, source.name, "event not declared")
        if self.sm is None:
            transition, after = self.machine.step((self._state, self._vals), event, inputs)
            self._state, self._vals = after[0], after[1]
            self.model.values = dict(zip(self.machine.var_names, after[1], strict=True))
            self.model.last = transition
            return transition
        from statemachine.exceptions import TransitionNotAllowed

        self.model.last = None
        try:
            self.sm.send(f"ev_{event}", inputs=inputs)
        except TransitionNotAllowed as exc:
            raise IllegalTransition(
                self.machine.name, event, source.name, self.machine.describe(self.config)
            ) from exc
        if self.model.last is None:
            # python-statemachine found no transition whose condition held.
            raise IllegalTransition(self.machine.name, event, source.name, self.machine.describe(self.config))
        return self.model.last


def transition_table(machine: Machine) -> Sequence[tuple[str, str, str, str]]:
    """(source, event, guard, target) rows in declaration order; used by docs and tests."""
    return [(t.source.name, t.event, t.guard.render(), t.target.name) for t in machine.transitions]
