"""The composition is declared once (model/composition.py): the explorer and the Z3 encoding
produce only declared actions, by the declared actor, firing only declared machine events."""

from __future__ import annotations

from collections import deque

import pytest

from pipeproof.model.check.z3system import SysEnc
from pipeproof.model.check.z3universe import Universe
from pipeproof.model.composition import ACTIONS, BY_NAME, step_problems
from pipeproof.model.scenarios import DEFAULT_SCENARIOS
from pipeproof.model.system import Bounds, System, reference_model


def _explore_actions(system: System, limit: int) -> tuple[set[str], list[str]]:
    seen = {system.initial()}
    todo = deque(seen)
    actions: set[str] = set()
    problems: list[str] = []
    while todo and len(seen) < limit:
        for step in system.successors(todo.popleft()):
            actions.add(step.action)
            problems += step_problems(step.action, step.actor,
                                      [(f.family, f.transition.event) for f in step.firings])
            if step.after not in seen:
                seen.add(step.after)
                todo.append(step.after)
    return actions, problems


def test_every_explorer_step_is_a_declared_action_and_every_action_is_taken() -> None:
    taken: set[str] = set()
    for sc in DEFAULT_SCENARIOS:
        actions, problems = _explore_actions(System(sc.bounds), 6_000)
        assert problems == [], problems[:5]
        taken |= actions
    assert {a.name for a in ACTIONS} - taken == set()


def test_every_z3_case_is_a_declared_action() -> None:
    enc = SysEnc(reference_model(Bounds()), Universe.symbolic_universe())
    pre = enc.fresh_state("pre")
    cases = enc.cases(pre, "t")
    problems = [p for c in cases for p in step_problems(c.action, c.actor,
                                                       [(f.family, f.transition.event) for f in c.firings])]
    assert problems == []
    assert {c.action for c in cases} == {a.name for a in ACTIONS}


@pytest.mark.parametrize(("action", "actor", "firings"), [
    ("client_frame", "client", [("conn", "handle_frame")]),  # handling inside the client's receive
    ("server_send", "client", [("conn", "deliver"), ("event", "send")]),  # wrong actor
    ("server_teleport", "server", []),  # undeclared action
])
def test_the_cross_check_bites_on_a_broken_step(action: str, actor: str, firings: list[tuple[str, str]]) -> None:
    assert step_problems(action, actor, firings)


def test_conn_actions_name_their_event_and_flags_are_bounds_switches() -> None:
    from dataclasses import fields

    from pipeproof.model.system import Bounds

    switches = {f.name for f in fields(Bounds) if f.type in ("bool", bool)}
    for a in ACTIONS:
        assert not a.flag or a.flag in switches, a
        if a.glue == "conn":
            assert a.fires[0].family == "conn" and len(a.fires[0].events) == 1
    assert BY_NAME["client_frame"].inputs == ("over_bytes",)
