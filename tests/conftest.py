"""Fixtures every test folder shares."""

from __future__ import annotations

import time
from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    """The store a server test runs on; a test parametrizes it with ``pg.BACKENDS`` to add PostgreSQL."""
    return str(request.param)


# The slow target: everything that starts servers or processes (tests/impl, tests/conformance) and
# the deeper model runs marked slow by hand. `pytest -m "not slow"` is the fast target (the model,
# the protocol, the sans-I/O cores, the drawings): seconds, no sockets. scripts/test.sh runs both.
_SLOW_FOLDERS = ("impl", "conformance")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.parts
        if "tests" in parts and parts[parts.index("tests") + 1] in _SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_STARTED] = time.time()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    # The fuzz suite's figures (frames, close codes, RSS before and after) and schemathesis's
    # counts belong in CI's output, not only in .artifacts/.
    for name in ("fuzz-summary.json", "schemathesis-summary.txt"):
        summary = Path(".artifacts") / name
        if summary.exists() and summary.stat().st_mtime >= config.stash.get(_STARTED, 0.0):
            terminalreporter.write_sep("-", name)
            terminalreporter.write_line(summary.read_text().strip())


_STARTED = pytest.StashKey[float]()
