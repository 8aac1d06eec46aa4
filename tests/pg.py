"""PostgreSQL for the tests, in one place: the URL, the skip marker, the backend list and the
schema clean-up. PostgreSQL tests run when PIPEPROOF_TEST_POSTGRES_URL is set (scripts/test.sh sets
it when a server answers on 127.0.0.1:5432); otherwise they are skipped and say why."""

from __future__ import annotations

import asyncio
import os

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

PG_URL = os.environ.get("PIPEPROOF_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(not PG_URL, reason="set PIPEPROOF_TEST_POSTGRES_URL to run PostgreSQL tests")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, needs_pg])]


async def drop_schema(schema: str) -> None:
    """Drop a test's PostgreSQL schema and everything in it."""
    assert PG_URL is not None
    engine = create_async_engine(PG_URL)
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await engine.dispose()


def drop_schema_now(schema: str) -> None:
    """:func:`drop_schema` from synchronous code (fixture teardown outside an event loop)."""
    asyncio.run(drop_schema(schema))
