"""Checker 1: exhaustive breadth-first exploration of the composed model (docs/model.md, "explorer").

Every reachable global state at the given bounds is visited once (states are hashed), every
enabled step is taken, and every invariant is checked on every state and step. Breadth-first
order makes the first violation found for a property a shortest one; its trace is rebuilt from
parent links and printed step by step (actor, action, and each component's state change).
States in which no action is enabled are checked for quiescence.

Two paths give the same result: the compiled one (the default: interned states, the successor
function's rules and the invariants memoized on what they read; model/check/compiled.py) and
the reference, a plain search over ``System.successors`` and ``State`` objects
(``fast=False``), which the compiled one is tested against (tests/model/check/test_compiled.py)
and measured against (bench/explore.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pipeproof.model.check.compiled import Compiled, Item
from pipeproof.model.invariants import INVARIANTS, Invariant, quiescent_violations
from pipeproof.model.system import State, Step, System

QUIESCENCE = "every_event_acked_or_escalated"


@dataclass(frozen=True)
class Counterexample:
    """A shortest trace from the initial state to a violation of ``prop``."""

    prop: str
    message: str
    steps: tuple[str, ...]
    path: tuple[Step, ...] = ()  # the same steps, structured (for sequence diagrams)

    def render(self) -> str:
        lines = [f"{self.prop} violated: {self.message}", f"  shortest trace, {len(self.steps)} steps:"]
        lines += [f"  {i:>3}. {s}" for i, s in enumerate(self.steps, 1)]
        return "\n".join(lines)


@dataclass
class ExploreResult:
    states: int = 0
    transitions: int = 0
    depth: int = 0
    seconds: float = 0.0
    complete: bool = True
    quiescent: int = 0
    violations: dict[str, Counterexample] = field(default_factory=dict)
    covered: dict[str, set[str]] = field(default_factory=dict)  # machine -> transition keys fired

    @property
    def states_per_second(self) -> float:
        return self.states / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        status = "complete" if self.complete else "TRUNCATED (max_states reached)"
        return (
            f"{self.states} states, {self.transitions} transitions, depth {self.depth}, "
            f"{self.seconds:.2f} s ({self.states_per_second:,.0f} states/s), "
            f"{self.quiescent} quiescent, {status}"
        )


def explore(
    system: System,
    invariants: Iterable[Invariant] = INVARIANTS,
    *,
    max_states: int = 5_000_000,
    stop_when: frozenset[str] | None = None,
    fast: bool = True,
) -> ExploreResult:
    """Explore ``system`` exhaustively. ``stop_when``: stop once all these properties are violated.

    ``fast`` (the default) runs the compiled path (model/check/compiled.py): interned states and
    memoized rules and checks. ``fast=False`` runs the plain breadth-first search over
    ``System.successors``, the reference the compiled path is tested against
    (tests/model/check/test_compiled.py): both visit the same states in the same order, so every
    count, coverage set, counterexample and its trace is the same.
    """
    invs = tuple(invariants)
    if fast and type(system).successors is System.successors:
        return _explore_compiled(system, invs, max_states, stop_when)
    return _explore_reference(system, invs, max_states, stop_when)


def reachable(system: System, *, fast: bool = True, max_states: int = 5_000_000) -> tuple[frozenset[State], int]:
    """Every reachable state and the number of transitions, by either path (no invariants)."""
    keep: list[State] = []
    if fast:
        r = _explore_compiled(system, (), max_states, None, keep)
    else:
        r = _explore_reference(system, (), max_states, None, keep)
    return frozenset(keep), r.transitions


def _explore_reference(
    system: System,
    invs: tuple[Invariant, ...],
    max_states: int,
    stop_when: frozenset[str] | None,
    keep: list[State] | None = None,
) -> ExploreResult:
    state_invs = [i for i in invs if i.state_check is not None]
    step_invs = [i for i in invs if i.step_check is not None]
    check_quiescence = any(i.name == QUIESCENCE for i in invs)
    result = ExploreResult()
    start = time.perf_counter()
    init = system.initial()
    parent: dict[State, tuple[State, Step] | None] = {init: None}
    depth_of: dict[State, int] = {init: 0}
    queue: deque[State] = deque([init])
    fired: dict[int, tuple[str, str]] = {}  # id(transition) -> (machine, key); keys are built once

    def record(prop: str, message: str, state: State, last: Step | None) -> None:
        if prop in result.violations:
            return
        path = _path(parent, state, last)
        result.violations[prop] = Counterexample(prop, message, tuple(system.describe_step(s) for s in path), path)

    def done() -> bool:
        return stop_when is not None and stop_when <= set(result.violations)

    for inv in state_invs:
        assert inv.state_check is not None
        for msg in inv.state_check(system, init):
            record(inv.name, msg, init, None)
    while queue and not done():
        state = queue.popleft()
        d = depth_of[state]
        result.depth = max(result.depth, d)
        any_step = False
        for step in system.successors(state):
            any_step = True
            result.transitions += 1
            for f in step.firings:
                if id(f.transition) not in fired:
                    fired[id(f.transition)] = (system.machine(f.family).name, f.transition.key)
            for inv in step_invs:
                if inv.name in result.violations:
                    continue
                assert inv.step_check is not None
                for msg in inv.step_check(system, step, state):
                    record(inv.name, msg, state, step)
            nxt = step.after
            if nxt in depth_of:
                continue
            parent[nxt] = (state, step)
            depth_of[nxt] = d + 1
            for inv in state_invs:
                if inv.name in result.violations:
                    continue
                assert inv.state_check is not None
                for msg in inv.state_check(system, nxt):
                    record(inv.name, msg, nxt, None)
            if len(depth_of) >= max_states:
                result.complete = False
                queue.clear()
                break
            queue.append(nxt)
        if not any_step:
            result.quiescent += 1
            if check_quiescence:
                for msg in quiescent_violations(system, state):
                    record(QUIESCENCE, msg, state, None)
    if queue and done():
        result.complete = False
    result.states = len(depth_of)
    for machine, key in fired.values():
        result.covered.setdefault(machine, set()).add(key)
    if keep is not None:
        keep.extend(depth_of)
    result.seconds = time.perf_counter() - start
    return result


def _explore_compiled(
    system: System,
    invs: tuple[Invariant, ...],
    max_states: int,
    stop_when: frozenset[str] | None,
    keep: list[State] | None = None,
) -> ExploreResult:
    """The reference loop's search over interned states: same order, so same verdicts and traces
    (docs/model.md, "explorer").

    States are numbered in discovery order, which is breadth-first order, so the queue is the list
    of states itself; each remembers its parent and the index of the step that found it, and a
    counterexample's path is rebuilt from those through ``System.successors``.
    """
    result = ExploreResult()
    start = time.perf_counter()
    violations = result.violations
    step_invs = tuple(i for i in invs if i.step_check is not None)
    c = Compiled(system, step_invs, violations)
    state_memos = [(inv.name, c.state_memo(inv.name, inv.state_check)) for inv in invs if inv.state_check is not None]
    quiescence = c.state_memo(QUIESCENCE, quiescent_violations) if any(i.name == QUIESCENCE for i in invs) else None
    base0 = c.encode(system.initial())
    bases = [base0]
    parents = [-1]
    vias = [-1]  # the index, among its parent's steps, of the step that found each state
    seen = {base0: 0}
    covered = c.covered

    def record(prop: str, message: str, index: int, last: tuple[int, tuple[int, ...]] | None = None) -> None:
        if prop in violations:
            return
        # (from, step index, to) back to the initial state; a step violation adds its own step.
        links = [] if last is None else [(index, last[0], last[1])]
        while parents[index] >= 0:
            links.append((parents[index], vias[index], bases[index]))
            index = parents[index]
        path = tuple(c.step(bases[a], kk, z) for a, kk, z in reversed(links))
        violations[prop] = Counterexample(prop, message, tuple(system.describe_step(s) for s in path), path)

    def done() -> bool:
        return stop_when is not None and stop_when <= set(violations)

    def slow(item: Item, index: int, k: int, nxt: tuple[int, ...]) -> None:
        if item.fresh:
            for machine, key in item.cover:
                covered.setdefault(machine, set()).add(key)
            item.fresh = False
            item.slow = bool(item.checks)
        for inv, msgs in item.checks:
            if inv.name in violations:
                continue
            if msgs is None:  # the check reads the state: ask it about this step
                assert inv.step_check is not None
                step = Step(*item.local[:4], c.decode(nxt))
                msgs = tuple(inv.step_check(system, step, c.decode(bases[index])))
            if msgs:
                record(inv.name, msgs[0], index, (k, nxt))

    fv = c.fields(base0)
    for name, memo in state_memos:
        msgs = memo.get(fv)
        if msgs:
            record(name, msgs[0], 0)
    transitions = 0
    quiescent = 0
    depth = 0
    level_end = 1
    i = 0
    truncated = False
    while i < len(bases) and not done():
        if i == level_end:
            depth += 1
            level_end = len(bases)
        base = bases[i]
        k = -1
        for leaf in c.expand(c.vectorize(base)):
            for item in leaf:
                k += 1
                transitions += 1
                lst = list(base)
                for p, value in item.writes:
                    lst[p] = value
                nxt = tuple(lst)
                if item.slow:
                    slow(item, i, k, nxt)
                if nxt in seen:
                    continue
                j = len(bases)
                seen[nxt] = j
                bases.append(nxt)
                parents.append(i)
                vias.append(k)
                if state_memos:
                    fv = c.fields(nxt)
                    for name, memo in state_memos:
                        if name not in violations:
                            msgs = memo.get(fv)
                            if msgs:
                                record(name, msgs[0], j)
                if j + 1 >= max_states:
                    truncated = True
                    break
            if truncated:
                break
        if k < 0:
            quiescent += 1
            if quiescence is not None and QUIESCENCE not in violations:
                msgs = quiescence.get(c.fields(base))
                if msgs:
                    record(QUIESCENCE, msgs[0], i)
        i += 1
        if truncated:
            result.complete = False
            break
    if not truncated and i < len(bases) and done():
        result.complete = False
    result.depth = depth
    result.transitions = transitions
    result.quiescent = quiescent
    result.states = len(bases)
    result.covered.update(covered)
    if keep is not None:
        keep.extend(c.decode(b) for b in bases)
    result.seconds = time.perf_counter() - start
    return result


def _path(
    parent: dict[State, tuple[State, Step] | None], state: State, last: Step | None
) -> tuple[Step, ...]:
    steps: list[Step] = [] if last is None else [last]
    link = parent.get(state)
    while link is not None:
        prev, step = link
        steps.append(step)
        link = parent.get(prev)
    return tuple(reversed(steps))
