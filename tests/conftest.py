"""Fixtures every test folder shares."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    """The store a server test runs on; a test parametrizes it with ``pg.BACKENDS`` to add PostgreSQL."""
    return str(request.param)
