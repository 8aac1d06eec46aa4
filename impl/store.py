"""The durable store: contexts, the per-context event stream, runs (PROTOCOL sections 3, 4 and 5).

One async interface, :class:`Store`, over SQLAlchemy 2 async Core, with the same statements for
``sqlite+aiosqlite`` (the embedded default) and ``postgresql+asyncpg`` (several nodes sharing one
store); the per-event writes are plain SQL built once per shape (see "Hot statements"), with the
same semantics on both. The guarantees the protocol needs are made by the database, never by an in-process lock:

* one live context per user: a partial UNIQUE index on ``contexts(user_id) WHERE NOT expired``
  plus ``INSERT ... ON CONFLICT DO NOTHING`` (section 3);
* gap-free per-context ``seq``: ``contexts.next_seq`` is bumped with ``UPDATE ... RETURNING`` in the
  same transaction as the event insert, so the row lock (PostgreSQL) or the write lock (SQLite,
  ``BEGIN IMMEDIATE``) serialises allocation (section 5);
* events move only forward: every state change is a conditional ``UPDATE`` whose ``WHERE`` admits
  only the allowed source states (PENDING/SENT -> SENT/PENDING/ACKED/ESCALATED; ACKED and
  ESCALATED are terminal) (section 5).

Every failure is a :class:`~pipeproof.errors.StoreError` subclass naming the operation; messages
never contain the DSN's password. Lookups that may legitimately find nothing are named ``find_*``
and return ``None`` for "absent"; every other operation raises instead of returning ``None``.
Referring to a context, event or run that does not exist raises :class:`StoreIntegrityError` (it is
a dangling reference, exactly what a foreign key would refuse).

Timestamps are float seconds supplied by the caller (``now``), as in the clock-free model.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Generic, Literal, TypeVar, get_args

import sqlalchemy.exc as sa_exc
from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Row,
    Table,
    Text,
    UniqueConstraint,
    event,
    false,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from pipeproof.errors import (
    StoreAuthFailed,
    StoreError,
    StoreIntegrityError,
    StorePoolExhausted,
    StoreRollbackFailed,
    StoreTimeout,
    StoreUnavailable,
)

T = TypeVar("T")

# --------------------------------------------------------------------------------------------------
# Records


class EventState(enum.Enum):
    """Delivery state of one event (PROTOCOL section 5). Same names as ``model.delivery.Delivery``."""

    PENDING = "PENDING"
    SENT = "SENT"
    ACKED = "ACKED"
    ESCALATED = "ESCALATED"


LIVE_STATES: Final = (EventState.PENDING.value, EventState.SENT.value)
"""Non-terminal states: the only ones any update may leave."""

EscalationReason = Literal["max_attempts", "no_session", "send_failed"]
ESCALATION_REASONS: Final[tuple[str, ...]] = get_args(EscalationReason)

SqliteSynchronous = Literal["NORMAL", "FULL"]


@dataclass(frozen=True)
class ContextRecord:
    """Result of :meth:`Store.get_or_create_context`: the user's one live context (section 3)."""

    context_id: str
    epoch: int
    created: bool
    user_id: str
    account_id: str


@dataclass(frozen=True)
class ContextInfo:
    """A stored context row. ``last_seq`` is the highest seq allocated so far (0 if none)."""

    context_id: str
    user_id: str
    account_id: str
    epoch: int
    created_at: float
    last_used_at: float
    expired: bool
    expired_at: float | None
    last_seq: int


@dataclass(frozen=True)
class EventRecord:
    """One event of a context's stream (section 5). ``data`` is a read-only view of the payload."""

    context_id: str
    seq: int
    event_id: str
    run_id: str
    kind: str
    data: Mapping[str, Any]
    state: EventState
    attempt: int
    reason: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class RunRecord:
    """One run (section 4); ``request_id`` is unique per context, which makes ``run.start`` idempotent."""

    run_id: str
    context_id: str
    request_id: str
    user_id: str
    state: str
    created_at: float
    updated_at: float


# --------------------------------------------------------------------------------------------------
# Schema

metadata = MetaData()

schema_version_table = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text, nullable=False),
    Column("applied_at", Float, nullable=False),
)

contexts = Table(
    "contexts",
    metadata,
    Column("id", Text, primary_key=True),
    Column("user_id", Text, nullable=False),
    Column("account_id", Text, nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float, nullable=False),
    Column("expired", Boolean, nullable=False, server_default=false()),
    Column("expired_at", Float, nullable=True),
    Column("next_seq", Integer, nullable=False, server_default=text("1")),
    UniqueConstraint("user_id", "epoch", name="uq_contexts_user_epoch"),
    CheckConstraint("next_seq >= 1", name="ck_contexts_next_seq"),
)
# The section-3 guarantee, enforced by the database: at most one non-expired context per user.
# ``NOT expired`` reads the same in SQLite (0/1) and PostgreSQL (boolean).
Index(
    "ux_contexts_one_live_per_user",
    contexts.c.user_id,
    unique=True,
    sqlite_where=text("NOT expired"),
    postgresql_where=text("NOT expired"),
)

_STATE_CHECK = "state IN ('PENDING', 'SENT', 'ACKED', 'ESCALATED')"
_REASON_CHECK = "reason IS NULL OR reason IN ('max_attempts', 'no_session', 'send_failed')"

