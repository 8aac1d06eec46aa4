"""Tests for pipeproof.impl.store.engine: open_store's URL checks, SQLite file, pragmas and version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

from pipeproof.impl.store import open_store


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


async def test_unsupported_urls_are_refused() -> None:
    with pytest.raises(ValueError):
        await open_store("mysql+aiomysql://u:p@h/db")
    with pytest.raises(ValueError):
        await open_store("sqlite+aiosqlite:///:memory:")


async def test_old_sqlite_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    with pytest.raises(ValueError, match=r"3\.35"):
        await open_store(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
