"""Tests for pipeproof.impl.store.hotsql: the hot statements are rendered once per shape, handed to
the driver without building SQLAlchemy constructs, name only the protocol's delivery states, and
use the index a cumulative ack needs (PROTOCOL section 5)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy.sql.elements import BindParameter
from store_harness import T_WALL, contexts_for

from pipeproof.errors import StoreUnavailable
from pipeproof.impl.store import Store, hotsql, schema
from pipeproof.protocol import LIVE_STATES, DeliveryState


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


async def test_hot_statements_are_rendered_once_per_shape(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    cids = await contexts_for(store, 5)
    renders: list[tuple[str, int]] = []
    real_render = hotsql.BatchStatement.render

    def counting_render(self: hotsql.BatchStatement, dialect: str, rows: int) -> str:
        renders.append((self.name, rows))
        return real_render(self, dialect, rows)

    monkeypatch.setattr(hotsql.BatchStatement, "render", counting_render)
    # No SQLAlchemy statement is built per call either: no bind parameter is ever constructed.
    binds: list[object] = []
    real_bind_init = BindParameter.__init__

    def counting_bind_init(self: BindParameter[Any], *args: Any, **kwargs: Any) -> None:
        binds.append(self)
        real_bind_init(self, *args, **kwargs)

    async def round_of_writes(offset: int) -> None:
        # The same shape each time: 5 contexts x 3 appends, then a mark_sent and an ack per context.
        records = await asyncio.gather(*(store.append_event(c, "r", "k", {}, T_WALL) for c in cids for _ in range(3)))
        await asyncio.gather(*(store.mark_sent(c, offset + 1, 1) for c in cids))
        await asyncio.gather(*(store.ack_through(c, offset + 3) for c in cids))
        assert len(records) == 15

    hotsql.SQL_CACHE.clear()
    await round_of_writes(0)
    cached = dict(hotsql.SQL_CACHE)
    assert {name for name, _rows in renders} == {"bump_seq", "insert_events", "mark_sent", "ack_through"}
    renders.clear()
    monkeypatch.setattr(BindParameter, "__init__", counting_bind_init)
    await round_of_writes(3)
    assert renders == []  # the second group of each shape rendered nothing
    assert binds == []
    assert cached == hotsql.SQL_CACHE
    # Every batch size from 1 to 256 fits a few shapes: the cache stays small.
    for size in range(1, 257):
        hotsql.batch(store.dialect, hotsql.ACK_THROUGH, [("c", 1, T_WALL)] * size)
    shapes = {key for key in hotsql.SQL_CACHE if key[:2] == (store.dialect, "ack_through")}
    assert len(shapes) == (9 if store.dialect == "sqlite" else 1)


def test_sqlite_ack_uses_the_live_state_index(tmp_path: Path) -> None:
    # A cumulative ack must not walk the stream's whole history: only the context's live events.
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    with engine.begin() as conn:
        schema.metadata.create_all(conn, tables=[schema.contexts, schema.events])
    engine.dispose()
    db = sqlite3.connect(tmp_path / "plan.db")
    try:
        for size in (1, 8):
            sql, params = hotsql.batch("sqlite", hotsql.ACK_THROUGH, [("c", 5, T_WALL)] * size)
            plan = " ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))
            assert "ix_events_context_state" in plan, plan
    finally:
        db.close()


# -- states named by the protocol's enum -------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_hot_statements_name_only_delivery_states(dialect: str) -> None:
    statements = [value for value in vars(hotsql).values() if isinstance(value, hotsql.BatchStatement)]
    assert {s.name for s in statements} == {
        "bump_seq", "insert_events", "mark_sent", "mark_pending", "escalate", "ack_through", "select_events",
        "held_runs",
    }
    states = {state.value for state in DeliveryState}
    for statement in statements:
        literals = re.findall(r"'([^']*)'", statement.render(dialect, 2))
        assert set(literals) <= states, (statement.name, literals)
    # The live states an update may leave are the protocol's, and only they.
    assert re.findall(r"'([^']*)'", hotsql.LIVE_SQL) == [s.value for s in DeliveryState if s in LIVE_STATES]
    assert "IN " + hotsql.LIVE_SQL in hotsql.ACK_THROUGH.render(dialect, 1)