events = Table(
    "events",
    metadata,
    Column("context_id", Text, ForeignKey("contexts.id"), nullable=False),
    Column("seq", Integer, nullable=False, autoincrement=False),
    Column("event_id", Text, nullable=False, unique=True),
    Column("run_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("data", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    Column("reason", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    PrimaryKeyConstraint("context_id", "seq", name="pk_events"),
    CheckConstraint(_STATE_CHECK, name="ck_events_state"),
    CheckConstraint(_REASON_CHECK, name="ck_events_reason"),
    CheckConstraint("seq >= 1 AND attempt >= 0", name="ck_events_seq_attempt"),
)
Index("ix_events_context_state", events.c.context_id, events.c.state)

runs = Table(
    "runs",
    metadata,
    Column("run_id", Text, primary_key=True),
    Column("context_id", Text, ForeignKey("contexts.id"), nullable=False),
    Column("request_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("context_id", "request_id", name="uq_runs_context_request"),
)

store_probe = Table(
    "store_probe",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("checked_at", Float, nullable=False),
)


@dataclass(frozen=True)
class Migration:
    """One schema step. ``apply`` runs inside the migration transaction (DDL is transactional in both
    backends), so a failed step leaves the version unchanged."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _migration_1(conn: Connection) -> None:
    # Version 1 is the initial schema. Later versions must be explicit ALTER/CREATE steps appended
    # below (and the Table objects above updated to match), never edits to this one.
    metadata.create_all(conn, tables=[contexts, events, runs, store_probe], checkfirst=False)


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "contexts, events, runs, store_probe", _migration_1),
)
EXPECTED_SCHEMA_VERSION: Final = MIGRATIONS[-1].version

_MIGRATION_LOCK_KEY: Final = 0x70697065_70726F6F  # "pipeproo": one advisory lock for all migrators
_MAX_CONTEXT_RACE_RETRIES: Final = 8

# --------------------------------------------------------------------------------------------------
# Error mapping

# SQLSTATE classes (PostgreSQL appendix A) that say how a failure should be typed.
_PG_AUTH_STATES: Final = frozenset({"28000", "28P01"})
_PG_TIMEOUT_STATES: Final = frozenset({"57014", "55P03", "40P01"})
_PG_UNAVAILABLE_STATES: Final = frozenset({"3D000", "57P01", "57P02", "57P03", "53300"})


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its explicit causes (SQLAlchemy wrapper -> adapter error -> driver error).

    ``__context__`` is not followed: it holds whatever was being handled when ``exc`` arose (an
    earlier, unrelated failure during a rollback, say), which would mis-type ``exc``.
    """
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        orig = getattr(current, "orig", None)
        current = current.__cause__ or (orig if isinstance(orig, BaseException) else None)
    return seen


def _classify(exc: BaseException) -> type[StoreError] | None:
    """Which StoreError ``exc`` is, or None when it is not a store failure (a bug: let it raise)."""
    if isinstance(exc, StoreError):
        return type(exc)
    # SQLAlchemy's pool timeout is its own class, not the builtin TimeoutError.
    if isinstance(exc, sa_exc.TimeoutError):
        return StorePoolExhausted
    if isinstance(exc, sa_exc.IntegrityError):
        return StoreIntegrityError
    for link in _chain(exc):
        sqlstate = getattr(link, "sqlstate", None)
        if isinstance(sqlstate, str):
            if sqlstate in _PG_AUTH_STATES:
                return StoreAuthFailed
            if sqlstate.startswith("23"):
                return StoreIntegrityError
            if sqlstate in _PG_TIMEOUT_STATES:
                return StoreTimeout
            if sqlstate in _PG_UNAVAILABLE_STATES or sqlstate.startswith("08"):
                return StoreUnavailable
    for link in _chain(exc):
        if isinstance(link, TimeoutError):  # connect timeout; checked before OSError, its base
            return StoreTimeout
        if isinstance(link, OSError):  # refused, unreachable, reset, rejected SSL upgrade
            return StoreUnavailable
        message = str(link).lower()
        if "database is locked" in message or "database is busy" in message:
            return StoreTimeout
        if "unable to open database file" in message or "readonly database" in message:
            return StoreUnavailable
        if "disk i/o error" in message or "database or disk is full" in message:
            return StoreUnavailable
        if type(link).__module__.startswith("asyncpg") and "connection" in type(link).__name__.lower():
            return StoreUnavailable
    if isinstance(exc, sa_exc.DisconnectionError):
        return StoreUnavailable
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return StoreUnavailable
    if isinstance(exc, sa_exc.DBAPIError):
        return StoreError
    return None


def _describe(exc: BaseException, secret: str | None) -> str:
    """A one-line detail: the innermost driver message, never the password, never the SQL."""
    innermost = _chain(exc)[-1]
    message = str(innermost).splitlines()[0] if str(innermost) else ""
    detail = f"{type(innermost).__name__}: {message}" if message else type(innermost).__name__
    if secret:
        detail = detail.replace(secret, "***")
    return detail[:300]


# --------------------------------------------------------------------------------------------------
# The store


def encode_event_data(data: Mapping[str, Any]) -> str:
    """An event's data as the store keeps it (compact JSON, sorted keys); raises TypeError or
    ValueError for data JSON cannot hold."""
    return json.dumps(dict(data), separators=(",", ":"), sort_keys=True)



def _event_from_row(row: Row[Any]) -> EventRecord:
    payload = json.loads(row.data)
    return EventRecord(
        context_id=str(row.context_id),
        seq=int(row.seq),
        event_id=str(row.event_id),
        run_id=str(row.run_id),
        kind=str(row.kind),
        data=MappingProxyType(payload),
        state=EventState(row.state),
        attempt=int(row.attempt),
        reason=None if row.reason is None else str(row.reason),
        created_at=float(row.created_at),
        updated_at=float(row.updated_at),
    )


def _run_from_row(row: Row[Any]) -> RunRecord:
    return RunRecord(
        run_id=str(row.run_id),
        context_id=str(row.context_id),
        request_id=str(row.request_id),
        user_id=str(row.user_id),
        state=str(row.state),
        created_at=float(row.created_at),
        updated_at=float(row.updated_at),
    )


def _context_from_row(row: Row[Any]) -> ContextInfo:
    return ContextInfo(
        context_id=str(row.id),
        user_id=str(row.user_id),
        account_id=str(row.account_id),
        epoch=int(row.epoch),
        created_at=float(row.created_at),
        last_used_at=float(row.last_used_at),
        expired=bool(row.expired),
        expired_at=None if row.expired_at is None else float(row.expired_at),
        last_seq=int(row.next_seq) - 1,
    )


def _now(now: float | None) -> float:
    return time.time() if now is None else now


# --------------------------------------------------------------------------------------------------
# Hot statements (section 5): the SQL of append, mark_sent, ack, mark_pending and escalate
#
# These run for every event, several times, so they are plain SQL strings rendered once per shape
# and handed to the driver as they are (``exec_driver_sql``; on SQLite straight to aiosqlite, see
# ``Store._execute_batch``): no SQLAlchemy construct per call, no compilation, no cache key, no bind
# processing (under load, building ``update(...)``/``case(...)`` per group was ~20% of the server's
# CPU). Each statement works on a *batch* (the rows of one merged group, or one row for a write run
# alone) joined to the table as the FROM item ``b``, so a group of any size is one statement:
#
# * PostgreSQL: ``unnest($1::text[], $2::int4[], ...) AS b(...)``, one array per column. One shape
#   whatever the batch size, so one prepared statement per connection (asyncpg caches it).
# * SQLite: ``WITH b(...) AS (VALUES (?, ?), ...)``. SQLite has no array binds; ``json_each`` over
#   a JSON document would give one shape too, but SQLite before 3.43 does not promise correctly
#   rounded JSON/text-to-REAL conversion, and timestamps must be stored exactly as given (the
#   returned records say what is stored). Bound REALs are exact, so the batch is a VALUES list,
#   padded with NULL rows to the next power of two: at most 9 shapes per statement (1..256 rows,
#   _MAX_GROUP), each rendered once here and prepared once per connection (the sqlite3 module's
#   statement cache holds 128). A NULL row matches no key and is filtered from the insert.
#
# Every UPDATE ... FROM joins on a key the batch holds at most once (the merges fold repeats
# first): with two batch rows for one target row, both databases apply an arbitrary one.

_EVENT_COLUMNS: Final = (
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
_RETURN_EVENT: Final = ", ".join(f"events.{name}" for name in _EVENT_COLUMNS)
_LIVE_SQL: Final = "('PENDING', 'SENT')"  # LIVE_STATES, as SQL


def _event_from_values(row: Sequence[Any]) -> EventRecord:
    """An event from a row of ``_EVENT_COLUMNS``, in order (positional: cheaper than by name)."""
    return EventRecord(
        context_id=str(row[0]),
        seq=int(row[1]),
        event_id=str(row[2]),
        run_id=str(row[3]),
        kind=str(row[4]),
        data=MappingProxyType(json.loads(row[5])),
        state=EventState(row[6]),
        attempt=int(row[7]),
        reason=None if row[8] is None else str(row[8]),
        created_at=float(row[9]),
        updated_at=float(row[10]),
    )


_DIALECT_WORDS: Final[Mapping[str, Mapping[str, str]]] = {
    # ``unindexed``: SQLite's unary ``+`` keeps its planner from using an index for the term it
    # prefixes; PostgreSQL's statistics-driven planner needs no hint.
    "sqlite": {"greatest": "max", "unindexed": "+"},
    "postgresql": {"greatest": "GREATEST", "unindexed": ""},
}


@dataclass(frozen=True)
class _BatchStatement:
    """One hot statement over a batch ``b`` with ``columns`` (name, PostgreSQL array type).

    ``template`` names the batch FROM item ``{batch}`` and may use the words of
    ``_DIALECT_WORDS``, which differ between the two databases.
    """

    name: str
    columns: tuple[tuple[str, str], ...]
    template: str

    def render(self, dialect: str, rows: int) -> str:
        names = ", ".join(name for name, _ in self.columns)
        if dialect == "postgresql":
            arrays = ", ".join(f"${i}::{pg_type}[]" for i, (_, pg_type) in enumerate(self.columns, 1))
            return self.template.format(batch=f"unnest({arrays}) AS b({names})", **_DIALECT_WORDS[dialect])
        row = "(" + ", ".join("?" for _ in self.columns) + ")"
        values = ", ".join(row for _ in range(rows))
        return f"WITH b({names}) AS (VALUES {values}) " + self.template.format(batch="b", **_DIALECT_WORDS[dialect])


_BUMP_SEQ: Final = _BatchStatement(
    "bump_seq",
    (("id", "text"), ("n", "int4"), ("t", "float8")),
    # Allocates n seqs per context (next_seq is the first unallocated one) and touches it.
    "UPDATE contexts SET next_seq = contexts.next_seq + b.n, "
    "last_used_at = {greatest}(contexts.last_used_at, b.t) "
    "FROM {batch} WHERE contexts.id = b.id RETURNING contexts.id, contexts.next_seq",
)
_INSERT_EVENTS: Final = _BatchStatement(
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
_MARK_SENT: Final = _BatchStatement(
    "mark_sent",
    (("context_id", "text"), ("seq", "int4"), ("attempt", "int4"), ("t", "float8")),
    "UPDATE events SET state = 'SENT', attempt = b.attempt, updated_at = b.t FROM {batch} "
    "WHERE events.context_id = b.context_id AND events.seq = b.seq "
    f"AND events.state IN {_LIVE_SQL} AND events.attempt <= b.attempt "
    f"RETURNING {_RETURN_EVENT}",
)
_MARK_PENDING: Final = _BatchStatement(
    "mark_pending",
    (("context_id", "text"), ("seq", "int4"), ("t", "float8")),
    "UPDATE events SET state = 'PENDING', updated_at = b.t FROM {batch} "
    "WHERE events.context_id = b.context_id AND events.seq = b.seq AND events.state = 'SENT' "
    f"RETURNING {_RETURN_EVENT}",
)
_ESCALATE: Final = _BatchStatement(
    "escalate",
    (("context_id", "text"), ("seq", "int4"), ("reason", "text"), ("t", "float8")),
    "UPDATE events SET state = 'ESCALATED', reason = b.reason, updated_at = b.t FROM {batch} "
    f"WHERE events.context_id = b.context_id AND events.seq = b.seq AND events.state IN {_LIVE_SQL} "
    f"RETURNING {_RETURN_EVENT}",
)
_ACK_THROUGH: Final = _BatchStatement(
    "ack_through",
    (("context_id", "text"), ("through", "int4"), ("t", "float8")),
    # SQLite: ``+events.seq`` so the lookup goes through ix_events_context_state (the few live
    # events of the context) rather than a primary-key range over every event up to ``through``,
    # which grows with the stream's history. PostgreSQL picks that index from its statistics.
    "UPDATE events SET state = 'ACKED', updated_at = b.t FROM {batch} "
    "WHERE events.context_id = b.context_id AND {unindexed}events.seq <= b.through "
    f"AND events.state IN {_LIVE_SQL} "
    "RETURNING events.context_id, events.seq",
)
_SELECT_EVENTS: Final = _BatchStatement(
    "select_events",
    (("context_id", "text"), ("seq", "int4")),
    f"SELECT {_RETURN_EVENT} FROM {{batch}} "
    "JOIN events ON events.context_id = b.context_id AND events.seq = b.seq",
)

_SQL_CACHE: dict[tuple[str, str, int], str] = {}
"""Rendered hot SQL by (dialect, statement, padded batch size; 0 on PostgreSQL). Bounded: 7
statements x (9 SQLite sizes + 1 PostgreSQL shape)."""


def _padded(rows: int) -> int:
    """The SQLite batch size for ``rows`` rows: the next power of two (1, 2, 4, ... 256)."""
    return 1 << (rows - 1).bit_length()


def _batch(dialect: str, statement: _BatchStatement, rows: Sequence[tuple[Any, ...]]) -> tuple[str, tuple[Any, ...]]:
    """``statement``'s SQL and driver parameters for ``rows`` (one tuple per batch row)."""
    if dialect == "postgresql":
        key = (dialect, statement.name, 0)
        params: tuple[Any, ...] = tuple(list(column) for column in zip(*rows, strict=True))
    else:
        size = _padded(len(rows))
        key = (dialect, statement.name, size)
        flat = [value for row in rows for value in row]
        flat.extend([None] * ((size - len(rows)) * len(statement.columns)))
        params = tuple(flat)
    sql = _SQL_CACHE.get(key)
    if sql is None:
        sql = _SQL_CACHE[key] = statement.render(dialect, key[2])
    return sql, params


_SQLITE_MIN_VERSION: Final = (3, 35, 0)
"""RETURNING arrived in SQLite 3.35, UPDATE ... FROM in 3.33 (checked by :func:`open_store`)."""

_MAX_GROUP: Final = 256
"""Writes per group transaction at most: bounds how long one transaction holds the write lock."""


Merge = Callable[[AsyncConnection, list[Any]], Awaitable[list[Any]]]
"""Runs several writes of one kind as a few statements: takes their ``args``, returns one outcome
per write (its result, or the StoreError it would raise), in order. Raising, or refusing any
write, sends the whole group down the one-transaction-per-write path."""


@dataclass
class _PendingWrite(Generic[T]):
    """A write waiting for the writer task: its standalone body, optionally a merge of its kind
    with its arguments, and the caller's future (set after COMMIT)."""

    operation: str
    body: Callable[[AsyncConnection], Awaitable[T]]
    future: asyncio.Future[T]
    merge: Merge | None = None
    args: Any = None


class _GroupBodyFailed(Exception):
    """A write's body failed inside a group transaction (internal: the group is then retried
    write by write, so the caller sees the write's own error)."""

    def __init__(self, operation: str) -> None:
        super().__init__(operation)
        self.operation = operation


class _HeldConnection:
    """The writer task's connection, kept while groups follow each other."""

    def __init__(self) -> None:
        self.conn: AsyncConnection | None = None

    async def release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        # Returning a broken connection to the pool may fail: the pool discards it, and the
        # failure that broke it has already been raised to the writes that were using it.
        with contextlib.suppress(sa_exc.SQLAlchemyError, OSError):
            await conn.close()


def _fail(w: _PendingWrite[Any], exc: BaseException) -> None:
    if not w.future.done():
        w.future.set_exception(exc)


class Store:
    """The async store interface (PROTOCOL sections 3-5). Build it with :func:`open_store`.

    Safe to share between tasks, and the same instance (or instances in other processes) may be
    used concurrently. Reads run in their own transaction on a pooled connection; writes are
    group-committed by one writer task per instance (:meth:`_write`): each write's body runs in
    order inside a shared transaction and its caller resumes after that COMMIT. A write whose body
    fails does not fail the others: the group is rolled back and each write committed alone.
    """

    def __init__(self, engine: AsyncEngine, *, secret: str | None, pg_schema: str | None) -> None:
        self._engine = engine
        self._secret = secret
        self._pg_schema = pg_schema
        self._dialect = engine.dialect.name
        # Group commit: every write of this process goes through one writer task (see _write).
        self._pending: list[_PendingWrite[Any]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._dialect

    # -- plumbing ----------------------------------------------------------------------------------

    def _error(self, operation: str, exc: BaseException) -> StoreError | None:
        kind = _classify(exc)
        if kind is None:
            return None
        return kind(operation, _describe(exc, self._secret))

    async def _run(
        self, operation: str, body: Callable[[AsyncConnection], Awaitable[T]], *, write: bool
    ) -> T:
        """Run ``body`` in a transaction, commit, and type every store failure.

        Reads run in their own transaction on a pooled connection. Writes are group-committed:
        ``body`` joins the writer task's next transaction, and this returns (or raises) only
        after that transaction's COMMIT, so a caller that awaits an append before sending still
        sends only what is durable.
        """
        if not write:
            return await self._run_tx(operation, body, write=False)
        return await self._write(operation, body)

    async def _write(
        self,
        operation: str,
        body: Callable[[AsyncConnection], Awaitable[T]],
        *,
        merge: Merge | None = None,
        args: Any = None,
    ) -> T:
        """Queue a write for the writer task and wait for its commit.

        Why one writer: each transaction costs 1.5-3.5 ms of fixed overhead (BEGIN IMMEDIATE,
        COMMIT and its WAL sync, thread hops to the driver), and SQLite admits one writer at a
        time anyway. The writer takes every write queued while the previous transaction ran and
        commits them together, so that overhead is paid once per batch rather than per write.

        ``merge`` (the hot writes: append, mark_sent, ack_through, mark_pending, escalate) lets
        the group run every write of that kind as one or two statements: each statement costs a
        round trip (thread hops to the SQLite driver), so a group of N appends must not cost N
        statements. Writes queued
        together were issued concurrently (every caller awaits its write before its next one), so
        running them grouped by kind is equivalent to one of their possible arrival orders.
        """
        # A cancelled caller cancels its future: the writer then skips the write if it has not
        # started (as a cancelled transaction would have rolled back), or commits it with the
        # batch it is already part of (as a transaction cancelled after COMMIT would have).
        return await self._submit(operation, body, merge=merge, args=args)

    def _submit(
        self,
        operation: str,
        body: Callable[[AsyncConnection], Awaitable[T]],
        *,
        merge: Merge | None = None,
        args: Any = None,
    ) -> asyncio.Future[T]:
        """Queue a write for the writer task; its future resolves after the group's COMMIT."""
        if self._closing:
            raise StoreUnavailable(operation, "the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append(_PendingWrite(operation, body, future, merge, args))
        if self._writer is None or self._writer.done():
            # A fresh Event per writer: an asyncio.Event binds to the loop that first waits on it.
            self._wake = asyncio.Event()
            self._writer = loop.create_task(self._write_loop(), name="pipeproof-store-writer")
        self._wake.set()
        return future

    async def _write_loop(self) -> None:
        held = _HeldConnection()
        loop_gone = False
        try:
            while self._pending or not self._closing:
                if not self._pending:
                    if held.conn is not None:
                        # The callers of the group just committed resume in the next loop turn,
                        # and those that write again at once (append, then mark_sent, then ack)
                        # queue before this resumes: keep the connection for them. Releasing
                        # and checking out again costs a pool reset and a pre-ping, several
                        # round trips, per group.
                        await asyncio.sleep(0)
                        if self._pending:
                            continue
                    # Idle: the connection goes back to the pool, so the next group's checkout
                    # pre-pings it (a connection dropped while idle is replaced, not failed on).
                    await held.release()
                    # Clear, then re-check, then wait, with no await in between: a write queued
                    # during release() must not have its wake-up cleared.
                    self._wake.clear()
                    if not self._pending and not self._closing:
                        await self._wake.wait()
                    continue
                batch = self._pending[:_MAX_GROUP]
                del self._pending[:_MAX_GROUP]
                await self._commit_group(batch, held)
        except GeneratorExit:
            # The event loop was closed with this task still waiting, and the coroutine is being
            # collected: nothing can be awaited any more (awaiting here is what Python reports
            # as "coroutine ignored GeneratorExit"). The held connection goes with the loop.
            loop_gone = True
            raise
        finally:
            if not loop_gone:
                await asyncio.shield(held.release())
            # Cancelled (event loop shutting down) or a bug in this loop: no caller may wait
            # forever on a write the writer will not run. (With the loop gone nobody can wait.)
            if not loop_gone:
                for pending in self._pending:
                    _fail(pending, StoreUnavailable(pending.operation, "the store writer stopped"))
            self._pending.clear()

    async def _commit_group(self, batch: list[_PendingWrite[Any]], held: _HeldConnection) -> None:
        live = [w for w in batch if not w.future.done()]
        try:
            if len(live) == 1:  # alone: its own body, exactly an unmerged write
                await self._commit_alone(live[0], held)
            elif live:
                await self._commit_together(live, held)
        finally:
            # Cancellation mid-batch rolls the transaction back (``_run_tx``): say so to each caller.
            for w in live:
                if not w.future.done():  # (checked first: most are done, an exception costs)
                    _fail(w, StoreUnavailable(w.operation, "the store writer stopped before COMMIT"))

    async def _commit_alone(self, w: _PendingWrite[Any], held: _HeldConnection) -> None:
        try:
            result = await self._run_tx(w.operation, w.body, write=True, held=held)
        except Exception as exc:  # noqa: BLE001 - not swallowed: the waiting caller raises it
            # A StoreError, or a bug in the body: either way it belongs to this write's caller,
            # and the writer must live on for the other writes.
            _fail(w, exc)
            return
        if not w.future.done():
            w.future.set_result(result)

    async def _commit_together(self, live: list[_PendingWrite[Any]], held: _HeldConnection) -> None:
        # Plain writes run in queue order; each kind with a merge runs once, where its first
        # write was queued, for all the writes of that kind.
        steps: list[int | Merge] = []
        merged: dict[Merge, list[int]] = {}
        for index, w in enumerate(live):
            if w.merge is None:
                steps.append(index)
            elif w.merge in merged:
                merged[w.merge].append(index)
            else:
                merged[w.merge] = [index]
                steps.append(w.merge)

        async def body(conn: AsyncConnection) -> list[Any]:
            outcomes: list[Any] = [None] * len(live)
            for step in steps:
                if isinstance(step, int):
                    try:
                        outcomes[step] = await live[step].body(conn)
                    except Exception as exc:
                        # One write's failure (an unknown context, a conflict, a lock timeout)
                        # must not fail the others: roll back and commit each alone (below).
                        raise _GroupBodyFailed(live[step].operation) from exc
                    continue
                indexes = merged[step]
                try:
                    results = await step(conn, [live[i].args for i in indexes])
                except Exception as exc:
                    raise _GroupBodyFailed(live[indexes[0]].operation) from exc
                refused = next((r for r in results if isinstance(r, StoreError)), None)
                if refused is not None:
                    # A write refused on its own (an unknown context): rare, so the group takes
                    # the same path as any failure, and that write fails alone exactly as an
                    # unmerged write would (rolled back, typed, rollback failures included).
                    raise _GroupBodyFailed(refused.operation) from refused
                for i, result in zip(indexes, results, strict=True):
                    outcomes[i] = result
            return outcomes

        try:
            outcomes = await self._run_tx("group_commit", body, write=True, held=held)
        except _GroupBodyFailed:
            # The group rolled back; nothing of it is stored. Each write in its own
            # transaction, in order, gets its own result or its own typed error.
            for w in live:
                await self._commit_alone(w, held)
            return
        except StoreError as exc:
            # BEGIN or COMMIT failed: no write of the group is known to be stored, so every
            # caller gets the typed error under its own operation name.
            for w in live:
                typed = type(exc)(w.operation, exc.detail)
                typed.__cause__ = exc.__cause__
                _fail(w, typed)
            return
        for w, outcome in zip(live, outcomes, strict=True):
            if not w.future.done():
                w.future.set_result(outcome)

    async def _run_tx(
        self,
        operation: str,
        body: Callable[[AsyncConnection], Awaitable[T]],
        *,
        write: bool,
        held: _HeldConnection | None = None,
    ) -> T:
        """One transaction on a pooled connection, or on the writer's ``held`` one (kept across
        consecutive groups: a checkout costs a pre-ping round trip, more than a merged group)."""
        try:
            if held is None:
                async with self._engine.connect() as conn:
                    return await self._in_tx(conn, operation, body, write=write)
            if held.conn is None:
                held.conn = await self._engine.connect()
            try:
                return await self._in_tx(held.conn, operation, body, write=write)
            except BaseException:
                # After any failure the connection's state is not known to be clean: the next
                # transaction gets a fresh (pre-pinged) one.
                await held.release()
                raise
        except StoreError:
            raise
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            # OSError: the driver's own connect failures (refused, SSL rejected) are not wrapped.
            typed = self._error(operation, exc)
            if typed is None:
                raise
            raise typed from exc

    async def _in_tx(
        self, conn: AsyncConnection, operation: str, body: Callable[[AsyncConnection], Awaitable[T]], *, write: bool
    ) -> T:
        if write:
            sync = conn.sync_connection
            if sync is None or not sync.get_execution_options().get("pipeproof_write", False):
                # Once per connection: the writer's held connection keeps it across groups.
                await conn.execution_options(pipeproof_write=True)
        tx = await conn.begin()
        try:
            result = await body(conn)
        except BaseException as exc:
            try:
                await tx.rollback()
            except (sa_exc.SQLAlchemyError, OSError) as rollback_exc:
                # The outcome of the transaction is unknown: this must surface, typed.
                # (A group's failure is named by the write that failed in it.)
                failed = exc.__cause__ if isinstance(exc, _GroupBodyFailed) and exc.__cause__ else exc
                raise StoreRollbackFailed(
                    operation,
                    f"rollback after {type(failed).__name__} failed: "
                    f"{_describe(rollback_exc, self._secret)}; "
                    f"original failure: {_describe(exc, self._secret)}",
                ) from rollback_exc
            raise
        await tx.commit()
        return result

    def _insert(self, table: Table) -> Any:
        return pg_insert(table) if self._dialect == "postgresql" else sqlite_insert(table)

    # -- schema ------------------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Apply every pending migration, idempotently and safely from many processes at once.

        Migrators serialise on a PostgreSQL advisory transaction lock (SQLite: the write lock taken
        by ``BEGIN IMMEDIATE``), then re-read the version inside the lock. Returns the versions this
        call applied (empty when the schema was current).
        """

        async def body(conn: AsyncConnection) -> list[int]:
            if self._dialect == "postgresql":
                await conn.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
                if self._pg_schema is not None:
                    await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self._pg_schema}"'))
            await conn.run_sync(
                lambda sync: metadata.create_all(sync, tables=[schema_version_table], checkfirst=True)
            )
            current = (await conn.execute(select(func.max(schema_version_table.c.version)))).scalar()
            current_version = 0 if current is None else int(current)
            applied: list[int] = []
            for migration in MIGRATIONS:
                if migration.version <= current_version:
                    continue
                await conn.run_sync(migration.apply)
                await conn.execute(
                    schema_version_table.insert().values(
                        version=migration.version, description=migration.description, applied_at=time.time()
                    )
                )
                applied.append(migration.version)
            return applied

        return await self._run("migrate", body, write=True)

    async def schema_version(self) -> int:
        """The applied schema version; 0 for an empty database."""

        async def body(conn: AsyncConnection) -> int:
            exists = await conn.run_sync(lambda sync: inspect(sync).has_table("schema_version"))
            if not exists:
                return 0
            value = (await conn.execute(select(func.max(schema_version_table.c.version)))).scalar()
            return 0 if value is None else int(value)

        return await self._run("schema_version", body, write=False)

    # -- readiness ---------------------------------------------------------------------------------

    async def ping(self) -> float:
        """Round-trip ``SELECT 1``; returns the seconds it took (``/readyz``, Transport section)."""

        async def body(conn: AsyncConnection) -> float:
            started = time.perf_counter()
            await conn.execute(select(1))
            return time.perf_counter() - started

        return await self._run("ping", body, write=False)

    async def check_writable(self, now: float | None = None) -> None:
        """Commit a real write (an upsert of ``store_probe``) so ``/readyz`` catches a read-only or
        full store, not only an unreachable one. Raises a StoreError subclass on failure."""
        stamp = _now(now)

        async def body(conn: AsyncConnection) -> None:
            stmt = self._insert(store_probe).values(id=1, checked_at=stamp)
            stmt = stmt.on_conflict_do_update(index_elements=[store_probe.c.id], set_={"checked_at": stamp})
            await conn.execute(stmt)

        await self._run("check_writable", body, write=True)

    # -- contexts (section 3) ----------------------------------------------------------------------

    async def get_or_create_context(self, user: str, account: str, now: float, ttl: float) -> ContextRecord:
        """The user's live context, created if there is none (PROTOCOL section 3).

        Atomic under any concurrency, in one process or many: the partial unique index admits one
        live row per user and the insert is ``ON CONFLICT DO NOTHING``, so a loser re-reads the
        winner's row. A live context idle for more than ``ttl`` (``now - last_used_at > ttl``) is
        marked expired in the same transaction and replaced by a new one with ``epoch + 1``; an
        expired context is never returned. Returning an existing context touches it. ``account``
        is recorded when a context is created; a live context keeps the account it was created with.
        """
        if ttl <= 0:
            raise ValueError("ttl must be positive")

        async def body(conn: AsyncConnection) -> ContextRecord:
            for _ in range(_MAX_CONTEXT_RACE_RETRIES):
                live = (
                    await conn.execute(
                        select(contexts)
                        .where(contexts.c.user_id == user, contexts.c.expired == false())
                        .with_for_update()  # PostgreSQL: serialise on the row; SQLite ignores it
                    )
                ).first()
                if live is not None:
                    if now - float(live.last_used_at) <= ttl:
                        await conn.execute(
                            update(contexts)
                            .where(contexts.c.id == live.id)
                            .values(last_used_at=max(float(live.last_used_at), now))
                        )
                        return ContextRecord(str(live.id), int(live.epoch), False, user, str(live.account_id))
                    await conn.execute(
                        update(contexts)
                        .where(contexts.c.id == live.id, contexts.c.expired == false())
                        .values(expired=True, expired_at=now)
                    )
                next_epoch = (
                    select(func.coalesce(func.max(contexts.c.epoch), 0) + 1)
                    .where(contexts.c.user_id == user)
                    .scalar_subquery()
                )
                inserted = (
                    await conn.execute(
                        self._insert(contexts)
                        .values(
                            id=uuid.uuid4().hex,
                            user_id=user,
                            account_id=account,
                            epoch=next_epoch,
                            created_at=now,
                            last_used_at=now,
                            expired=False,
                            next_seq=1,
                        )
                        .on_conflict_do_nothing()
                        .returning(contexts.c.id, contexts.c.epoch)
                    )
                ).first()
                if inserted is not None:
                    return ContextRecord(str(inserted.id), int(inserted.epoch), True, user, account)
                # Another transaction committed a live context first: loop and read it.
            raise StoreIntegrityError(
                "get_or_create_context",
                f"no live context after {_MAX_CONTEXT_RACE_RETRIES} conflicting inserts for one user",
            )

        return await self._run("get_or_create_context", body, write=True)

    async def touch_context(self, context_id: str, now: float, ttl: float | None = None) -> bool:
        """Record activity on a context. True if it is live and was touched; False if it has expired
        (and, with ``ttl``, if it is idle past ``ttl``, in which case it is marked expired now), so
        the caller must resolve a new context. Unknown ``context_id``: StoreIntegrityError."""

        async def body(conn: AsyncConnection) -> bool:
            row = (
                await conn.execute(select(contexts).where(contexts.c.id == context_id).with_for_update())
            ).first()
            if row is None:
                raise StoreIntegrityError("touch_context", f"no context {context_id!r}")
            if bool(row.expired):
                return False
            if ttl is not None and now - float(row.last_used_at) > ttl:
                await conn.execute(
                    update(contexts)
                    .where(contexts.c.id == context_id, contexts.c.expired == false())
                    .values(expired=True, expired_at=now)
                )
                return False
            await conn.execute(
                update(contexts)
                .where(contexts.c.id == context_id)
                .values(last_used_at=max(float(row.last_used_at), now))
            )
            return True

        return await self._run("touch_context", body, write=True)

    async def expire_idle_contexts(self, now: float, ttl: float) -> list[str]:
        """Mark every live context idle past ``ttl`` expired (a sweeper); returns their ids."""

        async def body(conn: AsyncConnection) -> list[str]:
            result = await conn.execute(
                update(contexts)
                .where(contexts.c.expired == false(), contexts.c.last_used_at < now - ttl)
                .values(expired=True, expired_at=now)
                .returning(contexts.c.id)
            )
            return sorted(str(r.id) for r in result)

        return await self._run("expire_idle_contexts", body, write=True)

    async def find_context(self, context_id: str) -> ContextInfo | None:
        """The context row, or None if no such context exists."""

        async def body(conn: AsyncConnection) -> ContextInfo | None:
            row = (await conn.execute(select(contexts).where(contexts.c.id == context_id))).first()
            return None if row is None else _context_from_row(row)

        return await self._run("find_context", body, write=False)

    # -- events (section 5) ------------------------------------------------------------------------
    #
    # Each write kind has one implementation, its merge (``_*_many``): a group runs it once for all
    # the writes of that kind, and a write run alone (or a group fallen back to one transaction
    # per write) runs it with one item (``_write_one``). Each is one or two batch statements
    # (``_BatchStatement``) whatever the number of items.

    async def _write_one(self, operation: str, merge: Merge, args: Any) -> Any:
        """Queue one write of a merged kind and wait for its commit (see :meth:`_submit_one`)."""
        return await self._submit_one(operation, merge, args)

    def _submit_one(self, operation: str, merge: Merge, args: Any) -> asyncio.Future[Any]:
        """Queue one write of a merged kind: alone, its body is ``merge`` over just ``args``, and a
        refusal is raised (rolling the transaction back) instead of returned."""

        async def body(conn: AsyncConnection) -> Any:
            (outcome,) = await merge(conn, [args])
            if isinstance(outcome, StoreError):
                raise outcome
            return outcome

        return self._submit(operation, body, merge=merge, args=args)

    async def _execute_batch(
        self, conn: AsyncConnection, statement: _BatchStatement, rows: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        """Run ``statement`` over ``rows``; returns its result rows (empty without RETURNING)."""
        sql, params = _batch(self._dialect, statement, rows)
        if self._dialect == "sqlite":
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

    async def append_event(
        self,
        context_id: str,
        run_id: str,
        kind: str,
        data: Mapping[str, Any],
        now: float,
        *,
        sent: bool = False,
    ) -> EventRecord:
        """Append one event with the context's next ``seq`` (PROTOCOL section 5).

        The seq counter bump and the insert share one transaction, so seqs are 1, 2, 3... with no
        gap or duplicate under any concurrency. Appending also touches the context (a running run
        is activity). Appending to an expired context is allowed: its events still need delivering
        or escalating. Unknown context: StoreIntegrityError.

        The event is stored PENDING with attempt 0, or with ``sent`` SENT with attempt 1: for a
        caller about to write it to a live session, which saves the separate :meth:`mark_sent`.
        Section 5 still holds: the event is durable (committed) before this returns, so before it
        is sent. Marking it SENT before the send is safe because a SENT event that never reached
        anyone is resent after its ack timeout or acked by a resume, so nothing is lost; if the
        send fails at once, the caller fires ``send_failed`` and calls :meth:`mark_pending`,
        which keeps attempt 1. The returned record is the event as stored.
        """
        payload = encode_event_data(data)  # fail on unserialisable data before touching the store
        (record,) = await self.submit_append_events(context_id, ((run_id, kind, payload),), now, sent=sent)
        return record

    def submit_append_events(
        self,
        context_id: str,
        events: Sequence[tuple[str, str, str]],
        now: float,
        *,
        sent: bool = False,
    ) -> asyncio.Future[list[EventRecord]]:
        """Append several events, ``(run_id, kind, payload)`` in order, as one write (section 5);
        each payload is its data as :func:`encode_event_data` encoded it (so a producer finds
        unserialisable data when it queues the event, and it is encoded once).

        All or nothing: they take consecutive seqs in one transaction, or none is stored and the
        future fails with the StoreError. A producer that keeps several events of one context in
        flight must not see event k lost and k+1 stored; sending each batch only after the
        previous one committed, as one write, guarantees that. Returns a future (resolved after
        the COMMIT) rather than a coroutine: ``asyncio.shield`` of a future costs no task.
        Cancelling the future withdraws the write if the writer has not started it. ``sent``: see :meth:`append_event`.
        """
        stamp = float(now)
        items = [(context_id, run_id, kind, payload, stamp, sent) for run_id, kind, payload in events]
        if not items:
            raise ValueError("no events to append")
        return self._submit_one("append_event", self._append_batches, items)

    async def _append_batches(self, conn: AsyncConnection, batches: list[Any]) -> list[Any]:
        """Merged multi-event appends: the group's events in queue order through one
        :meth:`_append_many`; a write whose events are refused (an unknown context) is refused
        as a whole, which rolls the group back and commits each write alone."""
        outcomes = await self._append_many(conn, [item for batch in batches for item in batch])
        result: list[Any] = []
        start = 0
        for batch in batches:
            mine = outcomes[start : start + len(batch)]
            start += len(batch)
            refused = next((o for o in mine if isinstance(o, StoreError)), None)
            result.append(refused if refused is not None else mine)
        return result

    async def _append_many(self, conn: AsyncConnection, items: list[Any]) -> list[Any]:
        """Merged appends: one seq bump for every context of the group, one multi-row insert.

        Per context, the group's appends take consecutive seqs in queue order, exactly what
        that many single appends would have allocated; an unknown context refuses only its own
        appends (StoreIntegrityError), which wrote nothing. Each item's ``sent`` flag picks its
        stored state (see :meth:`append_event`).
        """
        counts: dict[str, int] = {}
        latest: dict[str, float] = {}
        for context_id, _run_id, _kind, _payload, now, _sent in items:
            counts[context_id] = counts.get(context_id, 0) + 1
            latest[context_id] = max(latest.get(context_id, now), now)
        bumped = await self._execute_batch(
            conn, _BUMP_SEQ, [(c, n, latest[c]) for c, n in counts.items()]
        )
        # RETURNING gives next_seq after the bump: this context's appends take the n below it.
        next_seq = {str(c): int(after) - counts[str(c)] for c, after in bumped}
        outcomes: list[Any] = []
        rows: list[tuple[Any, ...]] = []
        for context_id, run_id, kind, payload, now, sent in items:
            seq = next_seq.get(context_id)
            if seq is None:
                outcomes.append(StoreIntegrityError("append_event", f"no context {context_id!r}"))
                continue
            next_seq[context_id] = seq + 1
            state, attempt = (EventState.SENT, 1) if sent else (EventState.PENDING, 0)
            event_id = uuid.uuid4().hex
            rows.append((context_id, seq, event_id, run_id, kind, payload, state.value, attempt, now))
            # What a read gives back: the payload goes through JSON as stored.
            outcomes.append(
                EventRecord(
                    context_id=context_id,
                    seq=seq,
                    event_id=event_id,
                    run_id=run_id,
                    kind=kind,
                    data=MappingProxyType(json.loads(payload)),
                    state=state,
                    attempt=attempt,
                    reason=None,
                    created_at=now,
                    updated_at=now,
                )
            )
        if rows:
            await self._execute_batch(conn, _INSERT_EVENTS, rows)
        return outcomes

    async def _change_events(
        self,
        conn: AsyncConnection,
        operation: str,
        statement: _BatchStatement,
        changes: Mapping[tuple[str, int], tuple[Any, ...]],
    ) -> dict[tuple[str, int], EventRecord | StoreError]:
        """Apply ``statement`` (a conditional UPDATE ... RETURNING of whole events) to the events
        keyed ``(context_id, seq)`` with their extra batch columns; returns each key's event as
        stored afterwards, changed or not, or StoreIntegrityError for an event that does not
        exist. The events the UPDATE left alone (terminal, stale) cost a second statement."""
        rows = [(c, q, *extra) for (c, q), extra in changes.items()]
        stored: dict[tuple[str, int], EventRecord | StoreError] = {}
        for row in await self._execute_batch(conn, statement, rows):
            record = _event_from_values(row)
            stored[(record.context_id, record.seq)] = record
        missing = [key for key in changes if key not in stored]
        if missing:
            for row in await self._execute_batch(conn, _SELECT_EVENTS, missing):
                record = _event_from_values(row)
                stored[(record.context_id, record.seq)] = record
            for c, q in missing:
                if (c, q) not in stored:
                    stored[(c, q)] = StoreIntegrityError(operation, f"no event seq {q} in context {c!r}")
        return stored

    async def mark_sent(
        self, context_id: str, seq: int, attempt: int, now: float | None = None
    ) -> EventRecord:
        """PENDING/SENT -> SENT with ``attempt`` (section 5), if ``attempt`` is not below the stored one.

        Returns the event as stored: an ACKED/ESCALATED event, or a stale (lower) attempt from a
        racing sender, is left unchanged, which the caller sees in ``state`` / ``attempt``.
        Unknown event: StoreIntegrityError.
        """
        if attempt < 1:
            raise ValueError("attempt counts sends and starts at 1")
        record: EventRecord = await self._write_one(
            "mark_sent", self._mark_sent_many, (context_id, seq, attempt, float(_now(now)))
        )
        return record

    async def _mark_sent_many(self, conn: AsyncConnection, items: list[Any]) -> list[Any]:
        """Merged mark_sent: one UPDATE ... RETURNING for the group (plus a SELECT of the events
        it left alone, if any). Several for one event are folded first into what applying them
        in queue order leaves: the highest attempt, the later one on a tie. Every such caller
        gets the event as stored after the group. An unknown event refuses only its own write."""
        changes: dict[tuple[str, int], tuple[int, float]] = {}
        for c, q, attempt, now in items:
            previous = changes.get((c, q))
            if previous is None or attempt >= previous[0]:
                changes[(c, q)] = (attempt, now)
        stored = await self._change_events(conn, "mark_sent", _MARK_SENT, changes)
        return [stored[(c, q)] for c, q, _attempt, _now in items]

    async def mark_pending(self, context_id: str, seq: int, now: float | None = None) -> EventRecord:
        """SENT -> PENDING: the send failed or the socket went away; the event awaits a retry or a
        resume (section 5). Same rank in the state order, so not a backwards move; the attempt
        is kept. Returns the event as stored (PENDING and terminal events are left unchanged).
        Unknown event: StoreIntegrityError."""
        record: EventRecord = await self._write_one(
            "mark_pending", self._mark_pending_many, (context_id, seq, float(_now(now)))
        )
        return record

    async def _mark_pending_many(self, conn: AsyncConnection, items: list[Any]) -> list[Any]:
        """Merged mark_pending: one UPDATE for the group. Of several for one event only the first
        can apply (it leaves the event PENDING), so the first's stamp is kept."""
        changes: dict[tuple[str, int], tuple[float]] = {}
        for c, q, now in items:
            changes.setdefault((c, q), (now,))
        stored = await self._change_events(conn, "mark_pending", _MARK_PENDING, changes)
        return [stored[(c, q)] for c, q, _now in items]

    async def escalate(
        self, context_id: str, seq: int, reason: EscalationReason, now: float | None = None
    ) -> EventRecord:
        """PENDING/SENT -> ESCALATED with ``reason`` (section 5). An ACKED event stays ACKED, and an
        event already ESCALATED keeps its first reason; the stored event is returned either way.
        Unknown event: StoreIntegrityError."""
        if reason not in ESCALATION_REASONS:
            raise ValueError(f"unknown escalation reason {reason!r}; expected one of {ESCALATION_REASONS}")
        record: EventRecord = await self._write_one(
            "escalate", self._escalate_many, (context_id, seq, reason, float(_now(now)))
        )
        return record

    async def _escalate_many(self, conn: AsyncConnection, items: list[Any]) -> list[Any]:
        """Merged escalate: one UPDATE for the group. Of several for one event only the first can
        apply (ESCALATED is terminal), so it keeps the first's reason, as in queue order."""
        changes: dict[tuple[str, int], tuple[str, float]] = {}
        for c, q, reason, now in items:
            changes.setdefault((c, q), (reason, now))
        stored = await self._change_events(conn, "escalate", _ESCALATE, changes)
        return [stored[(c, q)] for c, q, _reason, _now in items]

    async def ack_through(self, context_id: str, seq: int, now: float | None = None) -> list[int]:
        """Cumulative ack (section 5): every PENDING/SENT event with ``seq' <= seq`` becomes ACKED.

        Returns the seqs this call acked, ascending (empty when all were already terminal). ACKED
        and ESCALATED events are untouched, so an ack never un-escalates and never moves backwards;
        acking a seq beyond the stream acks what exists and nothing more.
        """
        acked: list[int] = await self.submit_ack_through(context_id, seq, now)
        return acked

    def submit_ack_through(self, context_id: str, seq: int, now: float | None = None) -> asyncio.Future[list[int]]:
        """:meth:`ack_through` as a future (see :meth:`submit_append_events`)."""
        return self._submit_one("ack_through", self._ack_many, (context_id, seq, float(_now(now))))

    async def _ack_many(self, conn: AsyncConnection, items: list[Any]) -> list[Any]:
        """Merged cumulative acks: one UPDATE ... RETURNING for every context of the group (each
        through its highest acked seq). Several acks of one context are ordered by ``seq``, as if
        applied one after the other: each gets the seqs above the previous one's."""
        through: dict[str, int] = {}
        stamps: dict[str, float] = {}
        for context_id, seq, now in items:
            through[context_id] = max(through.get(context_id, seq), seq)
            stamps[context_id] = max(stamps.get(context_id, now), now)
        rows = await self._execute_batch(conn, _ACK_THROUGH, [(c, q, stamps[c]) for c, q in through.items()])
        acked: dict[str, list[int]] = {}
        for c, q in rows:
            acked.setdefault(str(c), []).append(int(q))
        if len(items) == 1:  # the common case: everything acked is this ack's
            return [sorted(acked.get(items[0][0], []))]
        outcomes: list[Any] = [None] * len(items)
        below: dict[str, int] = {}
        for index in sorted(range(len(items)), key=lambda i: (items[i][1], i)):
            context_id, seq, _now = items[index]
            floor = below.get(context_id, 0)
            outcomes[index] = sorted(q for q in acked.get(context_id, []) if floor < q <= seq)
            below[context_id] = max(floor, seq)
        return outcomes

    async def _select_events(
        self, operation: str, *where: Any, limit: int | None = None
    ) -> list[EventRecord]:
        async def body(conn: AsyncConnection) -> list[EventRecord]:
            stmt = select(events).where(*where).order_by(events.c.seq)
            if limit is not None:
                stmt = stmt.limit(limit)
            return [_event_from_row(r) for r in await conn.execute(stmt)]

        return await self._run(operation, body, write=False)

    async def unacked_after(
        self, context_id: str, seq: int, *, include_escalated: bool = False
    ) -> list[EventRecord]:
        """Events with seq > ``seq`` still in delivery (PENDING/SENT), ascending: what a resume
        redelivers (section 5). ``include_escalated`` adds ESCALATED ones (never ACKED)."""
        states = [*LIVE_STATES, EventState.ESCALATED.value] if include_escalated else list(LIVE_STATES)
        return await self._select_events(
            "unacked_after",
            events.c.context_id == context_id,
            events.c.seq > seq,
            events.c.state.in_(states),
        )

    async def events_after(self, context_id: str, seq: int, limit: int = 100) -> list[EventRecord]:
        """Every event with seq > ``seq``, any state, ascending, at most ``limit`` (``GET /v1/events``)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._select_events(
            "events_after", events.c.context_id == context_id, events.c.seq > seq, limit=limit
        )

    async def live_events(self) -> list[EventRecord]:
        """Every PENDING/SENT event of every context, by context then seq: what a restarted node
        recovers into delivery (section 5; section 6, "nothing pending is lost")."""
        return await self._select_events("live_events", events.c.state.in_(LIVE_STATES))

    async def run_events(self, context_id: str, run_id: str) -> list[EventRecord]:
        """Every event of one run, ascending (recovering a run interrupted by a crash)."""
        return await self._select_events(
            "run_events", events.c.context_id == context_id, events.c.run_id == run_id
        )

    async def unfinished_runs(self) -> list[RunRecord]:
        """Runs not in a terminal state (COMPLETED, FAILED, REJECTED), oldest first."""

        async def body(conn: AsyncConnection) -> list[RunRecord]:
            rows = await conn.execute(
                select(runs)
                .where(runs.c.state.not_in(["COMPLETED", "FAILED", "REJECTED"]))
                .order_by(runs.c.created_at)
            )
            return [_run_from_row(r) for r in rows]

        return await self._run("unfinished_runs", body, write=False)

    async def find_live_context(self, user: str) -> ContextInfo | None:
        """The user's non-expired context, or None when they have none (read-only: never creates)."""

        async def body(conn: AsyncConnection) -> ContextInfo | None:
            row = (
                await conn.execute(
                    select(contexts).where(contexts.c.user_id == user, contexts.c.expired == false())
                )
            ).first()
            return None if row is None else _context_from_row(row)

        return await self._run("find_live_context", body, write=False)

    async def escalations(self, context_id: str) -> list[EventRecord]:
        """The context's ESCALATED events, ascending (``GET /v1/escalations``)."""
        return await self._select_events(
            "escalations",
            events.c.context_id == context_id,
            events.c.state == EventState.ESCALATED.value,
        )

    # -- runs (section 4) --------------------------------------------------------------------------

    async def create_run(
        self,
        context_id: str,
        request_id: str,
        user: str,
        now: float,
        *,
        state: str = "ACCEPTED",
        run_id: str | None = None,
    ) -> tuple[RunRecord, bool]:
        """Create the run for ``(context_id, request_id)`` or return the existing one (section 4).

        Returns ``(run, created)``; a repeated ``request_id`` returns the first run and ``False``,
        whatever ``state``/``run_id`` the repeat passed. Unknown context: StoreIntegrityError.
        """
        new_id = run_id if run_id is not None else uuid.uuid4().hex

        async def body(conn: AsyncConnection) -> tuple[RunRecord, bool]:
            inserted = (
                await conn.execute(
                    self._insert(runs)
                    .values(
                        run_id=new_id,
                        context_id=context_id,
                        request_id=request_id,
                        user_id=user,
                        state=state,
                        created_at=now,
                        updated_at=now,
                    )
                    .on_conflict_do_nothing(index_elements=[runs.c.context_id, runs.c.request_id])
                    .returning(*runs.c)
                )
            ).first()
            if inserted is not None:
                return _run_from_row(inserted), True
            existing = (
                await conn.execute(
                    select(runs).where(runs.c.context_id == context_id, runs.c.request_id == request_id)
                )
            ).one()
            return _run_from_row(existing), False

        return await self._run("create_run", body, write=True)

    async def set_run_state(
        self,
        run_id: str,
        state: str,
        now: float | None = None,
        *,
        from_states: Collection[str] | None = None,
    ) -> RunRecord:
        """Set a run's state; with ``from_states``, only if the current state is one of them (a
        compare-and-set, so two nodes cannot both finish a run). Returns the run as stored.
        Unknown run: StoreIntegrityError."""
        stamp = _now(now)

        async def body(conn: AsyncConnection) -> RunRecord:
            stmt = update(runs).where(runs.c.run_id == run_id)
            if from_states is not None:
                stmt = stmt.where(runs.c.state.in_(list(from_states)))
            changed = (
                await conn.execute(stmt.values(state=state, updated_at=stamp).returning(*runs.c))
            ).first()
            if changed is not None:
                return _run_from_row(changed)
            current = (await conn.execute(select(runs).where(runs.c.run_id == run_id))).first()
            if current is None:
                raise StoreIntegrityError("set_run_state", f"no run {run_id!r}")
            return _run_from_row(current)

        return await self._run("set_run_state", body, write=True)

    async def find_run(self, run_id: str) -> RunRecord | None:
        """The run, or None if there is no such run."""

        async def body(conn: AsyncConnection) -> RunRecord | None:
            row = (await conn.execute(select(runs).where(runs.c.run_id == run_id))).first()
            return None if row is None else _run_from_row(row)

        return await self._run("find_run", body, write=False)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Commit the writes already queued, then close every pooled connection. The store is
        unusable afterwards (a write raises StoreUnavailable)."""
        self._closing = True
        self._wake.set()
        writer = self._writer
        if writer is not None and not writer.done():
            await writer
        await self._engine.dispose()


# --------------------------------------------------------------------------------------------------
# Construction


def _install_sqlite_hooks(engine: AsyncEngine, busy_timeout: float, synchronous: SqliteSynchronous) -> None:
    busy_ms = max(1, round(busy_timeout * 1000))
    if synchronous not in get_args(SqliteSynchronous):
        raise ValueError(f"sqlite_synchronous must be one of {get_args(SqliteSynchronous)}")

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand BEGIN to SQLAlchemy (see _on_begin): the sqlite3 module's implicit BEGIN skips
        # SELECTs and cannot take the write lock up front.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
            # WAL: readers do not block the writer; several processes can share the file.
            cursor.execute("PRAGMA journal_mode = WAL")
            # NORMAL (the default) in WAL mode: a commit survives kill -9 but not an OS crash or
            # power loss; FULL syncs the WAL per commit (Settings.sqlite_synchronous).
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = bool(conn.get_execution_options().get("pipeproof_write", False))
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _check_schema_name(name: str) -> str:
    # The schema name is interpolated into DDL and search_path, so only plain identifiers pass.
    if not name.replace("_", "").isalnum() or not name[0].isalpha() or len(name) > 63:
        raise ValueError(f"invalid PostgreSQL schema name {name!r}")
    return name


async def open_store(
    url: str,
    pool_size: int = 10,
    timeout: float = 5.0,
    *,
    migrate: bool = True,
    pg_schema: str | None = None,
    sqlite_synchronous: SqliteSynchronous = "NORMAL",
) -> Store:
    """Open the store at ``url`` (``sqlite+aiosqlite:///path`` or ``postgresql+asyncpg://...``).

    ``pool_size`` caps connections (no overflow); ``timeout`` (seconds) bounds waiting for a pooled
    connection (StorePoolExhausted), connecting (StoreTimeout / StoreUnavailable), SQLite's lock
    wait (``busy_timeout``: StoreTimeout) and PostgreSQL statements and lock waits
    (``statement_timeout`` / ``lock_timeout``: StoreTimeout). A SQLite file's directory is created.
    ``pg_schema`` puts every table in that PostgreSQL schema (created by :meth:`Store.migrate`).
    ``sqlite_synchronous`` is SQLite's ``PRAGMA synchronous`` (WAL mode): ``NORMAL`` is durable
    against a process crash, ``FULL`` also against an OS crash or power loss.
    With ``migrate`` (the default) pending migrations are applied, so connection and auth problems
    surface here as typed errors. Raises ValueError for an unsupported URL, and for a SQLite
    library older than 3.35 (the hot statements use ``UPDATE ... FROM`` and ``RETURNING``).
    """
    if pool_size < 1 or timeout <= 0:
        raise ValueError("pool_size must be >= 1 and timeout > 0")
    parsed: URL = make_url(url)
    secret = parsed.password if isinstance(parsed.password, str) else None
    backend = parsed.get_backend_name()
    driver = parsed.get_driver_name()
    connect_args: dict[str, Any] = {}
    if (backend, driver) == ("sqlite", "aiosqlite"):
        if sqlite3.sqlite_version_info < _SQLITE_MIN_VERSION:
            raise ValueError(
                f"SQLite {sqlite3.sqlite_version} is too old for the store: it needs "
                f"{'.'.join(map(str, _SQLITE_MIN_VERSION))} or later (UPDATE ... FROM, RETURNING)"
            )
        if pg_schema is not None:
            raise ValueError("pg_schema applies to PostgreSQL only")
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise ValueError("the SQLite store needs a file path (several connections share it)")
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args["timeout"] = timeout
    elif (backend, driver) == ("postgresql", "asyncpg"):
        millis = str(max(1, round(timeout * 1000)))
        server_settings = {
            "application_name": "pipeproof",
            "statement_timeout": millis,
            "lock_timeout": millis,
        }
        if pg_schema is not None:
            server_settings["search_path"] = _check_schema_name(pg_schema)
        connect_args.update(timeout=timeout, server_settings=server_settings)
    else:
        raise ValueError(f"unsupported store URL scheme {backend}+{driver}")

    engine = create_async_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=timeout,
        pool_pre_ping=True,
        connect_args=connect_args,
    )
    if backend == "sqlite":
        _install_sqlite_hooks(engine, timeout, sqlite_synchronous)
    store = Store(engine, secret=secret, pg_schema=pg_schema)
    if migrate:
        try:
            await store.migrate()
        except BaseException:
            await engine.dispose()
            raise
    return store


__all__ = [
    "ESCALATION_REASONS",
    "EXPECTED_SCHEMA_VERSION",
    "MIGRATIONS",
    "ContextInfo",
    "ContextRecord",
    "EscalationReason",
    "EventRecord",
    "EventState",
    "Migration",
    "RunRecord",
    "Store",
    "open_store",
]
