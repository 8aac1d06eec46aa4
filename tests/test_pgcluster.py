"""tests/pgcluster.py: a private PostgreSQL answers queries, keeps its data across restart(), and a
connection open during a restart fails while a new one afterwards succeeds."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from pgcluster import PgCluster
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

pytestmark = pytest.mark.slow  # starts a database server


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    # One cluster for the module: initdb costs about a second; each test leaves it running.
    with PgCluster() as c:
        yield c


async def test_a_query_works_and_restart_keeps_the_data(cluster: PgCluster) -> None:
    engine = create_async_engine(cluster.url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE kept (v int)"))
            await conn.execute(text("INSERT INTO kept VALUES (1), (2), (3)"))
        cluster.restart()
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT sum(v) FROM kept"))).scalar_one() == 6
        cluster.stop()
        assert not cluster.running
        cluster.start()
        assert cluster.running
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM kept"))).scalar_one() == 3
    finally:
        await engine.dispose()


async def test_a_connection_open_during_restart_fails_and_a_new_one_succeeds(cluster: PgCluster) -> None:
    engine = create_async_engine(cluster.url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
            cluster.restart()
            async with asyncio.timeout(10):  # turns a hang into a failure; the error comes at once
                with pytest.raises(sa_exc.DBAPIError) as err:
                    await conn.execute(text("SELECT 1"))
            assert err.value.connection_invalidated
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 2"))).scalar_one() == 2
    finally:
        await engine.dispose()


def test_missing_binaries_skip_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import pgcluster

    monkeypatch.setattr(pgcluster, "find_bin_dir", lambda: None)
    with pytest.raises(pytest.skip.Exception, match="initdb, pg_ctl"):
        PgCluster()
