"""Machine graphs and sequence diagrams carry what the declarations say (pipeproof/drawing/machines.py, sequence.py)."""

from __future__ import annotations

import html
import xml.etree.ElementTree as ET

import pytest

from pipeproof.drawing.machines import KIND_COLOURS, UNCOVERED, Highlight, machine_dot
from pipeproof.drawing.record import trace_from_path
from pipeproof.drawing.sequence import sequence_svg
from pipeproof.drawing.source import DEFAULT_SOURCE
from pipeproof.model.check.explorer import explore
from pipeproof.model.mutants import MUTANTS

MACHINES = DEFAULT_SOURCE.machines()


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.name)
def test_every_transition_is_drawn_with_event_guard_and_invariants(machine):
    dot = machine_dot(machine, coverage={t.key for t in machine.transitions})
    text = html.unescape(dot)
    for t in machine.transitions:
        assert f"<B>{t.event}</B>" in text
        if t.guard.render() != "true":
            assert t.guard.render() in text
        for inv in t.invariants:
            assert inv in text
    assert f"__start -> {machine.initial.name}" in dot
    for s in machine.terminal:
        assert f"{s.name} [" in dot and "peripheries=2" in dot
    assert UNCOVERED not in dot.split("legend")[0]  # everything covered: nothing grey before the legend


def test_never_fired_transitions_are_grey_and_dashed():
    machine = MACHINES[0]
    missing = next(t for t in machine.transitions if t.source is not t.target)
    dot = machine_dot(machine, coverage={t.key for t in machine.transitions} - {missing.key})
    line = next(line for line in dot.splitlines()
                if line.strip().startswith(f"{missing.source.name} -> {missing.target.name}") and missing.event in line)
    assert "style=dashed" in line and UNCOVERED in line
    assert "never fired by the explorer" in line


def test_kinds_have_their_colours():
    machine = MACHINES[0]
    dot = machine_dot(machine, coverage=None)
    for t in machine.transitions:
        if t.source is not t.target:
            assert KIND_COLOURS[t.kind] in dot


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_every_mutant_trace_draws_as_a_well_formed_sequence_diagram(mutant):
    system = mutant.system()
    cex = explore(system, stop_when=frozenset({mutant.prop})).violations[mutant.prop]
    trace = trace_from_path(system, mutant.prop, cex.message, mutant.scenario, cex.path)
    svg = sequence_svg(trace, title=mutant.name, ident=f"sequence-{mutant.name}")
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    for lane in ("client (sessions)", "server", "store (contexts, streams, runs)"):
        assert lane in texts
    assert f"{mutant.prop} violated" in texts
    assert cex.message in texts
    assert svg == sequence_svg(trace, title=mutant.name, ident=f"sequence-{mutant.name}")


def test_highlighted_path_marks_steps_and_the_mutants_delta():
    machine = MACHINES[0]
    t = machine.transitions[1]
    dot = machine_dot(machine, coverage=None, highlight=Highlight(steps={t.key: ["2 (s0)"]}, added={t.key}))
    assert "step 2 (s0)" in dot
    assert "mutant" in dot
