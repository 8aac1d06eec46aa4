"""The Promela generator (model/check/promela.py): what it emits, without compiling anything.

The generated predicates are held to model/invariants.py here by ``spin`` in simulation (no C
compiler): every state property on a sample of reachable states of the reference model and of
every mutant. Compiled runs (state and transition counts, counterexamples) are in test_spin.py.
"""

from __future__ import annotations

import itertools
import random
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from pipeproof.errors import ModelDefinitionError
from pipeproof.model.check.explorer import explore
from pipeproof.model.check.promela import QUIESCENT, RANGE, STATE_CHECK, encode, generate, probe
from pipeproof.model.invariants import BY_NAME, INVARIANTS, well_ordered
from pipeproof.model.mutants import MUTANTS
from pipeproof.model.run import AGENT_EVENTS
from pipeproof.model.scenarios import DEFAULT_SCENARIOS
from pipeproof.model.system import State, System

needs_spin = pytest.mark.skipif(shutil.which("spin") is None, reason="spin is not installed (scripts/setup.sh)")


def _sample(system: System, walks: int = 30, length: int = 20) -> list[State]:
    """The distinct states of seeded random walks from the initial state (deeper than a BFS
    prefix of the same cost, so violations of the mutants show up)."""
    rnd = random.Random(0)
    seen: dict[State, None] = {}
    for _ in range(walks):
        state = system.initial()
        seen.setdefault(state)
        for _ in range(length):
            steps = list(system.successors(state))
            if not steps:
                break
            state = rnd.choice(steps).after
            seen.setdefault(state)
    return list(seen)


def test_every_invariant_has_a_promela_form() -> None:
    model = generate(System(DEFAULT_SCENARIOS[0].bounds))
    assert model.untranslated == ()
    assert set(model.properties) == {i.name for i in INVARIANTS} | {RANGE}


def test_one_option_per_step_kind_then_the_two_checks() -> None:
    model = generate(System(DEFAULT_SCENARIOS[0].bounds))
    assert [o.action for o in model.options[-2:]] == [STATE_CHECK, QUIESCENT]
    assert all(not model.is_check(o.id) for o in model.options[:-2])
    assert [o.id for o in model.options] == list(range(len(model.options)))
    # Each option prints its id, which is how a trail is read back.
    for o in model.options:
        assert f'printf("STEP {o.id}\\n")' in model.text
    assert model.text.count(":: d_step {") == len(model.options)


def test_state_vector_is_the_explorers_state() -> None:
    """Every global outside the hidden flags is a field of State; the initial values agree."""
    system = System(DEFAULT_SCENARIOS[1].bounds)
    model = generate(system)
    declared = dict(re.findall(r"^(?:unsigned|bit|byte|short) (\w+)(?: : \d+)? = (\w+)", model.text, re.MULTILINE))
    declared.update(re.findall(r"; (?:unsigned|bit|byte|short) (\w+)(?: : \d+)? = (\w+)", model.text))
    init = encode(system, system.initial())
    assert set(declared) == set(init)
    defines = dict(re.findall(r"^#define (\w+) (\d+)$", model.text, re.MULTILINE))
    assert {k: int(defines.get(v, v)) for k, v in declared.items()} == init


def test_an_unknown_route_is_an_error_not_a_guess() -> None:
    system = System(DEFAULT_SCENARIOS[2].bounds)

    def odd_route(system: System, state: State, session: int, user: int) -> bool:
        return (session + user) % 2 == 0

    with pytest.raises(ModelDefinitionError, match="no Promela mirror for route"):
        generate(System(system.bounds, replace(system.model, route=odd_route)))


def test_every_mutant_generates() -> None:
    for m in MUTANTS:
        text = generate(m.system()).text
        assert f"model {m.name!r}" in text


def _probe(system: System, states: list[State], tmp: Path) -> list[tuple[State, str, bool]]:
    text, props = probe(system, states)
    (tmp / "probe.pml").write_text(text)
    done = subprocess.run(["spin", "probe.pml"], cwd=tmp, capture_output=True, text=True, check=True, timeout=120)
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("PROBE")]
    assert len(rows) == len(states), done.stdout[-2000:] + done.stderr[-2000:]
    return [(states[int(r[1])], p, v == "1") for r in rows for p, v in zip(props, r[2:], strict=True)]


@needs_spin
def test_state_predicates_agree_with_the_invariants(tmp_path: Path) -> None:
    """On sampled states of every default scenario and every mutant's scenario (random walks, plus
    every state along the explorer's counterexample for the mutant), each generated state
    predicate says "violated" exactly when the invariant's state_check reports something."""
    cases: list[tuple[System, list[State]]] = [(System(sc.bounds), []) for sc in DEFAULT_SCENARIOS]
    for m in MUTANTS:
        system = m.system()
        cex = explore(system, stop_when=frozenset({m.prop})).violations[m.prop]
        cases.append((system, [step.after for step in cex.path]))
    violated: set[str] = set()
    for system, along in cases:
        states = list(dict.fromkeys([*_sample(system), *along]))
        for state, prop, bad in _probe(system, states, tmp_path):
            check = BY_NAME[prop].state_check
            assert check is not None
            assert bad == bool(check(system, state)), f"{system.model.name}: {prop} on {state}"
            violated |= {prop} if bad else set()
    # The sample exercises the "violated" side of every state property the mutants break.
    assert violated >= {m.prop for m in MUTANTS if BY_NAME[m.prop].state_check is not None}, violated


@needs_spin
def test_run_ordering_predicate_on_every_short_kind_sequence(tmp_path: Path) -> None:
    """invariants.well_ordered, as one Promela expression, on every sequence of agent events of
    length up to 3 and a sample of length 4 (most of them unreachable: the predicate must be
    right on what a broken run could emit, not only on what the reference run does)."""
    system = System(replace(DEFAULT_SCENARIOS[3].bounds, events_per_user=4))
    init = system.initial()
    kinds = list(AGENT_EVENTS)
    seqs = [seq for n in range(4) for seq in itertools.product(kinds, repeat=n)]
    seqs += random.Random(0).sample(list(itertools.product(kinds, repeat=4)), 300)
    fresh = system.model.delivery.initial_config()
    states = [init._replace(events=((fresh,) * len(seq),), kinds=(seq,)) for seq in seqs]
    results = [(st, bad) for st, prop, bad in _probe(system, states, tmp_path) if prop == "run_events_well_ordered"]
    assert len(results) == len(states)
    for st, bad in results:
        assert bad == bool(well_ordered(st.kinds[0])), st.kinds[0]
