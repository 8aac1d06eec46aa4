"""Invariant predicates on hand-made inputs."""

from __future__ import annotations

import pytest

from pipeproof.model.invariants import BY_NAME, INVARIANTS, well_ordered


@pytest.mark.parametrize("kinds", [
    (), ("agent_started",), ("agent_started", "agent_thinking", "agent_completed"),
    ("agent_started", "tool_executing", "tool_completed", "agent_failed"), ("agent_failed",),
])
def test_well_ordered_streams(kinds: tuple[str, ...]) -> None:
    assert well_ordered(kinds) == ""


@pytest.mark.parametrize(("kinds", "why"), [
    (("agent_thinking",), "first event"),
    (("agent_started", "agent_completed", "agent_thinking"), "after terminal"),
    (("agent_started", "tool_completed"), "without tool_executing"),
    (("agent_started", "tool_executing", "agent_completed"), "still executing"),
    (("agent_started", "tool_executing", "tool_executing"), "while a tool is open"),
    (("agent_started", "agent_started"), "twice"),
])
def test_ill_ordered_streams(kinds: tuple[str, ...], why: str) -> None:
    assert why in well_ordered(kinds)


def test_every_invariant_is_documented_and_checkable() -> None:
    for inv in INVARIANTS:
        assert inv.doc and (inv.state_check or inv.step_check), inv.name
    assert BY_NAME["no_message_before_ready"].step_check is not None
