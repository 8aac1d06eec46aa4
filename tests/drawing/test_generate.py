"""The committed diagrams/ are exactly what the model produces; drift is caught (pipeproof/drawing/generate.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pipeproof.drawing import generate
from pipeproof.drawing.record import RECORD_NAME, STALE_MESSAGE, load
from pipeproof.drawing.source import DEFAULT_SOURCE, Source
from pipeproof.model.connection import Conn
from pipeproof.model.expr import Var
from pipeproof.model.mutants import add
from pipeproof.model.spec import Transition
from pipeproof.model.system import Bounds, SystemModel, reference_model

REPO = Path(__file__).resolve().parents[2]
DIAGRAMS = REPO / "diagrams"


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeproof.cli", "diagrams", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def record():
    return load(DIAGRAMS / RECORD_NAME)


def test_committed_diagrams_are_what_the_model_produces(record):
    drift = generate.check(DIAGRAMS, DEFAULT_SOURCE, record)
    assert drift.ok, drift.render()
    assert drift.compared > 40


def test_cli_check_passes_on_the_committed_tree():
    done = _cli("--check")
    assert done.returncode == 0, done.stderr


def _with_extra_transition(bounds: Bounds) -> SystemModel:
    # The seed's handshake race, written straight into the "real" model instead of as a mutant.
    base = reference_model(bounds)
    q = Var("queued")
    extra = Transition("handle_frame", Conn.INITIALISING, Conn.INITIALISING, guard=q > 0, updates=(("queued", q - 1),))
    return replace(base, connection=add(base.connection, extra))


def test_a_changed_transition_fails_the_drift_check(record):
    drift = generate.check(DIAGRAMS, Source(model=_with_extra_transition), record)
    assert not drift.ok
    assert drift.stale_record == STALE_MESSAGE
    assert "machines/connection.dot" in drift.changed
    assert "run pipeproof diagrams --refresh" in drift.render()


def test_a_changed_guard_changes_the_fingerprint_but_a_doc_string_does_not():
    from pipeproof.drawing.record import fingerprint

    def doc_only(bounds: Bounds) -> SystemModel:
        base = reference_model(bounds)
        ts = tuple(replace(t, doc=t.doc + " (reworded)") for t in base.delivery.transitions)
        return replace(base, delivery=replace(base.delivery, transitions=ts))

    assert fingerprint(Source(model=doc_only)) == fingerprint(DEFAULT_SOURCE)
    assert fingerprint(Source(model=_with_extra_transition)) != fingerprint(DEFAULT_SOURCE)


def test_cli_check_lists_a_hand_edited_file_and_a_stale_record(tmp_path):
    out = tmp_path / "diagrams"
    shutil.copytree(DIAGRAMS, out)
    dot = out / "machines" / "delivery.dot"
    dot.write_text(dot.read_text().replace("PENDING", "PENDING_EDITED", 1))
    (out / "machines" / "stray.dot").write_text("digraph {}\n")
    done = _cli("--check", "--out", str(out))
    assert done.returncode == 1
    assert "differs: machines/delivery.dot" in done.stderr
    assert "not generated: machines/stray.dot" in done.stderr

    shutil.rmtree(out)
    shutil.copytree(DIAGRAMS, out)
    data = json.loads((out / RECORD_NAME).read_text())
    data["fingerprint"] = "sha256:" + "0" * 64
    (out / RECORD_NAME).write_text(json.dumps(data))
    done = _cli("--check", "--out", str(out))
    assert done.returncode == 1
    assert STALE_MESSAGE in done.stderr


def test_missing_record_says_how_to_make_one(tmp_path):
    done = _cli("--check", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "--refresh" in done.stderr


def test_without_dot_the_sources_are_written_and_renderings_skipped(tmp_path):
    out = tmp_path / "diagrams"
    out.mkdir()
    shutil.copy(DIAGRAMS / RECORD_NAME, out / RECORD_NAME)
    empty_path = tmp_path / "bin"
    empty_path.mkdir()  # a PATH with no `dot` on it
    env = {**os.environ, "PATH": str(empty_path)}
    done = _cli("--out", str(out), env=env)
    assert done.returncode == 0, done.stderr
    assert "apt-get install graphviz" in done.stderr
    assert "skipped" in done.stderr
    assert (out / "machines" / "connection.dot").is_file()
    assert (out / "index.html").is_file()
    assert not list(out.rglob("*.svg")) or all(p.name.endswith(".sequence.svg") for p in out.rglob("*.svg"))
    assert not list(out.rglob("*.png"))
    # The sources are the committed ones, byte for byte.
    for rel in ("machines/connection.dot", "index.html", "protocol/asyncapi.json"):
        assert (out / rel).read_bytes() == (DIAGRAMS / rel).read_bytes(), rel
    # And the check, without dot, compares sources and reports the renderings as skipped.
    done = _cli("--check", env=env)
    assert done.returncode == 0, done.stderr
    assert "skipped, not compared (graphviz's dot is not installed)" in done.stderr


def test_generation_is_deterministic(record):
    a = generate.build(DEFAULT_SOURCE, record)
    b = generate.build(DEFAULT_SOURCE, record)
    assert a.sources == b.sources
    for data in a.sources.values():
        text = data.decode()
        assert str(REPO) not in text  # no absolute paths
