"""The hot statements (PROTOCOL section 5): the SQL of append, mark_sent, ack, mark_pending and escalate
(and of the run-lease fence every fenced append reads, section 6).

These run for every event, several times, so they are plain SQL strings rendered once per shape
and handed to the driver as they are (``exec_driver_sql``; on SQLite straight to aiosqlite, see
:func:`execute_batch`): no SQLAlchemy construct per call, no compilation, no cache key, no bind
processing (under load, building ``update(...)``/``case(...)`` per group was ~20% of the server's
CPU). Each statement works on a *batch* (the rows of one merged group, or one row for a write run
alone) joined to the table as the FROM item ``b``, so a group of any size is one statement:

* PostgreSQL: ``unnest($1::text[], $2::int4[], ...) AS b(...)``, one array per column. One shape
  whatever the batch size, so one prepared statement per connection (asyncpg caches it).
* SQLite: ``WITH b(...) AS (VALUES (?, ?), ...)``. SQLite has no array binds; ``json_each`` over
  a JSON document would give one shape too, but SQLite before 3.43 does not promise correctly
  rounded JSON/text-to-REAL conversion, and timestamps must be stored exactly as given (the
  returned records say what is stored). Bound REALs are exact, so the batch is a VALUES list,
  padded with NULL rows to the next power of two: at most 9 shapes per statement (1..256 rows,
  :data:`~.writer.MAX_GROUP`), each rendered once here and prepared once per connection (the
  sqlite3 module's statement cache holds 128). A NULL row matches no key and is filtered from the
  insert.

Every UPDATE ... FROM joins on a key the batch holds at most once (the merges fold repeats
first): with two batch rows for one target row, both databases apply an arbitrary one.

The delivery states in the statements' text are rendered from :class:`~pipeproof.protocol.DeliveryState`
(:func:`~.schema.sql_literal`, :func:`~.schema.sql_in_list`), as the schema's CHECK constraint is.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import sqlalchemy.exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from pipeproof.protocol import LIVE_STATES, DeliveryState

from .records import EventRecord
from .schema import sql_in_list, sql_literal

EVENT_COLUMNS: Final = (
    "context_id",
    "seq",
    "event_id",
    "run_id",
    "kind",
    "data",
    "state",
    "attempt",
    "reason",
    "created_at",
    "updated_at",
)
RETURN_EVENT: Final = ", ".join(f"events.{name}" for name in EVENT_COLUMNS)
LIVE_SQL: Final = sql_in_list(LIVE_STATES)
"""``('PENDING', 'SENT')``: the states an update may leave (ACKED and ESCALATED are terminal)."""
_PENDING, _SENT = sql_literal(DeliveryState.PENDING), sql_literal(DeliveryState.SENT)
_ACKED, _ESCALATED = sql_literal(DeliveryState.ACKED), sql_literal(DeliveryState.ESCALATED)


def event_from_values(row: Sequence[Any]) -> EventRecord:
    """An event from a row of ``EVENT_COLUMNS``, in order (positional: cheaper than by name)."""
    return EventRecord(
        context_id=str(row[0]),
        seq=int(row[1]),
        event_id=str(row[2]),
        run_id=str(row[3]),
        kind=str(row[4]),
        data=MappingProxyType(json.loads(row[5])),
        state=DeliveryState(row[6]),
        attempt=int(row[7]),
        reason=None if row[8] is None else str(row[8]),
        created_at=float(row[9]),
        updated_at=float(row[10]),
    )


DIALECT_WORDS: Final[Mapping[str, Mapping[str, str]]] = {
    # ``unindexed``: SQLite's unary ``+`` keeps its planner from using an index for the term it
    # prefixes; PostgreSQL's statistics-driven planner needs no hint.
    # ``share_runs``: lock the runs rows read against a concurrent UPDATE until COMMIT; SQLite
    # has one writer at a time, so a read in a write transaction is already that.
    "sqlite": {"greatest": "max", "unindexed": "+", "share_runs": ""},
    "postgresql": {"greatest": "GREATEST", "unindexed": "", "share_runs": " FOR SHARE OF runs"},
}


@dataclass(frozen=True)
class BatchStatement:
    """One hot statement over a batch ``b`` with ``columns`` (name, PostgreSQL array type).

    ``template`` names the batch FROM item ``{batch}`` and may use the words of
    ``DIALECT_WORDS``, which differ between the two databases.
    """

    name: str
    columns: tuple[tuple[str, str], ...]
    template: str

    def render(self, dialect: str, rows: int) -> str:
        names = ", ".join(name for name, _ in self.columns)
        if dialect == "postgresql":
            arrays = ", ".join(f"${i}::{pg_type}[]" for i, (_, pg_type) in enumerate(self.columns, 1))
            return self.template.format(batch=f"unnest({arrays}) AS b({names})", **DIALECT_WORDS[dialect])
        row = "(" + ", ".join("?" for _ in self.columns) + ")"
        values = ", ".join(row for _ in range(rows))
        return f"WITH b({names}) AS (VALUES {values}) " + self.template.format(batch="b", **DIALECT_WORDS[dialect])


BUMP_SEQ: Final = BatchStatement(
    "bump_seq",
    (("id", "text"), ("n", "int4"), ("t", "float8")),
    # Allocates n seqs per context (next_seq is the first unallocated one) and touches it.
    "UPDATE contexts SET next_seq = contexts.next_seq + b.n, "
    "last_used_at = {greatest}(contexts.last_used_at, b.t) "
    "FROM {batch} WHERE contexts.id = b.id RETURNING contexts.id, contexts.next_seq",
)
INSERT_EVENTS: Final = BatchStatement(
    "insert_events",
    (
        ("context_id", "text"),
        ("seq", "int4"),
        ("event_id", "text"),
        ("run_id", "text"),
        ("kind", "text"),
        ("data", "text"),
        ("state", "text"),
        ("attempt", "int4"),
        ("t", "float8"),
    ),
    "INSERT INTO events (context_id, seq, event_id, run_id, kind, data, state, attempt, reason, "
    "created_at, updated_at) "
    "SELECT b.context_id, b.seq, b.event_id, b.run_id, b.kind, b.data, b.state, b.attempt, NULL, b.t, b.t "
    "FROM {batch} WHERE b.context_id IS NOT NULL",
)
MARK_SENT: Final = BatchStatement(
    "mark_sent",
    (("context_id", "text"), ("seq", "int4"), ("attempt", "int4"), ("t", "float8")),
    f"UPDATE events SET state = {_SENT}, attempt = b.attempt, updated_at = b.t FROM {{batch}} "
    "WHERE events.context_id = b.context_id AND events.seq = b.seq "
    f"AND events.state IN {LIVE_SQL} AND events.attempt <= b.attempt "
    f"RETURNING {RETURN_EVENT}",
)
MARK_PENDING: Final = BatchStatement(
    "mark_pending",
    (("context_id", "text"), ("seq", "int4"), ("t", "float8")),
    f"UPDATE events SET state = {_PENDING}, updated_at = b.t FROM {{batch}} "
    f"WHERE events.context_id = b.context_id AND events.seq = b.seq AND events.state = {_SENT} "
    f"RETURNING {RETURN_EVENT}",
)
ESCALATE: Final = BatchStatement(
    "escalate",
    (("context_id", "text"), ("seq", "int4"), ("reason", "text"), ("t", "float8")),
    f"UPDATE events SET state = {_ESCALATED}, reason = b.reason, updated_at = b.t FROM {{batch}} "
    f"WHERE events.context_id = b.context_id AND events.seq = b.seq AND events.state IN {LIVE_SQL} "
    f"RETURNING {RETURN_EVENT}",
)
ACK_THROUGH: Final = BatchStatement(
    "ack_through",
    (("context_id", "text"), ("through", "int4"), ("t", "float8")),
    # SQLite: ``+events.seq`` so the lookup goes through ix_events_context_state (the few live
    # events of the context) rather than a primary-key range over every event up to ``through``,
    # which grows with the stream's history. PostgreSQL picks that index from its statistics.
    f"UPDATE events SET state = {_ACKED}, updated_at = b.t FROM {{batch}} "
    "WHERE events.context_id = b.context_id AND {unindexed}events.seq <= b.through "
    f"AND events.state IN {LIVE_SQL} "
    "RETURNING events.context_id, events.seq",
)
SELECT_EVENTS: Final = BatchStatement(
    "select_events",
    (("context_id", "text"), ("seq", "int4")),
    f"SELECT {RETURN_EVENT} FROM {{batch}} "
    "JOIN events ON events.context_id = b.context_id AND events.seq = b.seq",
)

HELD_RUNS: Final = BatchStatement(
    "held_runs",
    (("run_id", "text"), ("owner", "text")),
    # The fence of a node's appends (section 6): which of these runs each node still holds. A row
    # read here cannot be taken over (claimed) by another node before this transaction commits.
    "SELECT runs.run_id, runs.owner_node FROM {batch} "
    "JOIN runs ON runs.run_id = b.run_id AND runs.owner_node = b.owner{share_runs}",
)

SQL_CACHE: dict[tuple[str, str, int], str] = {}
"""Rendered hot SQL by (dialect, statement, padded batch size; 0 on PostgreSQL). Bounded: 8
statements x (9 SQLite sizes + 1 PostgreSQL shape)."""


def padded(rows: int) -> int:
    """The SQLite batch size for ``rows`` rows: the next power of two (1, 2, 4, ... 256)."""
    return 1 << (rows - 1).bit_length()


def batch(dialect: str, statement: BatchStatement, rows: Sequence[tuple[Any, ...]]) -> tuple[str, tuple[Any, ...]]:
    """``statement``'s SQL and driver parameters for ``rows`` (one tuple per batch row)."""
    if dialect == "postgresql":
        key = (dialect, statement.name, 0)
        params: tuple[Any, ...] = tuple(list(column) for column in zip(*rows, strict=True))
    else:
        size = padded(len(rows))
        key = (dialect, statement.name, size)
        flat = [value for row in rows for value in row]
        flat.extend([None] * ((size - len(rows)) * len(statement.columns)))
        params = tuple(flat)
    sql = SQL_CACHE.get(key)
    if sql is None:
        sql = SQL_CACHE[key] = statement.render(dialect, key[2])
    return sql, params


