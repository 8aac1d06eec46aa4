"""Fixtures every test folder shares."""

from __future__ import annotations

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
