"""Shared helpers for the store tests (tests/impl/store/): the backends, the clocks, spies.

The fixtures that open stores (``opener``, ``store``) are in tests/impl/store/conftest.py; they
use :func:`drop_schema` to remove each PostgreSQL test's schema.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pipeproof.impl.store import EventRecord, Store

# Two clocks. The contexts/events/runs tests use small round numbers, so their TTL arithmetic
# reads plainly; the hot-write tests use a time.time()-sized stamp, whose binary fraction digits
# must survive every write exactly.
TTL = 60.0
T0 = 1_000.0
TTL_LONG = 3600.0
T_WALL = 1_700_000_000.0

Opener = Callable[..., Awaitable[Store]]


async def new_context(store: Store, user: str = "alice", now: float = T0) -> str:
    return (await store.get_or_create_context(user, "acme", now, TTL)).context_id


async def contexts_for(store: Store, count: int) -> list[str]:
    return [
        (await store.get_or_create_context(f"user-{i}", "acme", T_WALL, TTL_LONG)).context_id for i in range(count)
    ]


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
