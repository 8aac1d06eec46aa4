"""Tests for conformance/pytest_plugin.py: the kit inside another project's pytest suite
(docs/conformance.md, "In a pytest suite"). An outer test starts the reference server (and a
broken one) and runs an inner pytest in a subprocess, as a user's CI would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from broken import DEFECTS, start_server
from server_harness import SECRET

from pipeproof.conformance.properties import PROPERTIES
from pipeproof.conformance.timing import SMALL

pytestmark = pytest.mark.slow

USER_SUITE = '''
def test_the_users_own_test():
    assert 1 + 1 == 2


def test_conformance_through_the_fixture(pipeproof_conformance):
    result = pipeproof_conformance.check(examples=3, steps=4)
    assert result.examples >= 1 and result.checks
'''


def declared() -> list[str]:
    """What the test server (tests/conformance/broken.py: the small profile, context_ttl 600 s)
    declares."""
    out = []
    for name, value in SMALL.with_(context_ttl=600.0).server_env().items():
        out += ["--pipeproof-declare", f"{name.removeprefix('PIPEPROOF_').lower()}={value}"]
    return out


def inner_pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    suite = tmp_path / "suite"
    suite.mkdir(exist_ok=True)
    (suite / "test_users_suite.py").write_text(USER_SUITE)
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(suite), "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:randomly",
         "--rootdir", str(suite), *args],
        capture_output=True, text=True, timeout=240, cwd=suite,
    )


def test_a_suite_gets_one_test_per_property_and_the_fixture(tmp_path: Path) -> None:
    server = start_server(tmp_path, {}, SMALL)
    try:
        run = inner_pytest(tmp_path, "--pipeproof-url", f"ws://127.0.0.1:{server.port}", "--pipeproof-secret",
                           SECRET, "--pipeproof-examples", "6", "--pipeproof-steps", "6", *declared())
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    passed = int(run.stdout.rsplit(" passed", 1)[0].split()[-1])
    skipped = run.stdout.count("SKIPPED")
    assert passed + skipped == len(PROPERTIES) + 2  # the user's two tests and one per property
    assert passed >= 2 + len(PROPERTIES) // 2


def test_a_broken_server_fails_the_property_it_breaks_with_its_trace(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    server = start_server(tmp_path, DEFECTS["race_1011"](monkeypatch), SMALL)
    try:
        run = inner_pytest(tmp_path, "--pipeproof-url", f"ws://127.0.0.1:{server.port}", "--pipeproof-secret",
                           SECRET, "--pipeproof-examples", "20", "--pipeproof-steps", "6", *declared(),
                           "-k", "pipeproof")
    finally:
        server.stop()
    assert run.returncode == 1, run.stdout + run.stderr
    assert "pipeproof[no_1011] (PROTOCOL section 1)" in run.stdout, run.stdout  # the failing test's header
    assert "1 failed" in run.stdout and "no_1011: socket" in run.stdout and "client actions (shrunk)" in run.stdout


def test_without_a_url_the_fixture_skips_and_no_property_tests_appear(tmp_path: Path) -> None:
    run = inner_pytest(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 1 skipped" in run.stdout and "no --pipeproof-url given" in run.stdout
    bad = inner_pytest(tmp_path, "--pipeproof-url", "ws://127.0.0.1:9", "--pipeproof-declare", "ack_timeout")
    assert bad.returncode != 0 and "expected NAME=VALUE" in bad.stderr + bad.stdout