SQLITE_MIN_VERSION: Final = (3, 35, 0)
"""RETURNING arrived in SQLite 3.35, UPDATE ... FROM in 3.33 (checked by :func:`~.engine.open_store`)."""


async def execute_batch(
    conn: AsyncConnection, dialect: str, statement: BatchStatement, rows: Sequence[tuple[Any, ...]]
) -> list[Any]:
    """Run ``statement`` over ``rows``; returns its result rows (empty without RETURNING)."""
    sql, params = batch(dialect, statement, rows)
    if dialect == "sqlite":
        # Straight to aiosqlite: one hop to its thread (execute and fetch together), where
        # SQLAlchemy's adapted cursor takes three or four (create, execute, fetch, close).
        # Errors are wrapped as SQLAlchemy would, so they are typed the same way.
        driver: Any = (await conn.get_raw_connection()).driver_connection  # aiosqlite.Connection
        try:
            return list(await driver.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise sa_exc.DBAPIError.instance(sql, params, exc, sqlite3.Error) from exc
        except ValueError as exc:
            # aiosqlite's "Connection closed": SQLAlchemy's adapter makes it an
            # OperationalError (StoreUnavailable); anything else is a bug and raises as is.
            if str(exc).lower() not in ("connection closed", "no active connection"):
                raise
            closed = sqlite3.OperationalError(str(exc))
            raise sa_exc.DBAPIError.instance(sql, params, closed, sqlite3.Error) from exc
    result = await conn.exec_driver_sql(sql, params)
    return list(result.all()) if result.returns_rows else []
