"""The store's schema: tables, constraints and migrations (PROTOCOL sections 3, 4 and 5).

The guarantees the protocol needs are made here, by the database, never by an in-process lock:

* one live context per user: a partial UNIQUE index on ``contexts(user_id) WHERE NOT expired``
  (section 3);
* gap-free per-context ``seq``: ``contexts.next_seq`` is the first unallocated seq, and
  ``(context_id, seq)`` is the events' primary key (section 5);
* an event's ``state`` is a :class:`~pipeproof.protocol.DeliveryState` and its ``reason`` an
  :class:`~pipeproof.protocol.EscalationReason`: CHECK constraints rendered from those enums, so
  the database refuses any other word (section 5);
* a run is held by one node at a time: ``runs.owner_node`` and ``runs.lease_expires`` (version 2),
  taken and renewed only by conditional ``UPDATE``s, so exactly one node ends a run whose node
  died (section 6, "When a node dies");
* connection limits across nodes and one delivery owner per context (version 3): a ``sessions``
  row per socket counted in the transaction that inserts it, and ``delivery_owners`` taken by a
  compare-and-set against the ``nodes`` heartbeats (section 5, "Several nodes").

The schema is versioned: :data:`MIGRATIONS` are applied in order by :func:`apply_migrations`, each
recorded in ``schema_version``, safely from many processes at once.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

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
    Table,
    Text,
    UniqueConstraint,
    false,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateColumn

from pipeproof.protocol import DeliveryState, EscalationReason


def sql_literal(member: enum.Enum) -> str:
    """``'SENT'``: an enum member's value as an SQL string literal.

    Only plain words pass: the value is pasted into DDL and into the hot statements' text, so a
    quote (or anything but letters, digits and ``_``) would change the SQL, not just the value.
    """
    value = member.value
    if not isinstance(value, str) or not value or not value.replace("_", "").isalnum():
        raise ValueError(f"{member!r} has no plain-word value to write as an SQL literal")
    return f"'{value}'"


def sql_in_list(members: Iterable[enum.Enum]) -> str:
    """``('PENDING', 'SENT')``: the values of ``members`` as an SQL ``IN`` list.

    In the members' declaration order, whatever order ``members`` comes in (a frozenset's order may
    differ between runs, and the rendered text is schema DDL and part of cached statement text).
    """
    chosen = set(members)
    classes = {type(member) for member in chosen}
    if len(classes) != 1:
        raise ValueError(f"an SQL IN list takes members of one enum, got {sorted(c.__name__ for c in classes)}")
    (cls,) = classes
    return "(" + ", ".join(sql_literal(member) for member in cls if member in chosen) + ")"


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

# Rendered from the protocol's enums, so the store cannot name a state or reason the protocol does
# not. Migration 1 creates them from this text: a new member changes what a fresh database gets,
# so it needs a migration that alters the constraint of existing databases as well
# (tests/impl/store/test_schema.py holds version 1's text).
STATE_CHECK: Final = f"state IN {sql_in_list(DeliveryState)}"
REASON_CHECK: Final = f"reason IS NULL OR reason IN {sql_in_list(EscalationReason)}"

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
    CheckConstraint(STATE_CHECK, name="ck_events_state"),
    CheckConstraint(REASON_CHECK, name="ck_events_reason"),
    CheckConstraint("seq >= 1 AND attempt >= 0", name="ck_events_seq_attempt"),
)
Index("ix_events_context_state", events.c.context_id, events.c.state)

def _runs_v1_columns() -> list[Column[Any]]:
    return [
        Column("run_id", Text, primary_key=True),
        Column("context_id", Text, ForeignKey("contexts.id"), nullable=False),
        Column("request_id", Text, nullable=False),
        Column("user_id", Text, nullable=False),
        Column("state", Text, nullable=False),
        Column("created_at", Float, nullable=False),
        Column("updated_at", Float, nullable=False),
    ]


RUN_TERMINAL_STATES: Final = ("COMPLETED", "FAILED", "REJECTED")
"""The states a stored run never leaves (section 4); every other state is unfinished."""

runs = Table(
    "runs",
    metadata,
    *_runs_v1_columns(),
    # Version 2, the run's lease (section 6): the node holding the run and until when (wall-clock
    # seconds); NULL in a row written before version 2, which reads as an expired lease.
    Column("owner_node", Text, nullable=True),
    Column("lease_expires", Float, nullable=True),
    # A run.cancel received by a node that does not hold the run: the holder reads it when it
    # renews the lease, and a node taking the run over honours it.
    Column("cancel_requested", Boolean, nullable=False, server_default=false()),
    UniqueConstraint("context_id", "request_id", name="uq_runs_context_request"),
)
_UNFINISHED_RUN: Final = "state NOT IN (" + ", ".join(f"'{s}'" for s in RUN_TERMINAL_STATES) + ")"
# What a takeover scans: the leases of unfinished runs (a few per node), not every run ever made.
RUNS_LEASE_INDEX: Final = Index(
    "ix_runs_unfinished_lease",
    runs.c.lease_expires,
    sqlite_where=text(_UNFINISHED_RUN),
    postgresql_where=text(_UNFINISHED_RUN),
)

# Version 1's runs table as it shipped (migration 1 creates it; version 2 adds the lease columns),
# in a metadata of its own beside a copy of contexts, which its foreign key names.
_v1_metadata = MetaData()
contexts.to_metadata(_v1_metadata)
_runs_v1 = Table(
    "runs",
    _v1_metadata,
    *_runs_v1_columns(),
    UniqueConstraint("context_id", "request_id", name="uq_runs_context_request"),
)

# Version 3, several nodes on one store (section 5, "Several nodes"). A node is alive while its
# heartbeat has not run out (``nodes.expires``, wall-clock seconds); what a dead node held (its
# sockets' connection slots, its contexts' delivery) stops counting as soon as it has.
nodes = Table(
    "nodes",
    metadata,
    Column("node_id", Text, primary_key=True),
    Column("started_at", Float, nullable=False),
    Column("expires", Float, nullable=False),
)
# One row per socket holding a connection slot (section 3: the per-user and per-account limits are
# counted here, across nodes), READY with its context once the socket is (what a context's
# delivery owner reads to know which nodes to relay through).
sessions = Table(
    "sessions",
    metadata,
    Column("session_id", Text, primary_key=True),
    Column("node_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("account_id", Text, nullable=False),
    Column("context_id", Text, nullable=True),
    Column("opened_at", Float, nullable=False),
)
Index("ix_sessions_user", sessions.c.user_id)
Index("ix_sessions_account", sessions.c.account_id)
Index("ix_sessions_context", sessions.c.context_id)
# The node that makes a context's delivery decisions (sends, retries, escalations: section 5), so
# that each happens once in the cluster. Taken by a compare-and-set: free, the taker's own, or
# held by a node whose heartbeat ran out.
delivery_owners = Table(
    "delivery_owners",
    metadata,
    Column("context_id", Text, primary_key=True),
    Column("node_id", Text, nullable=False),
    Column("since", Float, nullable=False),
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
    # below (and the Table objects above updated to match), never edits to this one: the runs
    # table it creates is version 1's own (``_runs_v1``), not today's.
    metadata.create_all(conn, tables=[contexts, events, store_probe], checkfirst=False)
    _v1_metadata.create_all(conn, tables=[_runs_v1], checkfirst=False)


def _migration_2(conn: Connection) -> None:
    # Run leases (section 6): each column as today's Table declares it, rendered for this dialect.
    for name in ("owner_node", "lease_expires", "cancel_requested"):
        spec = CreateColumn(runs.c[name]).compile(dialect=conn.dialect)
        conn.execute(text(f"ALTER TABLE runs ADD COLUMN {spec}"))
    RUNS_LEASE_INDEX.create(conn)


def _migration_3(conn: Connection) -> None:
    # Several nodes (section 6): new tables only, created as today's Table objects declare them.
    metadata.create_all(conn, tables=[nodes, sessions, delivery_owners], checkfirst=False)


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "contexts, events, runs, store_probe", _migration_1),
    Migration(2, "run leases: runs.owner_node, lease_expires, cancel_requested", _migration_2),
    Migration(3, "several nodes: nodes, sessions, delivery_owners", _migration_3),
)
EXPECTED_SCHEMA_VERSION: Final = MIGRATIONS[-1].version

MIGRATION_LOCK_KEY: Final = 0x70697065_70726F6F  # "pipeproo": one advisory lock for all migrators


async def apply_migrations(conn: AsyncConnection, *, dialect: str, pg_schema: str | None) -> list[int]:
    """Apply every pending migration in the caller's (write) transaction; returns the versions applied.

    Migrators serialise on a PostgreSQL advisory transaction lock (SQLite: the write lock taken by
    ``BEGIN IMMEDIATE``), then re-read the version inside the lock, so each step runs exactly once
    however many processes migrate at once.
    """
    if dialect == "postgresql":
        await conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
        if pg_schema is not None:
            await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{pg_schema}"'))
    await conn.run_sync(lambda sync: metadata.create_all(sync, tables=[schema_version_table], checkfirst=True))
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


async def read_schema_version(conn: AsyncConnection) -> int:
    """The applied schema version; 0 for an empty database."""
    exists = await conn.run_sync(lambda sync: inspect(sync).has_table("schema_version"))
    if not exists:
        return 0
    value = (await conn.execute(select(func.max(schema_version_table.c.version)))).scalar()
    return 0 if value is None else int(value)
