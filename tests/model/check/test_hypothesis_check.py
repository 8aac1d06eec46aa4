"""Hypothesis checkers: hold on the reference model, bite on a broken one with a short shrunk trace."""

from __future__ import annotations

from dataclasses import replace

from pipeproof.model.check.hypothesis_check import replay, run_machine, run_system, shrink
from pipeproof.model.connection import Conn
from pipeproof.model.expr import Var
from pipeproof.model.invariants import INVARIANTS
from pipeproof.model.mutants import add, scenario
from pipeproof.model.spec import Transition
from pipeproof.model.system import System, reference_model


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
