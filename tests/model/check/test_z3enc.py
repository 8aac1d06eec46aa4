"""The Z3 encoding of each machine agrees with the declaration and the python-statemachine class
on every (state, event) pair (model/check/z3enc.py; docs/proofs.md, "encoding")."""

from __future__ import annotations

import itertools

import pytest
import z3

from pipeproof.errors import IllegalTransition
from pipeproof.model.check.z3enc import MachineEnc
from pipeproof.model.connection import CONNECTION
from pipeproof.model.context import CONTEXT
from pipeproof.model.delivery import DELIVERY
from pipeproof.model.run import RUN
from pipeproof.model.spec import Config, Machine, Runner, build_statemachine

MACHINES = [CONNECTION, CONTEXT, DELIVERY, RUN]


def _valuations(machine: Machine):
    """Sampled variable values: every int in 0..3 and both booleans, thinned to about a dozen per machine."""
    domains = [(False, True) if v.type is bool else (0, 1, 2, 3) for v in machine.variables]
    combos = list(itertools.product(*domains))
    return combos[:: max(1, len(combos) // 12)]


def _input_sets(machine: Machine):
    names = sorted(machine.inputs)
    return [dict(zip(names, vals, strict=True)) for vals in itertools.product((False, True), repeat=len(names))]


def _z3_successors(enc: MachineEnc, cfg: Config, event: str, inputs: dict[str, bool]) -> set[Config]:
    pre = enc.concrete(cfg)
    post = enc.fresh("post")
    s = z3.Solver()
    s.add(enc.event_relation(event, pre, post, {k: z3.BoolVal(v) for k, v in inputs.items()}))
    found: set[Config] = set()
    while s.check() == z3.sat:
        got = enc.decode(s.model(), post)
        found.add(got)
        s.add(z3.Not(enc.eq(post, enc.concrete(got))))
        assert len(found) < 10
    return found


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.name)
def test_relation_matches_declaration_and_statemachine(machine: Machine) -> None:
    enc = MachineEnc(machine)
    sm_class = build_statemachine(machine)
    checked = 0
    for state in machine.states:
        for event in machine.events:
            for values in _valuations(machine):
                cfg: Config = (state, values)
                for inputs in _input_sets(machine):
                    expected = {after for _t, after in machine.fire_all(cfg, event, inputs)}
                    assert _z3_successors(enc, cfg, event, inputs) == expected, (state, event, values, inputs)
                    # The python-statemachine class fires one of exactly those successors (or refuses).
                    runner = Runner(machine, sm_class)
                    # python-statemachine keeps the current state's value on the model object.
                    runner.model.state = state.name  # type: ignore[attr-defined]
                    runner.sm = sm_class(model=runner.model)
                    runner.model.values = dict(zip(machine.var_names, values, strict=True))
                    assert runner.config == cfg
                    try:
                        runner.fire(event, **inputs)
                    except IllegalTransition:
                        assert not expected
                    else:
                        assert runner.config in expected
                    checked += 1
    assert checked > 50


def test_fire_first_is_the_first_enabled_transition() -> None:
    enc = MachineEnc(DELIVERY)
    for state in DELIVERY.states:
        for values in _valuations(DELIVERY):
            for inputs in _input_sets(DELIVERY):
                cfg: Config = (state, values)
                zin = {k: z3.BoolVal(v) for k, v in inputs.items()}
                for event in DELIVERY.events:
                    enabled, nxt = enc.fire_first(event, enc.concrete(cfg), zin)
                    fired = DELIVERY.fire_all(cfg, event, inputs)
                    assert z3.is_true(z3.simplify(enabled)) == bool(fired)
                    if fired:
                        m = z3.Solver()
                        m.check()
                        got = enc.decode(m.model(), type(nxt)(z3.simplify(nxt.state),
                                                               {k: z3.simplify(v) for k, v in nxt.vars.items()}))
                        assert got == fired[0][1]
