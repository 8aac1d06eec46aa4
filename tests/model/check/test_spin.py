"""SPIN on the generated Promela (model/check/spin.py): the same state space as the explorer, and
every mutant's counterexample replayed through the explorer's model.

Each test compiles pan with gcc (about a second per model); they skip only when spin or gcc is
missing (scripts/setup.sh installs both).
"""

from __future__ import annotations

import shutil

import pytest

from pipeproof.model.check import spin as spin_mod
from pipeproof.model.check.explorer import ExploreResult, explore
from pipeproof.model.check.promela import generate
from pipeproof.model.check.spin import PanOptions, SpinUnavailable, TraceMismatch, replay, spin_rows, verify
from pipeproof.model.invariants import INVARIANTS
from pipeproof.model.mutants import MUTANTS, scenario
from pipeproof.model.scenarios import DEFAULT_SCENARIOS, Scenario
from pipeproof.model.system import System

pytestmark = pytest.mark.skipif(shutil.which("spin") is None or shutil.which("gcc") is None,
                                reason="spin or gcc is not installed (scripts/setup.sh installs both)")

# Small models: the compile dominates, so pan is built without optimisation here.
FAST = PanOptions(optimize="-O0", hash_bits=18)


@pytest.fixture(scope="module")
def explored() -> dict[str, ExploreResult]:
    return {sc.name: explore(System(sc.bounds)) for sc in DEFAULT_SCENARIOS}


@pytest.mark.parametrize("sc", DEFAULT_SCENARIOS, ids=lambda sc: sc.name)
def test_state_and_transition_counts_equal_the_explorers(sc: Scenario, explored: dict[str, ExploreResult]) -> None:
    """One explorer Step is one d_step and the state vector is the explorer's State, so pan stores
    exactly the explorer's states and takes exactly its transitions (pan's own count has one more:
    the initial state; SpinResult subtracts it and the raw report shows it)."""
    r = verify(System(sc.bounds), FAST)
    e = explored[sc.name]
    assert (r.states, r.transitions) == (e.states, e.transitions)
    assert f"{e.transitions + 1} transitions (= stored+matched)" in r.output
    assert r.complete and not r.violations and e.complete and not e.violations


@pytest.mark.slow
def test_every_mutant_is_caught_with_a_replayed_trace_and_the_explorers_verdicts() -> None:
    """Every mutant of the zoo at its scenario: SPIN's trail for the mutant's property, read back
    through ``spin -t`` and replayed through System.successors (verify raises if a step does not
    replay or the property holds at the end), and the set of violated properties is the
    explorer's. The depth-first trail, shrunk, is close to the explorer's shortest one."""
    assert MUTANTS
    for m in MUTANTS:
        system = m.system()
        r = verify(system, FAST)
        e = explore(system)
        assert m.prop in r.violations, f"{m.name}: spin missed {m.prop}"
        cex = r.violations[m.prop]
        assert len(cex.steps) == len(cex.path) and cex.message
        assert set(r.violations) == set(e.violations), m.name
        assert len(e.violations[m.prop].path) <= len(cex.path) <= 2 * len(e.violations[m.prop].path), m.name


def test_a_trail_is_checked_step_by_step_and_at_its_end() -> None:
    m = MUTANTS[0]
    system = m.system()
    model = generate(system)
    first = next(o for o in model.options if o.action == "client_init")
    ack = next(o for o in model.options if o.action == "client_ack")
    with pytest.raises(TraceMismatch, match="not a step the explorer offers"):
        replay(system, model, [ack.id], m.prop)
    with pytest.raises(TraceMismatch, match="the model holds it there"):
        replay(system, model, [first.id], m.prop)


def test_rows_name_the_property_method_and_verdict() -> None:
    m = next(m for m in MUTANTS if m.scenario == "readiness")
    sc = scenario("readiness")
    rows = spin_rows((sc,), model=lambda s: m.model(s.bounds), options=FAST)
    assert [r.property for r in rows] == [i.name for i in INVARIANTS]
    assert {r.method for r in rows} == {"spin"}
    bad = {r.property: r for r in rows if r.verdict == "violated"}
    assert m.prop in bad and bad[m.prop].trace and bad[m.prop].trace[-1].startswith("=> ")
    assert all(r.verdict in ("holds", "violated") for r in rows)


def test_a_search_cut_short_is_unknown_with_its_reason() -> None:
    sc = scenario("readiness")
    rows = spin_rows((sc,), options=PanOptions(optimize="-O0", hash_bits=18, depth=5, max_depth=5))
    assert {r.verdict for r in rows} == {"unknown"}
    assert all("deeper than -m5" in r.detail for r in rows)


def test_missing_spin_is_a_typed_error_with_the_apt_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spin_mod.shutil, "which", lambda name: None)
    with pytest.raises(SpinUnavailable, match="apt-get install spin"):
        verify(System(DEFAULT_SCENARIOS[0].bounds))
    rows = spin_rows(DEFAULT_SCENARIOS[:1])
    assert {r.verdict for r in rows} == {"unknown"}
    assert all("apt-get install spin" in r.detail for r in rows)
