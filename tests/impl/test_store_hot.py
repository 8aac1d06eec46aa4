"""The store's hot writes (PROTOCOL section 5): append (also ``sent=True``), mark_sent, ack_through,
mark_pending and escalate as merged batch statements, over SQLite (always) and PostgreSQL
(PIPEPROOF_TEST_POSTGRES_URL).

Writes issued in one loop turn (``asyncio.gather``) are queued before the writer task runs, so they
share one group; the tests that depend on that check it with a spy rather than assume it.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.sql.elements import BindParameter

from pipeproof.errors import StoreIntegrityError, StoreUnavailable
from pipeproof.impl import store as store_module
from pipeproof.impl.store import EventRecord, EventState, Store, open_store

PG_URL = os.environ.get("PIPEPROOF_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(not PG_URL, reason="set PIPEPROOF_TEST_POSTGRES_URL to run PostgreSQL tests")

BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=[pytest.mark.postgres, needs_pg]),
]

TTL = 3600.0
T0 = 1_700_000_000.0


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A store on a fresh database (SQLite file, or a unique PostgreSQL schema)."""
    schema: str | None = None
    if request.param == "sqlite":
        opened = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'hot.db'}", pool_size=5, timeout=5.0)
    else:
        assert PG_URL is not None
        schema = f"pp_test_{uuid.uuid4().hex[:12]}"
        opened = await open_store(PG_URL, pool_size=5, timeout=5.0, pg_schema=schema)
    yield opened
    await opened.close()
    if schema is not None:
        assert PG_URL is not None
        engine = create_async_engine(PG_URL)
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()


async def contexts_for(store: Store, count: int) -> list[str]:
    return [(await store.get_or_create_context(f"user-{i}", "acme", T0, TTL)).context_id for i in range(count)]


def spy_merge(store: Store, name: str) -> list[int]:
    """Replace the store's merge ``name`` (e.g. ``_append_many``) with a spy on the instance;
    returns the list that receives the number of items of each call."""
    sizes: list[int] = []
    real = getattr(store, name)

    async def spy(conn: Any, items: list[Any]) -> list[Any]:
        sizes.append(len(items))
        result: list[Any] = await real(conn, items)
        return result

    setattr(store, name, spy)
    return sizes


async def stored(store: Store, record: EventRecord) -> EventRecord:
    (read,) = await store.events_after(record.context_id, record.seq - 1, limit=1)
    return read


# -- append(sent=True) ---------------------------------------------------------------------------


async def test_append_sent_stores_sent_with_attempt_one(store: Store) -> None:
    (cid,) = await contexts_for(store, 1)
    record = await store.append_event(cid, "run-1", "agent_thinking", {"step": 1}, T0 + 1, sent=True)
    assert (record.seq, record.state, record.attempt, record.reason) == (1, EventState.SENT, 1, None)
    assert (record.created_at, record.updated_at) == (T0 + 1, T0 + 1)
    assert await stored(store, record) == record
    # The caller's send failed: mark_pending keeps attempt 1, so the resend is attempt 2.
    pending = await store.mark_pending(cid, 1, now=T0 + 2)
    assert (pending.state, pending.attempt, pending.updated_at) == (EventState.PENDING, 1, T0 + 2)
    stale = await store.mark_sent(cid, 1, attempt=1, now=T0 + 3)  # not below the stored attempt
    assert (stale.state, stale.attempt) == (EventState.SENT, 1)
    resent = await store.mark_sent(cid, 1, attempt=2, now=T0 + 4)
    assert (resent.state, resent.attempt, resent.updated_at) == (EventState.SENT, 2, T0 + 4)
    plain = await store.append_event(cid, "run-1", "agent_thinking", {"step": 2}, T0 + 5)
    assert (plain.seq, plain.state, plain.attempt) == (2, EventState.PENDING, 0)
    assert await store.ack_through(cid, 2) == [1, 2]


