"""Tests for conformance/oracle (and conformance/timing.py's bounds): the rules the oracle checks
without a server, fed the observations a server would produce (docs/conformance.md). Each new
check is shown to pass the protocol's behaviour and to fail the bug it exists for."""

from __future__ import annotations

from typing import Any

import pytest

from pipeproof.conformance.errors import Violation
from pipeproof.conformance.oracle import Oracle, RunView
from pipeproof.conformance.oracle.belief import Belief
from pipeproof.conformance.timing import SMALL, Timing


def run_of(oracle: Oracle) -> tuple[Any, RunView]:
    user = oracle.user("alice")
    view = RunView("r1", Belief(oracle.run_machine), run_id="run-1")
    view.belief.configs = view.belief.fire("validate_ok")  # its run.accepted
    user.runs["run-1"] = view
    user.requests["r1"] = view
    return user, view


def feed(user: Any, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Events of run-1 at seqs 1..n, in order, as the sockets would hand them to the user."""
    for seq, (kind, data) in enumerate(events, start=1):
        user.kinds[seq] = ("run-1", kind)
        user._note_code(seq, kind, data)
    user.apply_runs()


def tool(kind: str, call: str) -> tuple[str, dict[str, Any]]:
    return kind, {"tool": "echo", "tool_call_id": call}


def test_each_tool_completed_must_close_the_open_call_by_its_tool_call_id() -> None:
    oracle = Oracle(SMALL)
    user, view = run_of(oracle)
    feed(user, [("agent_started", {}), ("agent_thinking", {}), tool("tool_executing", "c1"),
                tool("tool_completed", "c1"), tool("tool_executing", "c2"), tool("tool_completed", "c2"),
                ("agent_completed", {})])
    assert view.open_call is None and user.applied == 7

    oracle = Oracle(SMALL)
    user, _ = run_of(oracle)
    with pytest.raises(Violation) as caught:
        feed(user, [("agent_started", {}), ("agent_thinking", {}), tool("tool_executing", "c1"),
                    tool("tool_completed", "c9")])
    assert caught.value.prop == "run_events_well_ordered"
    assert "'c9'" in caught.value.observed and "'c1'" in caught.value.observed


def test_a_listing_that_skips_a_seq_is_reported_as_a_gap() -> None:
    user = Oracle(SMALL).user("alice")
    user.on_listing([{"seq": 1}, {"seq": 2}, {"seq": 3}])
    user.on_listing([])
    with pytest.raises(Violation) as caught:
        user.on_listing([{"seq": 1}, {"seq": 3}, {"seq": 4}])
    assert caught.value.prop == "seq_gap_free" and "seq 3 where seq 2 belongs" in caught.value.observed
    with pytest.raises(Violation):
        user.on_listing([{"seq": 2}])  # a listing from after=0 starts at 1


@pytest.mark.parametrize("timing", [SMALL, Timing(), SMALL.with_(ack_timeout=0.1, ack_timeout_max=0.1)],
                         ids=["small", "default", "fast"])
def test_an_early_resend_at_a_fifth_of_the_wait_is_too_early_in_every_profile(timing: Timing) -> None:
    for attempt in (1, 2):
        wait = timing.ack_wait(attempt)
        early, late = timing.resend_window(attempt)
        assert 0 < early <= wait <= late
        assert 0.2 * wait < early  # the bug's resend falls below the bound
        assert early <= wait - min(timing.slack, wait / 2) + 1e-9  # and a punctual one never does
    # A long declared wait keeps its constant slack (a half would be far too lax).
    assert Timing().early(1800.0) == pytest.approx(1800.0 - Timing().slack)
