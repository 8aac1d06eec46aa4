"""The mutant matrix bites (model/check/matrix.py over model/mutants.py; docs/proofs.md, "the mutant matrix").

Every mutant must be caught by the exhaustive explorer and by Z3 (a BMC trace from Init, replayed
through System), and the mutants Hypothesis reliably catches with the fixed seed must stay caught:
a checker that stops biting fails CI here.
"""

from __future__ import annotations

import json

import pytest

from pipeproof.cli import main
from pipeproof.model.check.matrix import MatrixOptions, mutant_matrix, render_matrix
from pipeproof.model.mutants import BY_NAME, MUTANTS

# Shortest traces (steps) the explorer finds; Z3's BMC stops at the first violating depth, so its
# traces have the same length.
SHORTEST = {
    "handle_before_ready": 3, "ack_before_ready": 2, "swallow_send_failure": 6, "no_escalation": 10,
    "resend_acked": 8, "unlocked_context_create": 4, "expired_context_reused": 6, "cross_user_route": 9,
    "event_after_terminal": 6, "unpaired_tool_event": 5, "cancel_before_start_lost": 6,
    "no_session_never_notified": 4, "escalation_not_final": 6, "retry_cap_off_by_one": 8, "no_account_limit": 4,
    "heartbeat_suppressed": 3,
}
# Caught by Hypothesis with seed 0, 150 examples x 40 steps (the others need orderings it does not draw).
HYPOTHESIS_CATCHES = {
    "handle_before_ready", "ack_before_ready", "swallow_send_failure", "unlocked_context_create",
    "expired_context_reused", "event_after_terminal", "unpaired_tool_event",
}
# With the seed applied to the @given test itself the run is reproducible: these seven are caught on
# every run, and the other four are missed on every run (docs/proofs.md says why).


def test_zoo_is_the_documented_one() -> None:
    assert set(SHORTEST) == {m.name for m in MUTANTS}


def test_the_seed_table_in_the_docs_is_the_zoo() -> None:
    from pathlib import Path

    from pipeproof.model.mutants import seed_table_markdown

    doc = (Path(__file__).resolve().parents[2] / "docs" / "proofs.md").read_text()
    assert seed_table_markdown() in doc


def test_every_invariant_has_a_mutant_that_breaks_it() -> None:
    """A property no mutant breaks is a checker never shown to bite on it (issue: a mutant per invariant)."""
    from pipeproof.model.invariants import INVARIANTS

    assert {i.name for i in INVARIANTS} <= {m.prop for m in MUTANTS}



def test_explorer_catches_every_mutant_with_a_shortest_trace() -> None:
    cells = mutant_matrix(MatrixOptions(checkers=("explorer",)))
    assert {c.mutant: (c.verdict, c.trace_length) for c in cells} == {n: ("caught", k) for n, k in SHORTEST.items()}
    assert all(c.property == BY_NAME[c.mutant].prop for c in cells)


@pytest.mark.parametrize("name", sorted(HYPOTHESIS_CATCHES))
def test_hypothesis_catches_what_it_reliably_reaches(name: str) -> None:
    # Seed 0 catches each of these when the machine is quiet; Hypothesis's search also depends on
    # how fast examples run, so under CI load a second or third seed may be needed. A sampler
    # that catches none of them in three seeds has stopped biting, and fails.
    for seed in (0, 1, 2):
        (cell,) = mutant_matrix(MatrixOptions(checkers=("hypothesis",), mutants=(BY_NAME[name],), seed=seed))
        if cell.verdict == "caught":
            break
    assert cell.verdict == "caught", cell.detail
    assert cell.trace_length is not None and cell.trace_length >= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHORTEST))
def test_z3_catches_every_mutant_with_a_trace_from_init(name: str) -> None:
    (cell,) = mutant_matrix(MatrixOptions(checkers=("z3",), mutants=(BY_NAME[name],)))
    assert cell.verdict == "caught", cell.detail
    assert cell.trace_length == SHORTEST[name]
    assert cell.property == BY_NAME[name].prop
    # Readable: every step names its actor and action, the last line the violation.
    assert all(line.split()[0] in ("client", "server", "clock") for line in cell.trace[:-1])
    assert cell.trace[-1].startswith("=> ")


def test_matrix_json_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    mutants = (BY_NAME["ack_before_ready"],)
    cells = mutant_matrix(MatrixOptions(mutants=mutants, examples=20, steps=10))
    table = render_matrix(cells)
    assert "ack_before_ready" in table and "caught (2 steps)" in table
    assert main(["check", "--mutants", "--json", "--only", "ack_before_ready", "--only", "resend_acked",
                 "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {c["checker"] for c in out} == {"explorer", "hypothesis", "z3"}
    for c in out:
        assert {"mutant", "checker", "verdict", "trace_length", "property"} <= set(c)
        assert c["verdict"] == "caught" or (c["checker"], c["mutant"]) == ("hypothesis", "resend_acked")