async def test_merged_appends_take_sent_per_item(store: Store) -> None:
    cids = await contexts_for(store, 3)
    sizes = spy_merge(store, "_append_many")
    records = await asyncio.gather(
        *(
            store.append_event(cids[i % 3], "run", "agent_thinking", {"i": i}, T0 + i, sent=i % 2 == 0)
            for i in range(12)
        )
    )
    assert sizes == [12]  # one group, one merged append
    for i, record in enumerate(records):
        expected = (EventState.SENT, 1) if i % 2 == 0 else (EventState.PENDING, 0)
        assert (record.state, record.attempt, dict(record.data)) == (*expected, {"i": i})
        assert await stored(store, record) == record
    # SENT-at-append events are acked like any other, and only once.
    assert await store.ack_through(cids[0], 4) == [1, 2, 3, 4]
    assert await store.ack_through(cids[0], 4) == []


# -- seq allocation in groups ------------------------------------------------------------------------


async def test_a_group_of_many_and_repeated_contexts_gets_consecutive_seqs_in_queue_order(
    store: Store,
) -> None:
    cids = await contexts_for(store, 7)
    await store.append_event(cids[0], "run", "agent_started", {}, T0)  # cids[0] continues at 2
    rng = random.Random(7)
    order = [rng.choice(cids) for _ in range(120)]  # some contexts many times, in a jumbled order
    sizes = spy_merge(store, "_append_many")
    records = await asyncio.gather(
        *(store.append_event(c, "run", "agent_thinking", {"i": i}, T0 + i) for i, c in enumerate(order))
    )
    assert sizes == [120]
    for cid in cids:
        first = 2 if cid == cids[0] else 1
        in_queue_order = [r.seq for r in records if r.context_id == cid]
        assert in_queue_order == list(range(first, first + order.count(cid)))
        info = await store.find_context(cid)
        assert info is not None and info.last_seq == first - 1 + order.count(cid)
        assert info.last_used_at == max(T0 + i for i, c in enumerate(order) if c == cid)
    for record in records:
        assert await stored(store, record) == record


async def test_exact_timestamps_survive_every_hot_write(store: Store) -> None:
    # Binary floats as they come from time.time(): stored and returned exactly, never rounded
    # through a decimal text form.
    rng = random.Random(11)
    stamps = [T0 + rng.random() * 1e6 for _ in range(5)]
    (cid,) = await contexts_for(store, 1)
    appended = await asyncio.gather(*(store.append_event(cid, "r", "k", {}, stamps[0]) for _ in range(3)))
    assert {r.created_at for r in appended} == {stamps[0]}
    sent = await store.mark_sent(cid, 1, 1, now=stamps[1])
    pending = await store.mark_pending(cid, 1, now=stamps[2])
    escalated = await store.escalate(cid, 2, "max_attempts", now=stamps[3])
    await store.ack_through(cid, 3, now=stamps[4])
    assert (sent.updated_at, pending.updated_at, escalated.updated_at) == tuple(stamps[1:4])
    final = {e.seq: e.updated_at for e in await store.events_after(cid, 0)}
    assert final == {1: stamps[4], 2: stamps[3], 3: stamps[4]}


# -- merged transitions ------------------------------------------------------------------------------


async def test_repeated_transitions_of_one_event_in_a_group_apply_as_in_queue_order(store: Store) -> None:
    (cid,) = await contexts_for(store, 1)
    for _ in range(3):
        await store.append_event(cid, "r", "agent_thinking", {}, T0)
    sent_sizes = spy_merge(store, "_mark_sent_many")
    # Attempts 3 then 2 for seq 1: the stale 2 changes nothing. 2 then 2 for seq 2: the later stamp.
    sent = await asyncio.gather(
        store.mark_sent(cid, 1, 3, now=T0 + 1),
        store.mark_sent(cid, 1, 2, now=T0 + 2),
        store.mark_sent(cid, 2, 2, now=T0 + 3),
        store.mark_sent(cid, 2, 2, now=T0 + 4),
    )
    assert sent_sizes == [4]
    assert [(e.seq, e.attempt, e.updated_at) for e in sent] == [
        (1, 3, T0 + 1),
        (1, 3, T0 + 1),
        (2, 2, T0 + 4),
        (2, 2, T0 + 4),
    ]
    escalate_sizes = spy_merge(store, "_escalate_many")
    escalated = await asyncio.gather(
        store.escalate(cid, 1, "send_failed", now=T0 + 5), store.escalate(cid, 1, "max_attempts", now=T0 + 6)
    )
    assert escalate_sizes == [2]
    assert {(e.state, e.reason, e.updated_at) for e in escalated} == {(EventState.ESCALATED, "send_failed", T0 + 5)}
    pending_sizes = spy_merge(store, "_mark_pending_many")
    pending = await asyncio.gather(
        store.mark_pending(cid, 2, now=T0 + 7),
        store.mark_pending(cid, 2, now=T0 + 8),
        store.mark_pending(cid, 1, now=T0 + 9),  # ESCALATED: unchanged
        store.mark_pending(cid, 3, now=T0 + 9),  # PENDING already: unchanged
    )
    assert pending_sizes == [4]
    assert [(e.state, e.attempt, e.updated_at) for e in pending] == [
        (EventState.PENDING, 2, T0 + 7),
        (EventState.PENDING, 2, T0 + 7),
        (EventState.ESCALATED, 3, T0 + 5),
        (EventState.PENDING, 0, T0),
    ]


