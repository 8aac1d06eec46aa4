"""`pipeproof check`: the table, the JSON rows, the exit codes."""

from __future__ import annotations

import json

import pytest

from pipeproof.cli import main
from pipeproof.model.check.checks import CheckOptions, run_checks
from pipeproof.model.mutants import BY_NAME, scenario

SMALL = ["--users", "1", "--sessions", "1", "--events", "2", "--attempts", "1"]


def test_json_rows_have_the_documented_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", "--json", "--no-z3", "--examples", "20", "--steps", "15", *SMALL])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {r["method"] for r in rows} == {"explorer", "hypothesis"}
    for r in rows:
        assert {"machine", "property", "method", "verdict", "states_or_examples", "seconds"} <= set(r)
        assert r["verdict"] in ("holds", "proved")
        assert "trace" not in r
    props = {r["property"] for r in rows if r["method"] == "explorer"}
    assert "no_message_before_ready" in props and "one_context_per_user" in props


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--quiet", "--no-z3", "--no-hypothesis", *SMALL]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["machine", "property", "method", "verdict", "states/examples", "seconds"]


def test_violation_gives_rows_with_traces_and_exit_1(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    mutant = BY_NAME["handle_before_ready"]
    rows = run_checks(CheckOptions(scenarios=(scenario("readiness"),), hypothesis=False, z3=False,
                                   model=lambda sc: mutant.model(sc.bounds)))
    bad = [r for r in rows if r.verdict == "violated"]
    assert [r.property for r in bad] == ["no_message_before_ready"]
    assert bad[0].trace is not None and len(bad[0].trace) <= 5

    import pipeproof.model.check.checks as checks

    monkeypatch.setattr(checks, "run_checks", lambda opts: rows)
    assert main(["check", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert any(r["verdict"] == "violated" and r["trace"] for r in out)


def test_bad_bounds_are_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--events", "1"]) == 2
    assert "events_per_user must be at least 2" in capsys.readouterr().err
