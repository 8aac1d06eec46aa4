"""The composed model contains the interleavings a real server sees (reachability queries)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pipeproof.model.connection import Conn
from pipeproof.model.delivery import Delivery
from pipeproof.model.mutants import scenario
from pipeproof.model.system import State, Step, System


def reachable(system: System, want: Callable[[State, Step], bool], limit: int = 400_000) -> list[str]:
    """BFS for a step satisfying ``want``; returns its trace (fails the test when none exists)."""
    init = system.initial()
    parent: dict[State, tuple[State, Step] | None] = {init: None}
    todo = deque([init])
    while todo and len(parent) < limit:
        s = todo.popleft()
        for step in system.successors(s):
            if want(s, step):
                trace = [system.describe_step(step)]
                link = parent[s]
                while link is not None:
                    trace.append(system.describe_step(link[1]))
                    link = parent[link[0]]
                return trace[::-1]
            if step.after not in parent:
                parent[step.after] = (s, step)
                todo.append(step.after)
    raise AssertionError("not reachable")


def test_two_inits_for_one_user_race() -> None:
    races = System(scenario("races").bounds)
    trace = reachable(races, lambda s, st: all(c[0] is Conn.INITIALISING for c in st.after.conns))
    assert len(trace) == 2


def test_socket_dropped_mid_delivery() -> None:
    races = System(scenario("races").bounds)
    trace = reachable(races, lambda s, st: st.action == "client_drop" and any(
        cfg[0] is Delivery.SENT for cfg in s.events[0]))
    assert trace[-1].startswith("client client_drop")


def test_ack_after_a_retry_was_sent() -> None:
    races = System(scenario("races").bounds)
    trace = reachable(races, lambda s, st: st.action == "client_ack" and any(
        f.family == "event" and f.before[1][0] >= 2 for f in st.firings))
    assert sum("send:" in line for line in trace) >= 2


def test_resume_on_another_session() -> None:
    races = System(scenario("races").bounds)
    trace = reachable(races, lambda s, st: st.action == "server_resolve" and s.resume[st.args[0]] > 0
                      and any(f.family == "event" and f.transition.event == "ack" for f in st.firings))
    assert any("client_init_resume" in line for line in trace)


def test_events_escalate_for_each_reason() -> None:
    readiness = System(scenario("readiness").bounds)
    for event in ("ack_timeout", "no_session_timeout", "send_failed"):
        reachable(readiness, lambda s, st, ev=event: any(
            f.transition.event == ev and f.after[0] is Delivery.ESCALATED for f in st.firings))


# -- nodes (docs/model.md, "nodes") ------------------------------------------------------------


def test_one_user_holds_sessions_on_two_nodes() -> None:
    nodes = System(scenario("nodes").bounds)
    assert {nodes.node_of(s) for s in nodes.sessions_of(0)} == {0, 1}


def test_a_relay_writes_what_the_owner_recorded() -> None:
    """The run's node (n0) owns delivery; a send to the user's session on n1 leaves n1's relay
    behind until it reads the store, and model time waits for it."""
    nodes = System(scenario("nodes").bounds)
    trace = reachable(nodes, lambda s, st: st.action == "server_relay_catch_up" and s.lease[0] == 0
                      and any(c[0] is Delivery.SENT for c in s.events[0]))
    assert any("server_send(session s1" in line for line in trace)
    assert trace[-1].startswith("server server_relay_catch_up(user u0, node n1)")


def test_a_survivor_adopts_a_crashed_owners_unfinished_event() -> None:
    nodes = System(scenario("nodes").bounds)
    trace = reachable(nodes, lambda s, st: any(
        f.family == "event" and f.after[0] in (Delivery.ACKED, Delivery.ESCALATED) for f in st.firings)
        and s.lease[0] == 1 and not s.up[0])
    assert any("server_node_crash(node n0)" in line for line in trace)
    assert any("server_adopt_delivery(user u0, node n1)" in line for line in trace)


def test_a_crashed_nodes_ready_socket_drops_and_stops_counting() -> None:
    nodes = System(scenario("nodes").bounds)
    trace = reachable(nodes, lambda s, st: st.action == "server_node_lost" and s.conns[st.args[0]][0] is Conn.READY)
    assert any("server_node_crash" in line for line in trace)
    # Its row goes with it: the registry's detach fires in the same step.
    assert "detach" in trace[-1]


def test_an_adopted_run_ends_on_the_survivor() -> None:
    nodes = System(scenario("nodes").bounds)
    trace = reachable(nodes, lambda s, st: st.action == "server_run_agent_failed" and s.run_lease[0] == 1)
    assert any("server_adopt_run(user u0, node n1)" in line for line in trace)


def test_one_node_has_no_node_steps() -> None:
    one = System(scenario("races").bounds)
    trace = reachable(one, lambda s, st: st.action == "server_run_agent_started")
    assert not any(a in line for line in trace for a in ("node", "adopt", "relay"))
