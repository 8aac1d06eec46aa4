"""Tests for pipeproof.impl.store over SQLite (always) and PostgreSQL (PIPEPROOF_TEST_POSTGRES_URL).

Concurrency tests open several Store instances (each with its own engine and pool) on one database,
which is what several server processes do: the guarantees must come from the database.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncTransaction, create_async_engine

from pipeproof.errors import (
    StoreAuthFailed,
    StoreError,
    StoreIntegrityError,
    StorePoolExhausted,
    StoreRollbackFailed,
    StoreTimeout,
    StoreUnavailable,
)
from pipeproof.impl.store import (
    EXPECTED_SCHEMA_VERSION,
    EventState,
    Store,
    open_store,
)

PG_URL = os.environ.get("PIPEPROOF_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(not PG_URL, reason="set PIPEPROOF_TEST_POSTGRES_URL to run PostgreSQL tests")

BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=[pytest.mark.postgres, needs_pg]),
]

TTL = 60.0
T0 = 1_000.0

Opener = Callable[..., Awaitable[Store]]


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
        assert PG_URL is not None
        engine = create_async_engine(PG_URL)
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()


@pytest.fixture
async def store(opener: Opener) -> Store:
    return await opener()


async def new_context(store: Store, user: str = "alice", now: float = T0) -> str:
    return (await store.get_or_create_context(user, "acme", now, TTL)).context_id


# -- schema --------------------------------------------------------------------------------------


async def test_migrations_are_applied_once(opener: Opener) -> None:
    store = await opener()
    assert await store.schema_version() == EXPECTED_SCHEMA_VERSION
    assert await store.migrate() == []
    again = await opener()
    assert await again.schema_version() == EXPECTED_SCHEMA_VERSION


async def test_concurrent_migrators_apply_each_step_exactly_once(opener: Opener) -> None:
    stores = [await opener(migrate=False) for _ in range(5)]
    assert await stores[0].schema_version() == 0
    results = await asyncio.gather(*(s.migrate() for s in stores))
    assert sorted(results, key=len) == [[], [], [], [], list(range(1, EXPECTED_SCHEMA_VERSION + 1))]
    assert await stores[0].schema_version() == EXPECTED_SCHEMA_VERSION


async def test_sqlite_file_and_directory_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "pp.db"
    store = await open_store(f"sqlite+aiosqlite:///{path}", timeout=2.0)
    try:
        assert path.exists()
        await store.check_writable()
        async with store._engine.connect() as conn:
            mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar()
            busy = (await conn.execute(text("PRAGMA busy_timeout"))).scalar()
            fks = (await conn.execute(text("PRAGMA foreign_keys"))).scalar()
        assert (mode, busy, fks) == ("wal", 2000, 1)
    finally:
        await store.close()


async def test_readiness_probes(store: Store) -> None:
    assert await store.ping() >= 0.0
    await store.check_writable(now=T0)
    await store.check_writable(now=T0 + 1)  # the probe row is upserted, not duplicated


# -- contexts (section 3) ------------------------------------------------------------------------


async def test_fifty_concurrent_inits_yield_one_context(opener: Opener) -> None:
    # Ten stores = ten independent pools: separate connections, as from separate processes.
    stores = [await opener(pool_size=5) for _ in range(10)]
    results = await asyncio.gather(
        *(stores[i % 10].get_or_create_context("alice", "acme", T0 + i * 0.001, TTL) for i in range(50))
    )
    assert len({r.context_id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert {r.epoch for r in results} == {1}
    async with stores[0]._engine.connect() as conn:
        rows = (await conn.execute(text("SELECT count(*) FROM contexts WHERE user_id = 'alice'"))).scalar()
    assert rows == 1


async def test_users_get_distinct_contexts(store: Store) -> None:
    a = await store.get_or_create_context("alice", "acme", T0, TTL)
    b = await store.get_or_create_context("bob", "acme", T0, TTL)
    assert a.context_id != b.context_id
    assert (a.created, b.created) == (True, True)
    assert (await store.get_or_create_context("alice", "acme", T0 + 1, TTL)).created is False


async def test_one_live_context_per_user_is_a_database_constraint(store: Store) -> None:
    await new_context(store)
    with pytest.raises(sa_exc.IntegrityError):
        async with store._engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO contexts (id, user_id, account_id, epoch, created_at, last_used_at, "
                    "expired, next_seq) VALUES ('rogue', 'alice', 'acme', 99, 0, 0, :f, 1)"
                ),
                {"f": False},
            )


async def test_idle_context_expires_and_the_next_init_gets_epoch_plus_one(store: Store) -> None:
    first = await store.get_or_create_context("alice", "acme", T0, TTL)
    assert (first.epoch, first.created) == (1, True)
    # Activity within the TTL keeps it (idle exactly TTL is still live).
    same = await store.get_or_create_context("alice", "acme", T0 + TTL, TTL)
    assert same.context_id == first.context_id and not same.created
    # Idle past the TTL: a new context with a new epoch; the old one is never handed out again.
    later = T0 + 2 * TTL + 0.5
    second = await store.get_or_create_context("alice", "acme", later, TTL)
    assert second.context_id != first.context_id
    assert (second.epoch, second.created) == (2, True)
    old = await store.find_context(first.context_id)
    assert old is not None and old.expired and old.expired_at == later
    third = await store.get_or_create_context("alice", "acme", later + 1, TTL)
    assert third.context_id == second.context_id
    assert await store.touch_context(first.context_id, later + 2) is False


async def test_concurrent_inits_after_expiry_create_exactly_one_successor(opener: Opener) -> None:
    stores = [await opener(pool_size=4) for _ in range(5)]
    first = await stores[0].get_or_create_context("alice", "acme", T0, TTL)
    late = T0 + TTL + 10
    results = await asyncio.gather(
        *(stores[i % 5].get_or_create_context("alice", "acme", late, TTL) for i in range(20))
    )
    ids = {r.context_id for r in results}
    assert len(ids) == 1 and first.context_id not in ids
    assert {r.epoch for r in results} == {2}
    assert sum(r.created for r in results) == 1


async def test_touch_context_keeps_it_alive_and_can_expire_it(store: Store) -> None:
    cid = await new_context(store)
    assert await store.touch_context(cid, T0 + TTL - 1, ttl=TTL) is True
    # The touch moved last_used_at, so a later init within TTL of the touch reuses the context.
    again = await store.get_or_create_context("alice", "acme", T0 + 2 * TTL - 2, TTL)
    assert again.context_id == cid
    assert await store.touch_context(cid, T0 + 10 * TTL, ttl=TTL) is False
    info = await store.find_context(cid)
    assert info is not None and info.expired
    with pytest.raises(StoreIntegrityError) as err:
        await store.touch_context("no-such-context", T0)
    assert err.value.operation == "touch_context"


async def test_expire_idle_contexts_sweeps_only_idle_ones(store: Store) -> None:
    idle = await new_context(store, "alice", T0)
    busy = await new_context(store, "bob", T0 + TTL)
    assert await store.expire_idle_contexts(T0 + TTL + 1, TTL) == [idle]
    assert (await store.get_or_create_context("bob", "acme", T0 + TTL + 2, TTL)).context_id == busy
    fresh = await store.get_or_create_context("alice", "acme", T0 + TTL + 2, TTL)
    assert fresh.context_id != idle and fresh.epoch == 2


# -- events (section 5) --------------------------------------------------------------------------


async def test_twenty_concurrent_appends_get_seqs_without_gaps_or_duplicates(opener: Opener) -> None:
    stores = [await opener(pool_size=5) for _ in range(4)]
    cid = await new_context(stores[0])
    records = await asyncio.gather(
        *(stores[i % 4].append_event(cid, "run-1", "agent_thinking", {"i": i}, T0 + i) for i in range(20))
    )
    assert sorted(r.seq for r in records) == list(range(1, 21))
    assert len({r.event_id for r in records}) == 20
    stream = await stores[1].events_after(cid, 0, limit=100)
    assert [e.seq for e in stream] == list(range(1, 21))
    assert all(e.state is EventState.PENDING and e.attempt == 0 for e in stream)
    info = await stores[2].find_context(cid)
    assert info is not None and info.last_seq == 20


async def test_seqs_are_per_context(store: Store) -> None:
    a = await new_context(store, "alice")
    b = await new_context(store, "bob")
    assert (await store.append_event(a, "r", "agent_started", {}, T0)).seq == 1
    assert (await store.append_event(b, "r", "agent_started", {}, T0)).seq == 1
    assert (await store.append_event(a, "r", "agent_thinking", {}, T0)).seq == 2


async def test_event_record_round_trips_its_payload(store: Store) -> None:
    cid = await new_context(store)
    data = {"tool_call_id": "t1", "ok": False, "nested": {"n": [1, 2.5, None]}, "text": "héllo"}
    rec = await store.append_event(cid, "run-9", "tool_completed", data, T0 + 3)
    assert (rec.context_id, rec.seq, rec.run_id, rec.kind) == (cid, 1, "run-9", "tool_completed")
    assert dict(rec.data) == data
    assert (rec.created_at, rec.updated_at, rec.reason) == (T0 + 3, T0 + 3, None)
    (read,) = await store.events_after(cid, 0)
    assert read == rec
    with pytest.raises(TypeError):
        await store.append_event(cid, "r", "agent_thinking", {"bad": object()}, T0)
    assert len(await store.events_after(cid, 0)) == 1  # the failed append left no trace


async def test_appending_touches_the_context(store: Store) -> None:
    cid = await new_context(store)
    await store.append_event(cid, "r", "agent_thinking", {}, T0 + TTL - 1)
    assert (await store.get_or_create_context("alice", "acme", T0 + 2 * TTL - 2, TTL)).context_id == cid


async def test_ack_is_cumulative_and_monotonic(store: Store) -> None:
    cid = await new_context(store)
    for i in range(6):
        await store.append_event(cid, "r", "agent_thinking", {"i": i}, T0)
    for seq in (1, 2, 3):
        await store.mark_sent(cid, seq, attempt=1)
    # Cumulative: acks SENT and never-sent PENDING events alike, up to and including seq.
    assert await store.ack_through(cid, 2) == [1, 2]
    escalated = await store.escalate(cid, 4, "max_attempts")
    assert escalated.state is EventState.ESCALATED and escalated.reason == "max_attempts"
    # A later cumulative ack skips the escalated one: it never un-escalates.
    assert await store.ack_through(cid, 5) == [3, 5]
    # An older ack moves nothing backwards and acks nothing twice.
    assert await store.ack_through(cid, 1) == []
    assert await store.ack_through(cid, 5) == []
    states = {e.seq: e.state for e in await store.events_after(cid, 0)}
    assert states == {
        1: EventState.ACKED,
        2: EventState.ACKED,
        3: EventState.ACKED,
        4: EventState.ESCALATED,
        5: EventState.ACKED,
        6: EventState.PENDING,
    }
    # Acking beyond the stream acks what exists, nothing more.
    assert await store.ack_through(cid, 1000) == [6]


async def test_terminal_events_do_not_move(store: Store) -> None:
    cid = await new_context(store)
    for _ in range(2):
        await store.append_event(cid, "r", "agent_thinking", {}, T0)
    await store.ack_through(cid, 1)
    await store.escalate(cid, 2, "no_session")
    # ACKED stays ACKED whatever is attempted.
    assert (await store.mark_sent(cid, 1, attempt=2)).state is EventState.ACKED
    assert (await store.escalate(cid, 1, "max_attempts")).state is EventState.ACKED
    assert (await store.mark_pending(cid, 1)).state is EventState.ACKED
    # ESCALATED keeps its first reason and is not resent or acked.
    assert (await store.mark_sent(cid, 2, attempt=3)).state is EventState.ESCALATED
    again = await store.escalate(cid, 2, "send_failed")
    assert (again.state, again.reason) == (EventState.ESCALATED, "no_session")
    assert await store.ack_through(cid, 2) == []


async def test_attempts_never_decrease_and_resends_alternate_sent_and_pending(store: Store) -> None:
    cid = await new_context(store)
    await store.append_event(cid, "r", "agent_thinking", {}, T0)
    sent = await store.mark_sent(cid, 1, attempt=1, now=T0 + 1)
    assert (sent.state, sent.attempt, sent.updated_at) == (EventState.SENT, 1, T0 + 1)
    assert (await store.mark_pending(cid, 1)).state is EventState.PENDING
    assert (await store.mark_sent(cid, 1, attempt=3)).attempt == 3
    stale = await store.mark_sent(cid, 1, attempt=2)  # a racing sender with an older attempt
    assert (stale.state, stale.attempt) == (EventState.SENT, 3)
    with pytest.raises(ValueError):
        await store.mark_sent(cid, 1, attempt=0)
    with pytest.raises(ValueError):
        await store.escalate(cid, 1, "bored")  # type: ignore[arg-type]


async def test_unacked_after_and_escalations(store: Store) -> None:
    cid = await new_context(store)
    for _ in range(5):
        await store.append_event(cid, "r", "agent_thinking", {}, T0)
    await store.mark_sent(cid, 2, attempt=1)
    await store.ack_through(cid, 1)
    await store.escalate(cid, 4, "send_failed")
    assert [e.seq for e in await store.unacked_after(cid, 0)] == [2, 3, 5]
    assert [e.seq for e in await store.unacked_after(cid, 2)] == [3, 5]
    assert [e.seq for e in await store.unacked_after(cid, 0, include_escalated=True)] == [2, 3, 4, 5]
    assert [(e.seq, e.reason) for e in await store.escalations(cid)] == [(4, "send_failed")]
    assert [e.seq for e in await store.events_after(cid, 1, limit=2)] == [2, 3]
    other = await new_context(store, "bob")
    assert await store.escalations(other) == []
    assert await store.events_after(other, 0) == []


async def test_references_to_missing_rows_are_integrity_errors(store: Store) -> None:
    cid = await new_context(store)
    with pytest.raises(StoreIntegrityError) as err:
        await store.append_event("no-such-context", "r", "agent_started", {}, T0)
    assert err.value.operation == "append_event"
    with pytest.raises(StoreIntegrityError):
        await store.mark_sent(cid, 99, attempt=1)
    with pytest.raises(StoreIntegrityError):
        await store.escalate(cid, 99, "max_attempts")
    with pytest.raises(StoreIntegrityError):
        await store.set_run_state("no-such-run", "RUNNING")
    with pytest.raises(StoreIntegrityError):  # foreign key: runs.context_id -> contexts.id
        await store.create_run("no-such-context", "req-1", "alice", T0)


# -- runs (section 4) ----------------------------------------------------------------------------


async def test_create_run_is_idempotent_on_request_id(opener: Opener) -> None:
    stores = [await opener(pool_size=3) for _ in range(3)]
    cid = await new_context(stores[0])
    results = await asyncio.gather(
        *(stores[i % 3].create_run(cid, "req-1", "alice", T0 + i) for i in range(12))
    )
    assert len({run.run_id for run, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    run, created = await stores[0].create_run(cid, "req-2", "alice", T0, run_id="run-b", state="REQUESTED")
    assert (run.run_id, run.state, run.request_id, created) == ("run-b", "REQUESTED", "req-2", True)
    # The same run_id for another request is a genuine integrity violation.
    with pytest.raises(StoreIntegrityError):
        await stores[0].create_run(cid, "req-3", "alice", T0, run_id="run-b")
    # The same request_id in another context is another run.
    other = await new_context(stores[0], "bob")
    assert (await stores[0].create_run(other, "req-1", "bob", T0))[1] is True


async def test_set_run_state_compare_and_set(store: Store) -> None:
    cid = await new_context(store)
    run, _ = await store.create_run(cid, "req", "alice", T0)
    assert run.state == "ACCEPTED"
    moved = await store.set_run_state(run.run_id, "RUNNING", T0 + 1, from_states={"ACCEPTED"})
    assert (moved.state, moved.updated_at) == ("RUNNING", T0 + 1)
    done = await store.set_run_state(run.run_id, "COMPLETED", T0 + 2, from_states={"RUNNING"})
    assert done.state == "COMPLETED"
    refused = await store.set_run_state(run.run_id, "FAILED", T0 + 3, from_states={"RUNNING"})
    assert (refused.state, refused.updated_at) == ("COMPLETED", T0 + 2)
    assert await store.find_run(run.run_id) == refused
    assert await store.find_run("nope") is None


# -- typed errors --------------------------------------------------------------------------------


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


async def test_failed_rollback_is_store_rollback_failed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_rollback(self: AsyncTransaction) -> None:
        raise sa_exc.OperationalError("ROLLBACK", {}, Exception("disk I/O error"))

    monkeypatch.setattr(AsyncTransaction, "rollback", broken_rollback)
    with pytest.raises(StoreRollbackFailed) as err:
        await store.append_event("no-such-context", "r", "agent_started", {}, T0)
    assert err.value.operation == "append_event"
    assert "disk I/O error" in err.value.detail
    assert "no context 'no-such-context'" in err.value.detail  # the failure that needed the rollback
    assert isinstance(err.value.__cause__, sa_exc.OperationalError)


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


def test_event_states_match_the_model() -> None:
    delivery = pytest.importorskip("pipeproof.model.delivery")
    assert {s.value for s in EventState} == {s.value for s in delivery.Delivery}


async def test_unsupported_urls_are_refused() -> None:
    with pytest.raises(ValueError):
        await open_store("mysql+aiomysql://u:p@h/db")
    with pytest.raises(ValueError):
        await open_store("sqlite+aiosqlite:///:memory:")


# -- group commit --------------------------------------------------------------------------------


async def test_group_commit_merges_concurrent_writes_and_each_caller_gets_its_own_result(
    store: Store,
) -> None:
    # Writes issued in one loop turn share a transaction (merged by kind); every caller still gets
    # exactly what a write of its own would have returned.
    a, b = await new_context(store, "alice"), await new_context(store, "bob")
    appended = await asyncio.gather(
        *(store.append_event(c, "r", "agent_thinking", {"i": i}, T0 + i) for i in range(5) for c in (a, b))
    )
    assert sorted((e.context_id, e.seq) for e in appended) == sorted(
        (c, s) for c in (a, b) for s in range(1, 6)
    )
    for record in appended:
        (stored,) = [e for e in await store.events_after(record.context_id, record.seq - 1, 1)]
        assert stored == record  # the merged insert returns what a read gives back
    sent = await asyncio.gather(*(store.mark_sent(c, s, 1) for c in (a, b) for s in (1, 2, 3)))
    assert [(e.state, e.attempt) for e in sent] == [(EventState.SENT, 1)] * 6
    # Two acks of one context in one group: as if applied one after the other, in seq order.
    acks = await asyncio.gather(store.ack_through(a, 4), store.ack_through(a, 2), store.ack_through(b, 1))
    assert list(acks) == [[3, 4], [1, 2], [1]]
    assert [e.seq for e in await store.unacked_after(a, 0)] == [5]
    assert [e.seq for e in await store.unacked_after(b, 0)] == [2, 3, 4, 5]


async def test_a_refused_write_fails_alone_and_the_rest_of_its_group_commits(store: Store) -> None:
    a = await new_context(store, "alice")
    results = await asyncio.gather(
        store.append_event(a, "r", "agent_thinking", {}, T0),
        store.append_event("no-such-context", "r", "agent_thinking", {}, T0),
        store.mark_sent(a, 99, 1),
        store.append_event(a, "r", "agent_thinking", {}, T0),
        return_exceptions=True,
    )
    assert isinstance(results[1], StoreIntegrityError) and results[1].operation == "append_event"
    assert isinstance(results[2], StoreIntegrityError) and results[2].operation == "mark_sent"
    assert sorted(r.seq for r in results if not isinstance(r, BaseException)) == [1, 2]
    assert [e.seq for e in await store.events_after(a, 0)] == [1, 2]


async def test_writes_after_close_are_refused_and_queued_ones_commit_first(opener: Opener) -> None:
    store = await opener()
    a = await new_context(store, "alice")
    pending = [asyncio.ensure_future(store.append_event(a, "r", "agent_thinking", {}, T0)) for _ in range(3)]
    await asyncio.sleep(0)
    await store.close()
    assert sorted(r.seq for r in await asyncio.gather(*pending)) == [1, 2, 3]
    with pytest.raises(StoreUnavailable):
        await store.append_event(a, "r", "agent_thinking", {}, T0)
