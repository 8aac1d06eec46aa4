"""Hypothesis checkers: hold on the reference model, bite on a broken one with a short shrunk trace,
and report what they measured (docs/proofs.md, "Hypothesis")."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeproof.model.check.explorer import explore
from pipeproof.model.check.hypothesis_check import (
    DIVERT_RATES,
    Swarm,
    happy_region,
    replay,
    run_machine,
    run_system,
    shrink,
)
from pipeproof.model.connection import CONNECTION, Conn
from pipeproof.model.expr import Var
from pipeproof.model.invariants import INVARIANTS
from pipeproof.model.mutants import BY_NAME, add, scenario
from pipeproof.model.scenarios import DEFAULT_SCENARIOS, Scenario
from pipeproof.model.spec import Transition
from pipeproof.model.system import System, reference_model

# Distinct states the default run (150 test cases x 40 steps, derandomized, as pipeproof check runs
# it) reaches, as a share of the explorer's exhaustive count. Measured over the default run and
# seeds 0-5: readiness 8.0-9.4%, races 5.7-6.3%, isolation 12.0-13.5%, runs 11.1-13.1% (the
# rule-based test this replaced reached 0.4%, 0.7%, 2.4% and 1.2%). The floors keep a margin.
STATE_FLOORS = {"readiness": 0.05, "races": 0.035, "isolation": 0.08, "runs": 0.07, "nodes": 0.02}


def _broken_readiness(buffer_max: int = 1) -> System:
    b = replace(scenario("readiness").bounds, buffer_max=buffer_max)
    base = reference_model(b)
    q = Var("queued")
    broken = add(base.connection, Transition("handle_frame", Conn.INITIALISING, Conn.INITIALISING,
                                             guard=q > 0, updates=(("queued", q - 1),)))
    return System(b, replace(base, connection=broken))


def test_reference_holds() -> None:
    r = run_system(System(scenario("readiness").bounds), max_examples=60, steps=30)
    assert r.violation is None


def test_handle_while_initialising_is_caught_and_shrunk() -> None:
    for seed in (None, 1, 2):
        r = run_system(_broken_readiness(), max_examples=200, steps=40, seed=seed)
        assert r.prop == "no_message_before_ready", seed
        assert 2 <= len(r.trace) <= 5, r.trace
        assert "handle_frame" in r.trace[-1]


def test_shrink_removes_irrelevant_steps() -> None:
    system = _broken_readiness(buffer_max=2)
    # A path with a step the violation does not need (the second pipelined frame).
    steps = []
    state = system.initial()
    wanted = ["client_init", "client_frame", "client_frame", "server_handle"]
    for action in wanted:
        step = next(s for s in system.successors(state) if s.action == action)
        steps.append(step)
        state = step.after
    shrunk = shrink(system, INVARIANTS, steps, "no_message_before_ready")
    assert [s.action for s in shrunk] == ["client_init", "client_frame", "server_handle"]
    assert [s.action for s in replay(system, shrunk)] == [s.action for s in shrunk]


def test_machine_tests_agree_with_python_statemachine() -> None:
    m = reference_model(scenario("readiness").bounds)
    for machine in (m.connection, m.context, m.delivery, m.run):
        r = run_machine(machine, max_examples=40, steps=20)
        assert r.violation is None, (machine.name, r.violation, r.trace)


def test_machine_test_bites_on_a_broken_machine() -> None:
    m = reference_model(scenario("readiness").bounds)
    ack_sent = Var("ack_sent")
    from pipeproof.model.expr import TRUE

    broken = add(m.connection, Transition("send_ack", Conn.INITIALISING, Conn.INITIALISING, guard=~ack_sent,
                                          updates=(("ack_sent", TRUE),)))
    # The connection machine has about twenty events and most close the socket, so a random walk
    # reaches INITIALISING --send_ack rarely: many short examples find it (derandomized: the same
    # examples every run).
    r = run_machine(broken, max_examples=1000, steps=10)
    assert r.prop == "ready_before_ack"


@pytest.mark.parametrize("sc", DEFAULT_SCENARIOS, ids=lambda sc: sc.name)
def test_the_default_run_measures_what_it_explored(sc: Scenario) -> None:
    system = System(sc.bounds)
    r = run_system(system)
    assert r.violation is None
    # Counted in the test body: every test case Hypothesis ran, none beyond the budget.
    assert 0 < r.examples <= 150
    # No test case stops short: a walk that quiesces goes back along its path and on (measured:
    # every case takes exactly its 40 steps; the rule-based test averaged 1-3 and about half its
    # cases took none).
    assert r.mean_run_length == r.max_run_length == 40
    # Walks are deep: the deepest reaches the scenario's breadth-first depth (19-22; readiness
    # has cycles, 40), and they quiesce and go back many times (measured 559-1039 stretches).
    assert r.max_walk_length >= 15
    assert r.walks > 2 * r.examples
    total = explore(system).states
    assert r.distinct_states >= STATE_FLOORS[sc.name] * total, (r.distinct_states, total)


def test_a_seeded_run_is_reproducible() -> None:
    system = BY_NAME["swallow_send_failure"].system()
    a, b = (run_system(system, seed=3) for _ in range(2))
    assert a.prop == b.prop == "every_event_acked_or_escalated"
    assert (a.examples, a.distinct_states, a.trace) == (b.examples, b.distinct_states, b.trace)
    # It stopped at the failure: fewer test cases than the budget, each one counted.
    assert 0 < a.examples < 150


def test_the_simplest_configuration_is_the_plain_walk() -> None:
    system = System(scenario("races").bounds)
    plain = Swarm.decode(bytes(Swarm.size(system)), system)
    assert set(plain.weights.values()) == {1} and plain.divert == min(DIVERT_RATES) and not plain.held


def test_the_happy_region_is_the_path_the_protocol_expects() -> None:
    assert happy_region(CONNECTION) == {Conn.OPEN, Conn.INITIALISING, Conn.READY}
