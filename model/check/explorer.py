"""Checker 1: exhaustive breadth-first exploration of the composed model (docs/model.md, "explorer").

Every reachable global state at the given bounds is visited once (states are hashed), every
enabled step is taken, and every invariant is checked on every state and step. Breadth-first
order makes the first violation found for a property a shortest one; its trace is rebuilt from
parent links and printed step by step (actor, action, and each component's state change).
States in which no action is enabled are checked for quiescence.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

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
) -> ExploreResult:
    """Explore ``system`` exhaustively. ``stop_when``: stop once all these properties are violated."""
    invs = tuple(invariants)
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
