"""Tests for pipeproof.impl.store.errors: every store failure reaches the caller as the StoreError
subclass that says how it failed, naming the operation, never the password or the SQL."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from pg import PG_URL, needs_pg
from sqlalchemy import text
from store_harness import T0, T_WALL, Opener, contexts_for, new_context

from pipeproof.errors import (
    StoreAuthFailed,
    StoreError,
    StoreIntegrityError,
    StorePoolExhausted,
    StoreRollbackFailed,
    StoreTimeout,
    StoreUnavailable,
)
from pipeproof.impl.store import Store, open_store


def _unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_sqlite_lock_held_past_the_timeout_is_store_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = await open_store(f"sqlite+aiosqlite:///{path}", timeout=0.3)
    try:
        cid = await new_context(store)
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN EXCLUSIVE")
            started = time.monotonic()
            with pytest.raises(StoreTimeout) as err:
                await store.append_event(cid, "r", "agent_started", {}, T0)
            waited = time.monotonic() - started
            assert err.value.operation == "append_event"
            assert err.value.code == "store_timeout"
            assert "locked" in str(err.value)
            assert waited >= 0.25  # it waited for busy_timeout rather than failing at once
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        # Once the lock is gone, the same store works again.
        assert (await store.append_event(cid, "r", "agent_started", {}, T0)).seq == 1
    finally:
        await store.close()


async def test_unopenable_sqlite_file_is_store_unavailable(tmp_path: Path) -> None:
    directory = tmp_path / "is-a-directory.db"
    directory.mkdir()
    with pytest.raises(StoreUnavailable) as err:
        await open_store(f"sqlite+aiosqlite:///{directory}", timeout=0.5)
    assert err.value.operation == "migrate"
    # aiosqlite stops the worker thread of a failed connect without awaiting it; give it a moment so
    # it does not report to an event loop pytest has already closed.
    await asyncio.sleep(0.1)


async def test_pool_exhaustion_is_typed(opener: Opener) -> None:
    store = await opener(pool_size=1, timeout=0.3)
    async with store._engine.connect() as held:
        await held.execute(text("SELECT 1"))
        with pytest.raises(StorePoolExhausted) as err:
            await store.ping()
    assert err.value.operation == "ping"
    assert await store.ping() >= 0.0


async def test_postgres_connection_refused_is_unavailable_and_hides_the_password() -> None:
    port = _unused_port()
    url = f"postgresql+asyncpg://postgres:Sup3r-S3cret-PW@127.0.0.1:{port}/test"
    with pytest.raises(StoreUnavailable) as err:
        await open_store(url, timeout=2.0)
    assert err.value.operation == "migrate"
    assert "Sup3r-S3cret-PW" not in str(err.value)
    assert "Sup3r-S3cret-PW" not in repr(err.value.args)


@needs_pg
@pytest.mark.postgres
async def test_postgres_unknown_role_is_auth_failed() -> None:
    # The server trusts loopback, so a wrong password cannot be provoked; a role that does not exist
    # is refused with SQLSTATE 28000 (invalid_authorization_specification) all the same.
    assert PG_URL is not None
    from sqlalchemy.engine import make_url

    url = make_url(PG_URL).set(username=f"nobody_{uuid.uuid4().hex[:8]}", password="Wr0ng-Passw0rd")
    with pytest.raises(StoreAuthFailed) as err:
        await open_store(url.render_as_string(hide_password=False), timeout=3.0)
    assert err.value.operation == "migrate"
    assert "Wr0ng-Passw0rd" not in str(err.value)
    assert "does not exist" in str(err.value)


@needs_pg
@pytest.mark.postgres
async def test_postgres_missing_database_is_unavailable() -> None:
    # Documented choice: SQLSTATE 3D000 (no such database) is StoreUnavailable, not an auth failure.
    assert PG_URL is not None
    from sqlalchemy.engine import make_url

    url = make_url(PG_URL).set(database=f"nodb_{uuid.uuid4().hex[:8]}", password="Wr0ng-Passw0rd")
    with pytest.raises(StoreUnavailable) as err:
        await open_store(url.render_as_string(hide_password=False), timeout=3.0)
    assert "Wr0ng-Passw0rd" not in str(err.value)


async def test_postgres_row_lock_past_lock_timeout_is_store_timeout(opener: Opener) -> None:
    store = await opener(timeout=0.5)
    if store.dialect != "postgresql":
        pytest.skip("row locks and lock_timeout are PostgreSQL's; SQLite's lock test is above")
    cid = await new_context(store)
    async with store._engine.connect() as blocker:
        await blocker.execute(text("SELECT 1 FROM contexts WHERE id = :id FOR UPDATE"), {"id": cid})
        with pytest.raises(StoreTimeout) as err:
            await store.append_event(cid, "r", "agent_started", {}, T0)
        await blocker.rollback()
    assert err.value.operation == "append_event"


def test_every_store_error_names_its_code() -> None:
    for cls, code in [
        (StoreTimeout, "store_timeout"),
        (StoreUnavailable, "store_unavailable"),
        (StoreAuthFailed, "store_auth_failed"),
        (StorePoolExhausted, "store_pool_exhausted"),
        (StoreIntegrityError, "store_integrity_error"),
        (StoreRollbackFailed, "store_rollback_failed"),
    ]:
        err = cls("op", "detail")
        assert isinstance(err, StoreError)
        assert str(err) == f"{code} during op: detail"


async def test_a_database_error_in_a_batch_statement_is_typed(store: Store) -> None:
    (cid,) = await contexts_for(store, 1)
    await store.append_event(cid, "r", "agent_thinking", {}, T_WALL)
    # Corrupt the counter so the next append collides with seq 1 (the primary key refuses it).
    async with store._engine.begin() as conn:
        await conn.execute(text("UPDATE contexts SET next_seq = 1 WHERE id = :id"), {"id": cid})
    with pytest.raises(StoreIntegrityError) as err:
        await store.append_event(cid, "r", "agent_thinking", {}, T_WALL)
    assert err.value.operation == "append_event"
    assert "INSERT" not in err.value.detail  # the driver's message, never the SQL
