"""`pipeproof export --promela` and `pipeproof check --engine spin` (src/pipeproof/commands/export.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeproof.cli import main
from pipeproof.model.check import spin as spin_mod
from pipeproof.model.invariants import INVARIANTS

SMALL = ["--users", "1", "--sessions", "1", "--events", "2", "--attempts", "1"]
needs_spin = pytest.mark.skipif(shutil.which("spin") is None or shutil.which("gcc") is None,
                                reason="spin or gcc is not installed (scripts/setup.sh installs both)")


def test_export_writes_promela_at_the_bounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.pml"
    assert main(["export", "--promela", str(out), *SMALL, "--ack-timeout", "0", "--resume-window", "0"]) == 0
    text = out.read_text()
    assert "active proctype system()" in text and "model 'reference' at 1 users x 1 sessions x 2 events" in text
    assert "ack_timeout 0" in text
    assert "wrote" in capsys.readouterr().err


def test_export_a_mutant_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--promela", "-", "--mutant", "handle_before_ready"]) == 0
    assert "model 'handle_before_ready' at 1 users x 1 sessions x 2 events" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--mutant", "no_such_mutant"], ["--scenario", "nowhere"], ["--events", "1"]])
def test_export_refuses_bad_input(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--promela", str(tmp_path / "m.pml"), *argv]) == 2
    assert "pipeproof export:" in capsys.readouterr().err


@needs_spin
def test_check_with_spin_prints_one_spin_row_per_invariant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--engine", "spin", "--json", *SMALL]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["property"] for r in rows] == [i.name for i in INVARIANTS]
    assert {(r["method"], r["verdict"]) for r in rows} == {("spin", "holds")}


def test_check_with_spin_missing_is_unknown_with_the_apt_line(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(spin_mod.shutil, "which", lambda name: None)
    assert main(["check", "--engine", "spin", "--quiet", *SMALL]) == 2
    captured = capsys.readouterr()
    assert "unknown" in captured.out and "apt-get install spin" in captured.err


def test_check_with_spin_refuses_the_other_checkers_modes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--engine", "spin", "--mutants"]) == 2
    assert "--mutants and --explain" in capsys.readouterr().err
