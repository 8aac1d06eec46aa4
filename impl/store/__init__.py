"""The durable store: contexts, the per-context event stream, runs (PROTOCOL sections 3, 4 and 5).

One async interface, :class:`Store`, over SQLAlchemy 2 async Core, with the same statements for
``sqlite+aiosqlite`` (the embedded default) and ``postgresql+asyncpg`` (several nodes sharing one
store); the per-event writes are plain SQL built once per shape (:mod:`.hotsql`), with the same
semantics on both. The guarantees the protocol needs are made by the database, never by an
in-process lock:

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

The package, one concern a module:

* :mod:`.records`: the dataclasses the store returns, and rows to records;
* :mod:`.schema`: tables, CHECK constraints rendered from the protocol's enums, migrations;
* :mod:`.errors`: driver exceptions to the typed StoreError subclasses;
* :mod:`.hotsql`: the batch SQL of the hot writes, rendered once per shape;
* :mod:`.writer`: the group-commit writer task and its held connection;
* :mod:`.stream`: the event stream's writes (merged per group) and reads;
* :mod:`.api`: :class:`Store`, with contexts, runs, schema and readiness operations;
* :mod:`.engine`: :func:`open_store`, building the engine for SQLite or PostgreSQL.

Import from this package, not from its modules: the names below are the store's interface.
"""

from __future__ import annotations

from pipeproof.protocol import EscalationReason

from .api import ClaimScope, Store
from .cluster import SlotVerdict
from .engine import SqliteSynchronous, open_store
from .records import (
    ESCALATION_REASONS,
    ContextInfo,
    ContextRecord,
    EventRecord,
    EventState,
    RunRecord,
    encode_event_data,
)
from .schema import EXPECTED_SCHEMA_VERSION, MIGRATIONS, RUN_TERMINAL_STATES, Migration

__all__ = [
    "ESCALATION_REASONS",
    "EXPECTED_SCHEMA_VERSION",
    "MIGRATIONS",
    "RUN_TERMINAL_STATES",
    "ClaimScope",
    "ContextInfo",
    "ContextRecord",
    "EscalationReason",
    "EventRecord",
    "EventState",
    "Migration",
    "RunRecord",
    "SlotVerdict",
    "SqliteSynchronous",
    "Store",
    "encode_event_data",
    "open_store",
]
