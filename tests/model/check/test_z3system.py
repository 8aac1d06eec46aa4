"""The composed Z3 Next agrees with model/system.py (model/check/z3system.py; docs/proofs.md, "cross-check").

On the states the explorer reaches at the default scenarios' bounds (and on mutants that change the
glue or add transitions): every explorer step satisfies Next, and from sampled reached states Z3
has exactly the explorer's successors, so the two encodings of the glue cannot drift apart.
"""

from __future__ import annotations

import itertools
import random
from collections import deque

import pytest
import z3

from pipeproof.model.check.z3system import SysEnc
from pipeproof.model.check.z3universe import Universe
from pipeproof.model.check.z3wo import wo_run
from pipeproof.model.invariants import well_ordered
from pipeproof.model.mutants import BY_NAME as MUTANTS
from pipeproof.model.run import AGENT_EVENTS
from pipeproof.model.scenarios import DEFAULT_SCENARIOS
from pipeproof.model.system import State, System


def test_well_ordering_automaton_matches_the_predicate() -> None:
    for n in range(6):
        for kinds in itertools.product(AGENT_EVENTS, repeat=n):
            assert (wo_run(kinds) == "BAD") == bool(well_ordered(kinds)), kinds


def _reached(system: System, limit: int) -> list[State]:
    """Breadth-first, then a random spread of deeper states (seeded)."""
    init = system.initial()
    seen = {init}
    order = [init]
    queue = deque([init])
    while queue and len(order) < limit:
        for step in system.successors(queue.popleft()):
            if step.after not in seen:
                seen.add(step.after)
                order.append(step.after)
                queue.append(step.after)
    return order


def _systems() -> list[tuple[str, System]]:
    out = [(sc.name, System(sc.bounds)) for sc in DEFAULT_SCENARIOS]
    for name in ("cross_user_route", "unlocked_context_create", "swallow_send_failure",
                 # the node glue each engine mirrors: no compare-and-set, no poll, two views
                 "lease_race_two_owners", "lost_notification_no_poll", "escalation_reads_local_sessions",
                 "per_node_limit_counter"):
        out.append((f"mutant:{name}", MUTANTS[name].system()))
    return out


@pytest.mark.parametrize(("label", "system"), _systems(), ids=[n for n, _ in _systems()])
def test_next_matches_system_successors(label: str, system: System) -> None:
    enc = SysEnc(system.model, Universe.finite_universe(system.bounds))
    pre, post = enc.fresh_state("a"), enc.fresh_state("b")
    nxt, _ = enc.next_formula(pre, post, "n")
    states = _reached(system, 1500)
    rng = random.Random(7)
    sample = rng.sample(states, 10)
    solver = z3.Solver()
    solver.add(nxt)
    for state in sample:
        expected = {step.after for step in system.successors(state)}
        # (a) every explorer step satisfies Next.
        for after in rng.sample(sorted(expected, key=repr), min(4, len(expected))):
            solver.push()
            solver.add(enc.state_formula(pre, state), enc.state_formula(post, after))
            assert solver.check() == z3.sat, f"{label}: explorer step not in Next"
            solver.pop()
        # (b) Z3 has no successor the explorer lacks (and none missing).
        solver.push()
        solver.add(enc.state_formula(pre, state))
        got: set[State] = set()
        while solver.check() == z3.sat:
            after = enc.decode(solver.model(), post)
            assert after in expected, f"{label}: Z3 successor {after} not produced by System.successors"
            got.add(after)
            solver.add(z3.Not(enc.state_formula(post, after)))
        solver.pop()
        assert got == expected, label
