"""Each Z3 state property says what its Python predicate says (model/check/z3props.py vs model/invariants.py),
on the reference's reached states and on mutants' states that violate it."""

from __future__ import annotations

from collections import deque

import pytest
import z3

from pipeproof.model.check.z3props import LEMMAS, PROPERTIES, closure
from pipeproof.model.check.z3system import SysEnc
from pipeproof.model.check.z3universe import Universe
from pipeproof.model.invariants import BY_NAME as PY
from pipeproof.model.mutants import BY_NAME as MUTANTS
from pipeproof.model.scenarios import DEFAULT_SCENARIOS
from pipeproof.model.system import State, System


def _reached(system: System, limit: int) -> list[State]:
    init = system.initial()
    seen, order, queue = {init}, [init], deque([init])
    while queue and len(order) < limit:
        for step in system.successors(queue.popleft()):
            if step.after not in seen:
                seen.add(step.after)
                order.append(step.after)
                queue.append(step.after)
    return order


CASES = [(sc.name, System(sc.bounds)) for sc in DEFAULT_SCENARIOS] + [
    (f"mutant:{m}", MUTANTS[m].system())
    for m in ("swallow_send_failure", "unlocked_context_create", "event_after_terminal")
]


@pytest.mark.parametrize(("label", "system"), CASES, ids=[c[0] for c in CASES])
def test_state_properties_agree_with_python(label: str, system: System) -> None:
    enc = SysEnc(system.model, Universe.finite_universe(system.bounds))
    st = enc.fresh_state("x")
    props = [p for p in PROPERTIES if p.state is not None]
    formulas = {p.name: p.state(enc, st) for p in props}
    violated_somewhere = set()
    solver = z3.Solver()
    for state in _reached(system, 400)[::3]:
        solver.push()
        solver.add(enc.state_formula(st, state))
        assert solver.check() == z3.sat
        m = solver.model()
        for p in props:
            check = PY[p.name].state_check
            assert check is not None
            python_ok = not check(system, state)
            z3_ok = z3.is_true(m.eval(formulas[p.name], model_completion=True))
            assert z3_ok == python_ok, (label, p.name, state)
            if not python_ok:
                violated_somewhere.add(p.name)
        solver.pop()
    if label.startswith("mutant:"):
        assert violated_somewhere, f"{label}: the sample never reached a violation"


def test_every_property_lemma_is_declared() -> None:
    names = {lem.name for lem in LEMMAS}
    for p in PROPERTIES:
        assert set(closure(p.lemmas)) <= names
