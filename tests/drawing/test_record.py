"""The verification record and the model fingerprint (pipeproof/drawing/record.py, matrix.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from pipeproof.drawing.matrix import adapt_cells
from pipeproof.drawing.record import (
    CheckRow,
    MatrixCell,
    MutantEntry,
    Record,
    dumps,
    fingerprint,
    trace_from_path,
)
from pipeproof.drawing.source import DEFAULT_SOURCE
from pipeproof.model.check.explorer import explore
from pipeproof.model.mutants import BY_NAME

SCRIPT = "from pipeproof.drawing.record import fingerprint; from pipeproof.drawing.source import DEFAULT_SOURCE; " \
         "print(fingerprint(DEFAULT_SOURCE))"


def test_fingerprint_does_not_depend_on_hash_randomisation():
    prints = set()
    for seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
        prints.add(done.stdout.strip())
    assert prints == {fingerprint(DEFAULT_SOURCE)}
    assert next(iter(prints)).startswith("sha256:")


def _sample_record() -> Record:
    m = BY_NAME["ack_before_ready"]
    system = m.system()
    cex = explore(system, stop_when=frozenset({m.prop})).violations[m.prop]
    trace = trace_from_path(system, m.prop, cex.message, m.scenario, cex.path)
    return Record(
        fingerprint=fingerprint(DEFAULT_SOURCE),
        checks=[CheckRow("connection", "ready_before_ack", "explorer", "holds", 10)],
        coverage={"connection": ["OPEN--recv_init-->INITIALISING"]},
        failing=[trace],
        mutants=[MutantEntry(m.name, m.seed, m.delta, m.prop, m.scenario, trace)],
        matrix=[MatrixCell(m.name, "explorer", True, len(trace.steps), m.prop)],
        matrix_source="test",
        checkers=["explorer"],
    )


def test_record_round_trips_through_json():
    import json

    rec = _sample_record()
    text = dumps(rec)
    again = Record.from_json(json.loads(text))
    assert again == rec
    assert dumps(again) == text
    assert '"seconds"' not in text  # no timings in the record


def test_traces_keep_actor_and_firings():
    trace = _sample_record().mutants[0].counterexample
    assert trace is not None
    assert [s.actor for s in trace.steps] == ["client", "server"]
    assert trace.steps[-1].firings[0].key == "INITIALISING--send_ack-->INITIALISING"


@dataclass
class _Cell:
    mutant: object
    checker: str
    verdict: str
    trace: list[str]
    prop: str


@dataclass
class _Named:
    name: str


def test_matrix_cells_are_read_by_field_name():
    raw = [
        _Cell(_Named("ack_before_ready"), "z3", "caught", ["a", "b"], "ready_before_ack"),
        {"mutant": "no_escalation", "checker": "hypothesis", "caught": False,
         "property": "every_event_acked_or_escalated"},
    ]
    cells = adapt_cells(raw)
    assert cells[0] == MatrixCell("ack_before_ready", "z3", True, 2, "ready_before_ack")
    assert cells[1] == MatrixCell("no_escalation", "hypothesis", False, None, "every_event_acked_or_escalated")
