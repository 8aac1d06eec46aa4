"""The mutant matrix bites (model/check/matrix.py over model/mutants.py; docs/proofs.md, "the mutant matrix").

Every mutant must be caught by the exhaustive explorer, by Z3 (a BMC trace from Init, replayed
through System) and by Hypothesis with the matrix's fixed seed: a checker that stops biting fails
CI here.
"""

from __future__ import annotations

import json
import shutil

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
    "heartbeat_suppressed": 3, "lease_race_two_owners": 3, "no_takeover_after_crash": 5, "lost_notification_no_poll": 7,
    "escalation_reads_local_sessions": 6, "per_node_limit_counter": 4,
}
# lease_race_two_owners breaks one_live_owner two ways: the run's lease (3 steps, the explorer's
# shortest) and the delivery lease (5 steps: init, resolve, validate_ok, agent_started, adopt),
# which is the one pan's depth-first search meets first.
SPIN_OTHER_ROUTE = {"lease_race_two_owners": 5}
# Hypothesis must catch every mutant of the zoo, a new one included, at the matrix's seed (0) and
# pipeproof check's budget (150 test cases x 40 steps). One seed, no retry: the run is a function of
# the seed alone (the seed decorates the @given test, deadlines are off), so load on the machine
# changes how long it takes, never what it finds. bench/hypothesis_seeds.py sweeps seeds 0-5.
HYPOTHESIS_CATCHES = frozenset(m.name for m in MUTANTS)


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
def test_hypothesis_catches_every_mutant(name: str) -> None:
    (cell,) = mutant_matrix(MatrixOptions(checkers=("hypothesis",), mutants=(BY_NAME[name],)))
    assert cell.verdict == "caught", cell.detail
    assert cell.property == BY_NAME[name].prop
    # Shrunk by delta debugging, not searched breadth-first: never shorter than the explorer's
    # shortest trace (that would be a bug), at most a few steps longer.
    assert cell.trace_length is not None and SHORTEST[name] <= cell.trace_length <= 3 * SHORTEST[name]


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
    assert {c["checker"] for c in out} == {"explorer", "hypothesis", "z3", "spin"}
    for c in out:
        assert {"mutant", "checker", "verdict", "trace_length", "property"} <= set(c)
        assert c["verdict"] == "caught", c


@pytest.mark.skipif(shutil.which("spin") is None or shutil.which("gcc") is None,
                    reason="spin or gcc is not installed (scripts/setup.sh installs both)")
def test_spin_catches_every_mutant_with_a_replayed_trail() -> None:
    cells = mutant_matrix(MatrixOptions(checkers=("spin",)))
    assert {c.mutant: c.verdict for c in cells} == {m.name: "caught" for m in MUTANTS}
    for c in cells:
        # Replayed through System.successors and shrunk: within one step of the shortest, or of
        # the shortest of another route to the same violation pan's depth-first search meets first.
        longest = SPIN_OTHER_ROUTE.get(c.mutant, SHORTEST[c.mutant]) + 1
        assert c.trace_length is not None and SHORTEST[c.mutant] <= c.trace_length <= longest, c
        assert c.trace[-1].startswith("=> ")


def test_without_spin_the_column_says_unavailable_and_the_command_exits_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeproof.model.check import spin as spin_mod

    monkeypatch.setattr(spin_mod.shutil, "which", lambda name: None)
    (cell,) = mutant_matrix(MatrixOptions(checkers=("spin",), mutants=(BY_NAME["ack_before_ready"],), jobs=1))
    assert cell.verdict == "unavailable" and "apt-get install spin" in cell.detail
    assert main(["check", "--mutants", "--only", "ack_before_ready", "--no-hypothesis", "--no-z3", "--jobs", "1",
                 "--quiet"]) == 2
    assert "could not run" in capsys.readouterr().err
