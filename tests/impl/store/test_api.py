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


# -- run leases (section 6, "When a node dies") ---------------------------------------------------


async def test_a_run_is_created_under_its_nodes_lease_and_renewed_only_by_it(store: Store) -> None:
    cid = await new_context(store)
    run, _ = await store.create_run(cid, "req", "alice", T0, owner_node="a", lease_expires=T0 + 10)
    assert (run.owner_node, run.lease_expires, run.cancel_requested, run.finished) == ("a", T0 + 10, False, False)
    # A repeat of the request_id keeps the first run's lease.
    again, created = await store.create_run(cid, "req", "alice", T0 + 1, owner_node="b", lease_expires=T0 + 11)
    assert (created, again.owner_node) == (False, "a")
    assert await store.renew_run_leases("a", [run.run_id, "no-such-run"], T0 + 20) == {run.run_id: False}
    assert await store.renew_run_leases("b", [run.run_id], T0 + 30) == {}  # not b's: nothing renewed
    assert await store.renew_run_leases("a", [], T0 + 30) == {}
    stored = await store.find_run(run.run_id)
    assert stored is not None and (stored.owner_node, stored.lease_expires) == ("a", T0 + 20)
    await store.set_run_state(run.run_id, "COMPLETED", T0 + 2)
    assert await store.renew_run_leases("a", [run.run_id], T0 + 40) == {}  # finished: no lease to renew


async def test_claims_take_expired_own_or_all_unfinished_runs_and_never_the_excluded(store: Store) -> None:
    cid = await new_context(store)

    async def make(req: str, owner: str | None, expires: float | None, state: str = "ACCEPTED") -> str:
        run, _ = await store.create_run(cid, req, "alice", T0, owner_node=owner, lease_expires=expires, state=state)
        return run.run_id

    expired = await make("expired", "a", T0 + 5)
    live = await make("live", "a", T0 + 50)
    legacy = await make("legacy", None, None)  # a row from before leases: no lease at all
    mine_live = await make("mine", "b", T0 + 50)
    mine_expired = await make("mine-expired", "b", T0 + 5)
    done = await make("done", "a", T0 + 5, state="FAILED")
    claimed = await store.claim_runs("b", T0 + 10, T0 + 20, exclude={mine_expired})
    assert {r.run_id for r in claimed} == {expired, legacy}
    assert {(r.owner_node, r.lease_expires) for r in claimed} == {("b", T0 + 20)}
    # What b excluded (it runs it, late to renew) is still expired for another node.
    assert [r.run_id for r in await store.claim_runs("c", T0 + 10, T0 + 20)] == [mine_expired]
    assert await store.claim_runs("d", T0 + 10, T0 + 20) == []  # b and c hold the rest now
    own = await store.claim_runs("b", T0 + 10, T0 + 30, scope="own")
    assert {r.run_id for r in own} == {expired, legacy, mine_live}
    every = await store.claim_runs("c", T0 + 10, T0 + 40, scope="all", exclude=[live])
    assert {r.run_id for r in every} == {expired, legacy, mine_live, mine_expired}
    finished = await store.find_run(done)
    assert finished is not None and (finished.owner_node, finished.finished) == ("a", True)
    with pytest.raises(ValueError):
        await store.claim_runs("c", T0, T0, scope="bogus")  # type: ignore[arg-type]


async def test_two_nodes_claiming_at_once_take_each_expired_run_exactly_once(opener: Opener) -> None:
    # Separate stores (pools), as separate processes: the exclusion must come from the database.
    stores = [await opener(pool_size=3) for _ in range(4)]
    cid = await new_context(stores[0])
    ids = {(await stores[0].create_run(cid, f"r{i}", "alice", T0, owner_node="dead", lease_expires=T0))[0].run_id
           for i in range(40)}
    for _ in range(3):
        results = await asyncio.gather(
            *(s.claim_runs(f"node-{i}", T0 + 10, T0 + 100) for i, s in enumerate(stores))
        )
        taken = [r.run_id for claimed in results for r in claimed]
        assert len(taken) == len(set(taken))  # nobody took a run another node took
        if taken:
            assert set(taken) == ids
    for run_id in ids:
        stored = await stores[0].find_run(run_id)
        assert stored is not None and stored.owner_node != "dead" and stored.lease_expires == T0 + 100


async def test_a_cancel_is_recorded_for_the_holder_and_read_back_when_it_renews(store: Store) -> None:
    cid = await new_context(store)
    run, _ = await store.create_run(cid, "req", "alice", T0, owner_node="a", lease_expires=T0 + 10)
    recorded = await store.record_run_cancel(run.run_id, T0 + 1)
    assert (recorded.cancel_requested, recorded.updated_at) == (True, T0 + 1)
    assert await store.renew_run_leases("a", [run.run_id], T0 + 20) == {run.run_id: True}
    (claimed,) = await store.claim_runs("b", T0 + 30, T0 + 40)
    assert claimed.cancel_requested is True  # a node taking it over sees the cancel too
    await store.set_run_state(run.run_id, "FAILED", T0 + 31)
    other, _ = await store.create_run(cid, "req-2", "alice", T0, owner_node="a", lease_expires=T0 + 10)
    await store.set_run_state(other.run_id, "COMPLETED", T0 + 2)
    left = await store.record_run_cancel(other.run_id, T0 + 3)  # finished: left as it is
    assert (left.cancel_requested, left.state, left.updated_at) == (False, "COMPLETED", T0 + 2)
    with pytest.raises(StoreIntegrityError):
        await store.record_run_cancel("no-such-run")
