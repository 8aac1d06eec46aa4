"""``pipeproof conform``: the reference server in another process passes, JUnit XML is written,
the server's own audit log passes trace-check, and a bad invocation exits 2 (docs/conformance.md)."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pipeproof.cli import main
from pipeproof.conformance.kit import Target, run_kit
from pipeproof.conformance.properties import PROPERTIES
from pipeproof.conformance.serve import ServedServer
from pipeproof.conformance.timing import SMALL
from pipeproof.conformance.wire import Tokens


@pytest.mark.slow
def test_conform_serve_passes_against_the_reference_in_another_process(tmp_path: Path) -> None:
    junit, audit = tmp_path / "conform.xml", tmp_path / "audit.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeproof.cli", "conform", "--serve", "--examples", "6", "--steps", "6",
         "--junit", str(junit), "--keep-audit", str(audit)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok: every observation was a behaviour the model allows" in proc.stdout
    assert "trace-check" in proc.stdout and ": ok (" in proc.stdout
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0"
    assert {c.get("name") for c in suite.iter("testcase")} == set(PROPERTIES)
    assert audit.stat().st_size > 0


def test_tokens_given_on_the_command_line_drive_the_connection_rules() -> None:
    with ServedServer(SMALL) as server:
        tokens = Tokens(None, given={f"u{k}": Tokens(server.secret).good(f"u{k}") for k in range(3)})
        result = run_kit(Target(server.url, tokens, SMALL, runs=False), examples=4, steps=4)
    assert result.ok, result.violation and result.violation.render()
    assert result.checks.get("auth_errors_specific", 0) > 0


def test_bad_invocations_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conform"]) == 2
    assert main(["conform", "http://example.invalid", "--secret", "x"]) == 2
    assert "not a WebSocket URL" in capsys.readouterr().err
    assert main(["conform", "ws://127.0.0.1:9", "--secret", "x", "--examples", "1"]) == 2
    assert "cannot open a WebSocket" in capsys.readouterr().err


@pytest.mark.slow
def test_cancel_expiry_and_monotonic_state_are_exercised_and_pass() -> None:
    """The default run exercises cancel-before-start (a run queued behind a long one), context expiry
    (a fresh user idle past context_ttl gets a new context and epoch) and monotonic event state."""
    with ServedServer(SMALL) as server:
        result = run_kit(Target(server.url, Tokens(server.secret), SMALL), examples=20, steps=8)
    assert result.ok, result.violation and result.violation.render()
    for prop in ("cancel_before_start_wins", "expired_context_never_reused", "monotonic_event_state"):
        assert result.checks.get(prop, 0) > 0, (prop, result.checks)