async def test_mixed_group_with_refused_writes_falls_back_and_the_rest_succeed(store: Store) -> None:
    a, b = await contexts_for(store, 2)
    for cid in (a, b):
        for _ in range(3):
            await store.append_event(cid, "r", "agent_thinking", {}, T0)
    together: list[int] = []
    alone: list[str] = []
    real_together, real_alone = store._commit_together, store._commit_alone

    async def spy_together(live: list[Any], held: Any) -> None:
        together.append(len(live))
        await real_together(live, held)

    async def spy_alone(w: Any, held: Any) -> None:
        alone.append(w.operation)
        await real_alone(w, held)

    store._commit_together = spy_together  # type: ignore[method-assign]
    store._commit_alone = spy_alone  # type: ignore[method-assign]
    results = await asyncio.gather(
        store.append_event(a, "r", "agent_thinking", {"n": 1}, T0 + 1),
        store.append_event("no-such-context", "r", "agent_thinking", {}, T0 + 1),
        store.mark_sent(a, 1, 1, now=T0 + 2),
        store.append_event(b, "r", "agent_thinking", {"n": 2}, T0 + 1, sent=True),
        store.mark_pending(b, 99, now=T0 + 3),
        store.ack_through(b, 2, now=T0 + 4),
        store.escalate(a, 2, "no_session", now=T0 + 5),
        store.ack_through("no-such-context", 5),  # acks nothing: not a refusal
        store.append_event(a, "r", "agent_thinking", {"n": 3}, T0 + 1),
        return_exceptions=True,
    )
    # One group, refused, rolled back; every write then committed in its own transaction.
    assert together == [len(results)]
    assert len(alone) == len(results)
    appended_a1, unknown_ctx, sent, appended_b, unknown_event, acked, escalated, no_ack, appended_a2 = results
    assert isinstance(unknown_ctx, StoreIntegrityError) and unknown_ctx.operation == "append_event"
    assert isinstance(unknown_event, StoreIntegrityError) and unknown_event.operation == "mark_pending"
    assert isinstance(appended_a1, EventRecord) and isinstance(appended_a2, EventRecord)
    assert (appended_a1.seq, appended_a2.seq) == (4, 5)  # in queue order, no gap from the refusal
    assert isinstance(appended_b, EventRecord)
    assert (appended_b.seq, appended_b.state, appended_b.attempt) == (4, EventState.SENT, 1)
    assert isinstance(sent, EventRecord) and (sent.state, sent.attempt) == (EventState.SENT, 1)
    assert acked == [1, 2]
    assert isinstance(escalated, EventRecord) and (escalated.state, escalated.reason) == (
        EventState.ESCALATED,
        "no_session",
    )
    assert no_ack == []
    states_a = [(e.seq, e.state) for e in await store.events_after(a, 0)]
    assert states_a == [
        (1, EventState.SENT),
        (2, EventState.ESCALATED),
        (3, EventState.PENDING),
        (4, EventState.PENDING),
        (5, EventState.PENDING),
    ]
    states_b = [(e.seq, e.state) for e in await store.events_after(b, 0)]
    assert states_b == [(1, EventState.ACKED), (2, EventState.ACKED), (3, EventState.PENDING), (4, EventState.SENT)]


