"""The compiled explorer path against the plain BFS over System.successors (docs/model.md, "explorer").

model/check/compiled.py memoizes the successor function's rules and the invariants on what they
read; these tests hold it to the reference: the same states with the same steps in the same
order, the same counts, coverage and counterexamples, on every default scenario and every mutant,
and checks or routes that read the whole state still asked on every state.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeproof.errors import ModelDefinitionError
from pipeproof.model.check.compiled import Compiled, _Memo
from pipeproof.model.check.explorer import ExploreResult, explore, reachable
from pipeproof.model.connection import Conn
from pipeproof.model.invariants import INVARIANTS, Invariant
from pipeproof.model.mutants import MUTANTS, Mutant, scenario
from pipeproof.model.scenarios import DEFAULT_SCENARIOS
from pipeproof.model.system import State, Step, System, reference_model

SCENARIOS = {sc.name: sc for sc in DEFAULT_SCENARIOS}
MUTANTS_BY_NAME = {m.name: m for m in MUTANTS}


def _digest(r: ExploreResult) -> tuple[object, ...]:
    """Everything an exploration reports except its timing."""
    violations = {
        prop: (cex.message, cex.steps, tuple(tuple(step) for step in cex.path)) for prop, cex in r.violations.items()
    }
    return r.states, r.transitions, r.depth, r.quiescent, r.complete, violations, r.covered


def _same(system: System, invariants: tuple[Invariant, ...] = INVARIANTS, **kw: object) -> ExploreResult:
    fast = explore(system, invariants, fast=True, **kw)  # type: ignore[arg-type]
    ref = explore(system, invariants, fast=False, **kw)  # type: ignore[arg-type]
    assert _digest(fast) == _digest(ref)
    return fast


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_state_has_the_same_steps_in_the_same_order(name: str) -> None:
    """The strongest form: per reachable state, the memoized steps are System.successors' steps
    (action, actor, args, firings and the state after), in order; encoding round-trips."""
    system = System(SCENARIOS[name].bounds)
    c = Compiled(system, (), {})
    init = c.encode(system.initial())
    seen = {init}
    todo = [init]
    steps = 0
    while todo:
        base = todo.pop()
        state = c.decode(base)
        assert c.encode(state) == base
        ref = list(system.successors(state))
        got = c.successors(base)
        assert [tuple(item.local[:4]) for item, _ in got] == [tuple(step[:4]) for step in ref]
        assert [c.decode(nxt) for _, nxt in got] == [step.after for step in ref]
        steps += len(got)
        for _, nxt in got:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert len(seen) > 1000 and steps > len(seen)


def _system(name: str) -> System:
    if name in SCENARIOS:
        return System(SCENARIOS[name].bounds)
    return MUTANTS_BY_NAME[name].system()


@pytest.mark.slow  # the reference BFS over every mutant: about 25 s of CPU in all
@pytest.mark.parametrize("name", sorted(MUTANTS_BY_NAME))
def test_same_reachable_states_and_transitions(name: str) -> None:
    """Every mutant at its scenario: the decoded reachable sets and the transition counts of the two
    paths are equal (the default scenarios are held to the stronger per-state test above)."""
    system = _system(name)
    fast_states, fast_transitions = reachable(system, fast=True)
    ref_states, ref_transitions = reachable(system, fast=False)
    assert fast_transitions == ref_transitions
    assert fast_states == ref_states
    assert system.initial() in fast_states


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_same_result_on_every_default_scenario(name: str) -> None:
    r = _same(System(SCENARIOS[name].bounds))
    assert r.complete and not r.violations and r.quiescent > 0


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_same_result_when_truncated(name: str) -> None:
    r = _same(System(SCENARIOS[name].bounds), max_states=700)
    assert not r.complete and r.states == 700


@pytest.mark.parametrize("name", sorted(MUTANTS_BY_NAME))
def test_same_counterexample_for_every_mutant(name: str) -> None:
    """As the mutant matrix runs it (stop at the mutant's property) and in full: same verdicts,
    same messages, same rendered and structured shortest traces."""
    m: Mutant = MUTANTS_BY_NAME[name]
    stopped = _same(m.system(), stop_when=frozenset({m.prop}))
    assert m.prop in stopped.violations
    full = _same(m.system(), max_states=4000)
    if full.complete:
        assert m.prop in full.violations


def _later_send(system: System, step: Step, before: State) -> list[str]:
    # Fires on a send only once the other session has resumed: the same step (same firings) is
    # harmless in most states, so a verdict cached on the step alone would miss it.
    if step.action == "server_send" and before.resume[1 - step.args[0]] > 0:
        return [f"send on s{step.args[0]} after the other session resumed"]
    return []


def _ready_beside_closed(system: System, step: Step, before: State) -> list[str]:
    after = {c[0] for c in step.after.conns}
    return ["one session READY, the other CLOSED"] if {Conn.READY, Conn.CLOSED} <= after else []


def _by_index(system: System, state: State) -> list[str]:
    # Reads the state by position, not by field name: memoized on the whole state.
    return ["a context expired with a socket resumed"] if state[1][0][0].name == "EXPIRED" and max(state[5]) > 0 else []


def test_checks_that_read_the_state_are_asked_on_every_state() -> None:
    invariants = (
        Invariant("later_send", "system", "a step check reading the state before", step_check=_later_send),
        Invariant("ready_closed", "system", "a step check reading the state after", step_check=_ready_beside_closed),
        Invariant("by_index", "system", "a state check reading by position", state_check=_by_index),
    )
    r = _same(System(scenario("races").bounds), invariants)
    assert set(r.violations) == {"later_send", "ready_closed", "by_index"}


def _route_reading_the_state(system: System, state: State, session: int, user: int) -> bool:
    # A draining socket is no longer handed its stream (a glue variant that looks at the state).
    return system.owner(session) == user and state.conns[session][0] is not Conn.DRAINING


def test_a_route_that_reads_the_state() -> None:
    b = SCENARIOS["readiness"].bounds
    system = System(b, replace(reference_model(b), route=_route_reading_the_state))
    assert Compiled(system, (), {}).routes is None  # probed: it reads the state
    assert Compiled(System(b), (), {}).routes is not None
    assert reachable(system, fast=True) == reachable(system, fast=False)
    _same(system)


def test_a_system_that_overrides_successors_runs_the_reference() -> None:
    class Quiet(System):
        def successors(self, state: State):  # type: ignore[no-untyped-def]
            return (s for s in super().successors(state) if s.actor != "clock")

    b = SCENARIOS["readiness"].bounds
    _same(Quiet(b))
    assert explore(Quiet(b)).states < explore(System(b)).states


def test_a_rule_that_reads_differently_on_the_same_answers_is_refused() -> None:
    calls: list[int] = []

    def evaluate(vec: tuple[object, ...]) -> tuple[list[int], object]:
        calls.append(1)
        return ([0, 1], "a") if len(calls) == 1 else ([0, 2], "b")

    memo = _Memo("flaky", evaluate)
    assert memo.get((7, 8, 9)) == "a"
    assert memo.get((7, 8, 9)) == "a"  # memoized: not evaluated again
    with pytest.raises(ModelDefinitionError, match="not a pure function"):
        memo.get((7, 0, 9))


def test_counterexample_paths_are_replayable_steps() -> None:
    m = MUTANTS_BY_NAME["unlocked_context_create"]
    system = m.system()
    cex = explore(system, stop_when=frozenset({m.prop})).violations[m.prop]
    state = system.initial()
    for step in cex.path:
        assert step in list(system.successors(state))
        state = step.after
    assert len(cex.path) == 4
