"""Tests for pipeproof.impl.store.api (Store): readiness probes, contexts (PROTOCOL section 3) and
runs (section 4), over SQLite (always) and PostgreSQL (PIPEPROOF_TEST_POSTGRES_URL)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from store_harness import T0, TTL, Opener, new_context

from pipeproof.errors import StoreIntegrityError
from pipeproof.impl.store import Store


async def test_readiness_probes(store: Store) -> None:
    assert await store.ping() >= 0.0
    await store.check_writable(now=T0)
    await store.check_writable(now=T0 + 1)  # the probe row is upserted, not duplicated


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
