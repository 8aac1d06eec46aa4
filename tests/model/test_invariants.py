"""Invariant predicates on hand-made inputs."""

from __future__ import annotations

from typing import Any

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


# -- every_event_acked_or_escalated: each clause caught by a variant only it catches -----------


def _eae_message(model_of: object) -> str:
    from dataclasses import replace as _replace

    from pipeproof.model.check.explorer import explore
    from pipeproof.model.mutants import scenario as _scenario
    from pipeproof.model.system import System as _System
    from pipeproof.model.system import reference_model as _reference

    sc = _scenario("readiness")
    base = _reference(sc.bounds)
    delivery = model_of(base.delivery)  # type: ignore[operator]
    r = explore(_System(sc.bounds, _replace(base, delivery=delivery)))
    v = r.violations.get("every_event_acked_or_escalated")
    assert v is not None, "the invariant missed the broken delivery machine"
    return str(v.message)


def test_the_stuck_clause_flags_a_machine_without_no_session_timeout() -> None:
    # Broken pipe 1 of the seed: no session, and nothing ever escalates the event. send_failed's
    # guard holds here, but the system never offers it without a live session: no progress.
    from pipeproof.model.mutants import drop

    def broken(d: Any) -> Any:
        for t in [t for t in d.transitions if t.event == "no_session_timeout"]:
            d = drop(d, t.key)
        return d

    message = _eae_message(broken)
    assert "is stuck in PENDING" in message and "quiescent" not in message


def test_the_horizon_clause_flags_an_event_that_ticks_for_ever() -> None:
    # Time passes without bound and nothing escalates: every state can still move (tick), so only
    # the liveness horizon sees it.
    from dataclasses import replace as _replace

    from pipeproof.model.delivery import Delivery
    from pipeproof.model.expr import Input
    from pipeproof.model.mutants import drop

    def broken(d: Any) -> Any:
        for t in [t for t in d.transitions if t.event == "no_session_timeout"]:
            d = drop(d, t.key)
        # Idle time is no longer counted (so the space stays finite); only age grows, saturating.
        age = tuple(u for u in next(t for t in d.transitions if t.event == "tick").updates if u[0] == "age")
        ticks = tuple(_replace(t, guard=~Input("has_session"), updates=age)
                      if t.event == "tick" and t.source is Delivery.PENDING else t for t in d.transitions)
        return _replace(d, transitions=ticks)

    message = _eae_message(broken)
    assert "ticks (horizon" in message


def test_the_delivered_clause_flags_an_ack_of_a_frame_never_delivered() -> None:
    from pipeproof.model.mutants import BY_NAME
    from pipeproof.model.mutants import scenario as _scenario

    mutant = BY_NAME["swallow_send_failure"]
    sc = _scenario(mutant.scenario)
    message = _eae_message(lambda d: mutant.model(sc.bounds).delivery)
    assert "never delivered" in message


# -- timeouts_close_the_socket: seed #9, a timeout that is logged and swallowed ----------------


@pytest.mark.parametrize(("key", "target"), [
    ("READY--heartbeat_timeout-->CLOSED", "READY"),  # heartbeat failure suppressed: socket kept
    ("OPEN--init_timeout-->CLOSED", "OPEN"),  # init timeout logged, socket left waiting
])
def test_a_swallowed_connection_timeout_is_flagged(key: str, target: str) -> None:
    from dataclasses import replace as _replace

    from pipeproof.model.check.explorer import explore
    from pipeproof.model.connection import Conn
    from pipeproof.model.mutants import change
    from pipeproof.model.mutants import scenario as _scenario
    from pipeproof.model.system import System, reference_model

    sc = _scenario("readiness")
    base = reference_model(sc.bounds)
    broken = _replace(base, connection=change(base.connection, key, target=Conn[target], emits=None))
    r = explore(System(sc.bounds, broken), stop_when=frozenset({"timeouts_close_the_socket"}))
    v = r.violations.get("timeouts_close_the_socket")
    assert v is not None
    assert "the timeout was swallowed" in v.message and target in v.message


def test_a_timeout_that_closes_without_its_code_is_flagged() -> None:
    from dataclasses import replace as _replace

    from pipeproof.model.check.explorer import explore
    from pipeproof.model.mutants import change
    from pipeproof.model.mutants import scenario as _scenario
    from pipeproof.model.system import System, reference_model

    sc = _scenario("readiness")
    base = reference_model(sc.bounds)
    # The socket is dropped, but with no close frame: the client sees 1006 and cannot tell why.
    broken = _replace(base, connection=change(base.connection, "READY--heartbeat_timeout-->CLOSED", emits=None))
    r = explore(System(sc.bounds, broken), stop_when=frozenset({"timeouts_close_the_socket"}))
    assert "timeouts_close_the_socket" in r.violations
