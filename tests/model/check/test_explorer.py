"""The exhaustive explorer: holds on the reference model, bites on a broken one, reports honestly."""

from __future__ import annotations

from pipeproof.model.check.explorer import explore
from pipeproof.model.connection import Conn
from pipeproof.model.expr import Var
from pipeproof.model.invariants import INVARIANTS
from pipeproof.model.mutants import BY_NAME, add, scenario
from pipeproof.model.scenarios import DEFAULT_SCENARIOS
from pipeproof.model.spec import Transition
from pipeproof.model.system import Bounds, System, reference_model


def test_reference_model_holds_on_the_default_scenarios() -> None:
    for sc in DEFAULT_SCENARIOS:
        r = explore(System(sc.bounds))
        assert r.complete, sc.name
        assert r.violations == {}, (sc.name, {k: v.render() for k, v in r.violations.items()})
        assert r.states > 1000 and r.transitions > r.states and r.depth > 10
        assert r.quiescent > 0  # the quiescence check was exercised


def test_handling_a_message_while_initialising_is_caught_with_a_short_trace() -> None:
    """The issue's example: let a message be handled in INITIALISING."""
    b = scenario("readiness").bounds
    base = reference_model(b)
    q = Var("queued")
    broken = add(base.connection, Transition("handle_frame", Conn.INITIALISING, Conn.INITIALISING,
                                             guard=q > 0, updates=(("queued", q - 1),)))
    from dataclasses import replace

    r = explore(System(b, replace(base, connection=broken)))
    cex = r.violations["no_message_before_ready"]
    assert len(cex.steps) <= 4
    assert "handle_frame" in cex.steps[-1] and "INITIALISING" in cex.steps[-1]
    assert cex.steps[0].startswith("client client_init")
    assert len(cex.path) == len(cex.steps)
    rendered = cex.render()
    assert "no_message_before_ready violated" in rendered and "shortest trace" in rendered


def test_shortest_traces_are_shortest() -> None:
    """BFS: no shorter trace exists than the one reported (checked by exploring to depth-1)."""
    m = BY_NAME["unlocked_context_create"]
    r = explore(m.system(), stop_when=frozenset({m.prop}))
    n = len(r.violations[m.prop].steps)
    assert n == 4  # init, init, resolve, resolve: the race itself


def test_truncated_exploration_is_not_complete() -> None:
    r = explore(System(scenario("races").bounds), max_states=500)
    assert not r.complete and r.states <= 501


def test_summary_reports_speed_and_counts() -> None:
    r = explore(System(Bounds(users=1, sessions_per_user=1, events_per_user=2, frames=False, drain=False)))
    s = r.summary()
    assert "states" in s and "transitions" in s and "states/s" in s and "complete" in s
    assert r.states_per_second > 0


def test_coverage_records_fired_transitions() -> None:
    r = explore(System(scenario("readiness").bounds))
    conn = r.covered["connection"]
    assert "READY--send_ack-->READY" in conn and "INITIALISING--recv_frame-->INITIALISING" in conn
    assert "SENT--ack_timeout-->ESCALATED" in r.covered["delivery"]


def test_every_invariant_is_checked_somewhere() -> None:
    assert {i.name for i in INVARIANTS} >= {
        "no_message_before_ready", "ready_before_ack", "every_event_acked_or_escalated", "acked_never_resent",
        "monotonic_event_state", "one_context_per_user", "no_cross_user_read", "run_events_well_ordered",
        "attempts_bounded",
    }
