"""Z3 proofs, BMC and the verdict discipline (model/check/z3check.py; docs/proofs.md)."""

from __future__ import annotations

import pytest

from pipeproof.model.check.checks import CheckOptions
from pipeproof.model.check.z3check import EAE, bmc, explain, prove, verdicts, z3_rows
from pipeproof.model.check.z3props import LEMMAS, PROPERTIES, PROPERTY_BY_NAME, closure
from pipeproof.model.scenarios import DEFAULT_SCENARIOS
from pipeproof.model.system import Bounds, System, reference_model


@pytest.fixture(scope="module")
def reference_run():
    return prove()


def test_every_safety_invariant_is_proved_by_induction(reference_run) -> None:
    assert reference_run.init.result == "unsat"
    assert all(o.result == "unsat" for o in reference_run.step), [o for o in reference_run.step if o.result != "unsat"]
    results = {p.prop: p.verdict for p in verdicts(reference_run)}
    assert results == {p.name: "proved" for p in PROPERTIES}


@pytest.mark.parametrize("prop", [p for p in PROPERTIES if p.lemmas], ids=lambda p: p.name)
def test_each_property_is_inductive_with_its_own_lemmas(prop) -> None:
    """The lemmas --explain prints are enough: the property's lemma closure is inductive on its own."""
    run = prove(props=(prop,), lemmas=closure(prop.lemmas))
    assert verdicts(run, (prop,))[0].verdict == "proved", [o for o in run.step if o.result != "unsat"]


def test_a_lemma_left_out_is_reported_not_proved() -> None:
    """Without 'PENDING => attempt < max_attempts' attempts_bounded is not inductive: a CTI, not a proof."""
    prop = PROPERTY_BY_NAME["attempts_bounded"]
    run = prove(props=(prop,), lemmas=())
    proof = verdicts(run, (prop,))[0]
    assert proof.verdict == "unknown" and proof.cti


def test_a_timeout_is_unknown_never_proved() -> None:
    run = prove(timeout_ms=1)
    proofs = verdicts(run)
    every = [run.init, *run.step, *(o for obs in run.props.values() for o in obs)]
    assert any(o.result == "unknown" for o in every)
    for proof in proofs:
        obligations = [run.init, *run.step, *run.props[proof.prop]]
        if any(o.result == "unknown" for o in obligations):
            assert proof.verdict == "unknown"
        assert proof.verdict != "proved" or all(o.result == "unsat" for o in obligations)


@pytest.mark.slow
def test_check_rows_report_unknown_on_timeout() -> None:
    rows = z3_rows(CheckOptions(z3_timeout_ms=1, extra={"z3_bmc": False, "confirm_depth": 2}))
    assert rows and all(r.method == "z3" for r in rows)
    unknown = [r for r in rows if r.verdict == "unknown"]
    assert unknown
    for r in unknown:
        # Never a silent unknown: the induction's answer, the retry with the property's own lemmas
        # and how deep BMC looked are all in the row.
        assert "timeout" in r.detail and "own lemma set" in r.detail, r.detail
        assert "BMC to depth 2 on every scenario" in r.detail, r.detail


@pytest.mark.slow
@pytest.mark.parametrize("name", ["handle_before_ready", "cancel_before_start_lost"])
def test_check_rows_on_a_broken_model_say_violated_with_a_replayed_trace(name: str) -> None:
    """The audit saw ``unknown`` here: BMC ran only when a CTI came back, and at full strength Z3
    timed out instead. Now an unproved property always gets the lemma-set retry and BMC."""
    from pipeproof.model.mutants import BY_NAME

    m = BY_NAME[name]
    rows = z3_rows(CheckOptions(model=lambda sc: m.model(sc.bounds), z3_timeout_ms=5_000, extra={"z3_bmc": False}))
    row = next(r for r in rows if r.property == m.prop)
    assert row.verdict == "violated", row.detail
    assert row.trace is not None and row.trace[-1].startswith("=> ")
    assert all(line.split()[0] in ("client", "server", "clock") for line in row.trace[:-1])
    assert "replayed through the explorer" in row.detail


def test_check_rows_prove_everything() -> None:
    rows = z3_rows(CheckOptions(extra={"bmc_depth": 3}))
    assert {r.property: r.verdict for r in rows} == {p.name: "proved" for p in PROPERTIES}
    assert "bounded liveness by BMC to depth 3" in next(r.detail for r in rows if r.property == EAE)


def test_bmc_is_clean_on_the_reference_and_replays_through_system() -> None:
    sc = DEFAULT_SCENARIOS[0]
    r = bmc(System(sc.bounds, reference_model(sc.bounds)), [p.name for p in PROPERTIES], depth=4)
    assert r.result == "clean" and r.depth == 4


def test_explain_prints_the_lemmas() -> None:
    text = explain("one_context_per_user")
    for name in closure(PROPERTY_BY_NAME["one_context_per_user"].lemmas):
        assert name in text
    assert "none" in explain("no_message_before_ready")
    assert len(LEMMAS) >= 10
    assert Bounds().users >= 1