async def test_a_database_error_in_a_batch_statement_is_typed(store: Store) -> None:
    (cid,) = await contexts_for(store, 1)
    await store.append_event(cid, "r", "agent_thinking", {}, T0)
    # Corrupt the counter so the next append collides with seq 1 (the primary key refuses it).
    async with store._engine.begin() as conn:
        await conn.execute(text("UPDATE contexts SET next_seq = 1 WHERE id = :id"), {"id": cid})
    with pytest.raises(StoreIntegrityError) as err:
        await store.append_event(cid, "r", "agent_thinking", {}, T0)
    assert err.value.operation == "append_event"
    assert "INSERT" not in err.value.detail  # the driver's message, never the SQL


async def test_sqlite_closed_driver_connection_is_store_unavailable(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    if store.dialect != "sqlite":
        pytest.skip("aiosqlite's own failure mode")
    (cid,) = await contexts_for(store, 1)

    async def closed(self: aiosqlite.Connection, sql: str, parameters: Any = None) -> Any:
        raise ValueError("Connection closed")

    monkeypatch.setattr(aiosqlite.Connection, "execute_fetchall", closed)
    with pytest.raises(StoreUnavailable) as err:
        await store.ack_through(cid, 1)
    assert err.value.operation == "ack_through"


# -- statements built once ---------------------------------------------------------------------------


async def test_hot_statements_are_rendered_once_per_shape(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    cids = await contexts_for(store, 5)
    renders: list[tuple[str, int]] = []
    real_render = store_module._BatchStatement.render

    def counting_render(self: store_module._BatchStatement, dialect: str, rows: int) -> str:
        renders.append((self.name, rows))
        return real_render(self, dialect, rows)

    monkeypatch.setattr(store_module._BatchStatement, "render", counting_render)
    # No SQLAlchemy statement is built per call either: no bind parameter is ever constructed.
    binds: list[object] = []
    real_bind_init = BindParameter.__init__

    def counting_bind_init(self: BindParameter[Any], *args: Any, **kwargs: Any) -> None:
        binds.append(self)
        real_bind_init(self, *args, **kwargs)

    async def round_of_writes(offset: int) -> None:
        # The same shape each time: 5 contexts x 3 appends, then a mark_sent and an ack per context.
        records = await asyncio.gather(*(store.append_event(c, "r", "k", {}, T0) for c in cids for _ in range(3)))
        await asyncio.gather(*(store.mark_sent(c, offset + 1, 1) for c in cids))
        await asyncio.gather(*(store.ack_through(c, offset + 3) for c in cids))
        assert len(records) == 15

    store_module._SQL_CACHE.clear()
    await round_of_writes(0)
    cached = dict(store_module._SQL_CACHE)
    assert {name for name, _rows in renders} == {"bump_seq", "insert_events", "mark_sent", "ack_through"}
    renders.clear()
    monkeypatch.setattr(BindParameter, "__init__", counting_bind_init)
    await round_of_writes(3)
    assert renders == []  # the second group of each shape rendered nothing
    assert binds == []
    assert cached == store_module._SQL_CACHE
    # Every batch size from 1 to 256 fits a few shapes: the cache stays small.
    for size in range(1, 257):
        store_module._batch(store.dialect, store_module._ACK_THROUGH, [("c", 1, T0)] * size)
    shapes = {key for key in store_module._SQL_CACHE if key[:2] == (store.dialect, "ack_through")}
    assert len(shapes) == (9 if store.dialect == "sqlite" else 1)


# -- query plans -------------------------------------------------------------------------------------


def test_sqlite_ack_uses_the_live_state_index(tmp_path: Path) -> None:
    # A cumulative ack must not walk the stream's whole history: only the context's live events.
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    with engine.begin() as conn:
        store_module.metadata.create_all(conn, tables=[store_module.contexts, store_module.events])
    engine.dispose()
    db = sqlite3.connect(tmp_path / "plan.db")
    try:
        for size in (1, 8):
            sql, params = store_module._batch("sqlite", store_module._ACK_THROUGH, [("c", 5, T0)] * size)
            plan = " ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))
            assert "ix_events_context_state" in plan, plan
    finally:
        db.close()


async def test_old_sqlite_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module.sqlite3, "sqlite_version_info", (3, 34, 1))
    with pytest.raises(ValueError, match=r"3\.35"):
        await open_store(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
