"""Opening the store: URL checks, driver and pool settings, SQLite's pragmas (PROTOCOL section 3,
"several nodes sharing a PostgreSQL store"; Settings: ``PIPEPROOF_STORE_*``).

:func:`open_store` is the one way to build a :class:`~.api.Store`: ``sqlite+aiosqlite`` (the
embedded default: a WAL-mode file several processes may share) or ``postgresql+asyncpg`` (several
nodes sharing one store), with the same statements and the same semantics on both.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Literal, get_args

from sqlalchemy import Connection, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .api import Store
from .hotsql import SQLITE_MIN_VERSION

SqliteSynchronous = Literal["NORMAL", "FULL"]
"""SQLite's ``PRAGMA synchronous`` in WAL mode (``Settings.sqlite_synchronous``)."""


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
        if sqlite3.sqlite_version_info < SQLITE_MIN_VERSION:
            raise ValueError(
                f"SQLite {sqlite3.sqlite_version} is too old for the store: it needs "
                f"{'.'.join(map(str, SQLITE_MIN_VERSION))} or later (UPDATE ... FROM, RETURNING)"
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
