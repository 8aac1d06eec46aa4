"""PostgreSQL for the tests, in one place: the URL, the skip marker, the backend list and the
schema clean-up. PostgreSQL tests run when PIPEPROOF_TEST_POSTGRES_URL is set (scripts/test.sh sets
it when a server answers on 127.0.0.1:5432); otherwise they are skipped and say why."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
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


async def create_database(prefix: str) -> str:
    """A fresh PostgreSQL database on the test server; returns its URL (for server processes,
    which take a URL and cannot be pointed at a schema). Raises OSError (or the driver's error)
    when the server does not answer: callers skip on that."""
    assert PG_URL is not None
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = create_async_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await engine.dispose()
    return str(make_url(PG_URL).set(database=name).render_as_string(hide_password=False))


async def drop_database(url: str) -> None:
    """Drop a database :func:`create_database` made (its server processes may still be dying)."""
    assert PG_URL is not None
    name = make_url(url).database
    engine = create_async_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await engine.dispose()
