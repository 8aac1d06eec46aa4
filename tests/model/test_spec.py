"""Definition-time validation, firing, and the python-statemachine class derived from a declaration."""

from __future__ import annotations

import enum
import itertools
import random

import pytest

from pipeproof.errors import IllegalTransition, ModelDefinitionError
from pipeproof.model.connection import CONNECTION, Conn
from pipeproof.model.expr import Param, Var
from pipeproof.model.spec import Machine, Runner, Transition, VarDecl, build_statemachine
from pipeproof.model.system import Bounds, reference_model


class S(enum.Enum):
    A = "A"
    B = "B"
    C = "C"
    DONE = "DONE"


def machine(*transitions: Transition, **kw: object) -> Machine:
    return Machine(name=str(kw.pop("name", "toy")), states=S, initial=S.A, terminal=frozenset({S.DONE}),
                   transitions=transitions, **kw)  # type: ignore[arg-type]


def test_valid_machine_is_accepted() -> None:
    m = machine(Transition("go", S.A, S.B), Transition("go", S.B, S.C), Transition("end", S.C, S.DONE))
    assert m.events == ("go", "end")


def test_dead_end_names_machine_state_and_rule() -> None:
    with pytest.raises(ModelDefinitionError) as err:
        machine(Transition("go", S.A, S.B), Transition("go", S.A, S.C), Transition("end", S.B, S.DONE))
    assert err.value.machine == "toy" and err.value.state == "C" and err.value.rule == "no_dead_end"
    assert "machine 'toy', state 'C'" in str(err.value)


def test_unreachable_state_is_rejected() -> None:
    with pytest.raises(ModelDefinitionError) as err:
        machine(Transition("end", S.A, S.DONE), Transition("x", S.B, S.C), Transition("y", S.C, S.DONE))
    assert err.value.rule == "no_unreachable_state" and err.value.state == "B"


def test_terminal_must_be_reachable_from_every_state() -> None:
    with pytest.raises(ModelDefinitionError) as err:
        machine(Transition("go", S.A, S.B), Transition("loop", S.B, S.C), Transition("back", S.C, S.B),
                Transition("end", S.A, S.DONE))
    assert err.value.rule == "terminal_reachable" and err.value.state in ("B", "C")


def test_transition_to_undeclared_state_is_rejected() -> None:
    class Other(enum.Enum):
        X = "X"

    with pytest.raises(ModelDefinitionError) as err:
        machine(Transition("go", S.A, Other.X), Transition("end", S.A, S.DONE))  # type: ignore[arg-type]
    assert err.value.rule == "declared_states" and "go" in str(err.value)


def test_undeclared_variable_param_and_input_are_rejected() -> None:
    for guard, kind in ((Var("nope") > 0, "var"), (Param("cap") > 0, "param")):
        with pytest.raises(ModelDefinitionError) as err:
            machine(Transition("end", S.A, S.DONE, guard=guard), Transition("x", S.A, S.B),
                    Transition("y", S.B, S.C), Transition("z", S.C, S.DONE))
        assert err.value.rule == "declared_names" and kind in str(err.value)


def test_step_raises_typed_error_never_returns_failure() -> None:
    cfg = CONNECTION.initial_config()
    with pytest.raises(IllegalTransition) as err:
        CONNECTION.step(cfg, "handle_frame")
    assert err.value.machine == "connection" and err.value.state == "OPEN" and err.value.event == "handle_frame"


def test_compiled_guards_match_tree_walking_semantics() -> None:
    """The explorer's compiled closures and the expression tree agree on every transition."""
    rng = random.Random(7)
    for m in _machines():
        for t in m.transitions:
            for _ in range(40):
                values = tuple(rng.choice([0, 1, 2, 3]) if d.type is int else rng.choice([False, True])
                               for d in m.variables)
                inputs = {n: rng.choice([False, True]) for n in m.inputs}
                cfg = (t.source, values)
                assert (t in m.enabled(cfg, t.event, inputs)) == m.evaluate_guard(cfg, t, inputs)
                if t in m.enabled(cfg, t.event, inputs):
                    compiled = dict(m.fire_all(cfg, t.event, inputs))[t]
                    assert compiled == m.apply(cfg, t, inputs)


def _machines() -> list[Machine]:
    m = reference_model(Bounds())
    return [m.connection, m.context, m.delivery, m.run]


def test_statemachine_class_agrees_on_every_state_event_pair() -> None:
    """For every (state, event) pair and sampled variables, python-statemachine does exactly what
    the declaration says: same transition, same next configuration, or the same refusal."""
    rng = random.Random(11)
    for m in _machines():
        cls = build_statemachine(m)
        for state, event in itertools.product(m.states, m.events):
            for _ in range(12):
                values = tuple(rng.choice([0, 1, 2]) if d.type is int else rng.choice([False, True])
                               for d in m.variables)
                inputs = {n: rng.choice([False, True]) for n in m.inputs}
                runner = Runner(m, cls)
                # Put the live machine in ``state`` with ``values`` (python-statemachine API).
                runner.sm.current_state_value = state.name
                runner.model.values = dict(zip(m.var_names, values, strict=True))
                assert runner.config == (state, values)
                expected = m.enabled((state, values), event, inputs)
                if not expected:
                    with pytest.raises(IllegalTransition):
                        runner.fire(event, **inputs)
                    continue
                got = runner.fire(event, **inputs)
                assert got == expected[0]
                assert runner.config == m.apply((state, values), expected[0], inputs)


def test_both_runner_engines_agree_and_restore() -> None:
    """The fast declaration engine and python-statemachine take the same paths, from any start."""
    rng = random.Random(5)
    for m in _machines():
        cls = build_statemachine(m)
        for _ in range(60):
            state = rng.choice(list(m.states))
            values = tuple(rng.choice([0, 1, 2]) if d.type is int else rng.choice([False, True])
                           for d in m.variables)
            a = Runner(m, cls, start=(state, values))
            b = Runner(m, engine="declaration", start=(state, values))
            assert a.config == b.config == (state, values)
            for _ in range(6):
                event = rng.choice(m.events)
                inputs = {n: rng.choice([False, True]) for n in m.inputs}
                outcome = []
                for r in (a, b):
                    try:
                        outcome.append(r.fire(event, **inputs))
                    except IllegalTransition:
                        outcome.append(None)
                assert outcome[0] == outcome[1] and a.config == b.config


def test_terminal_states_without_exits_are_final_in_statemachine() -> None:
    cls = build_statemachine(CONNECTION)
    finals = {s.id for s in cls.states if s.final}
    assert finals == {"s_CLOSED"}


def test_runner_walks_the_happy_path() -> None:
    r = Runner(CONNECTION)
    for ev in ("recv_init", "recv_frame", "auth_ok", "send_ack", "handle_frame"):
        r.fire(ev)
    assert r.state is Conn.READY and r.values == {"queued": 0, "ack_sent": True, "errors": 0}


def test_with_params_rejects_unknown_parameters() -> None:
    with pytest.raises(ModelDefinitionError):
        CONNECTION.with_params(nope=1)


def test_vardecl_defaults() -> None:
    assert VarDecl("x", int, 0).lo == 0
