"""Fixtures of the store tests: stores on one fresh database per test, SQLite (always) and
PostgreSQL (PIPEPROOF_TEST_POSTGRES_URL).

Concurrency tests open several Store instances (each with its own engine and pool) on one
database, which is what several server processes do: the guarantees must come from the database.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pg import BACKENDS, PG_URL, drop_schema
from store_harness import Opener

from pipeproof.impl.store import Store, open_store


@pytest.fixture(params=BACKENDS)
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens Store instances on one fresh database (SQLite file, or a unique PostgreSQL schema)."""
    opened: list[Store] = []
    schema: str | None = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'nested' / 'pipeproof.db'}"
        base: dict[str, Any] = {}
    else:
        assert PG_URL is not None
        url = PG_URL
        schema = f"pp_test_{uuid.uuid4().hex[:12]}"
        base = {"pg_schema": schema}

    async def open_(**overrides: Any) -> Store:
        kwargs: dict[str, Any] = {"pool_size": 5, "timeout": 5.0, **base, **overrides}
        store = await open_store(url, **kwargs)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()
    if schema is not None:
        await drop_schema(schema)


@pytest.fixture
async def store(opener: Opener) -> Store:
    """One store (pool of 5, 5 s timeout) on the test's fresh database."""
    return await opener()
