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
