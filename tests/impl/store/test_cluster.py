"""Tests for impl/store/cluster.py: node heartbeats, connection slots counted across nodes, one
delivery owner per context, and notifications (PROTOCOL section 3; section 5, "Several nodes").
Each runs on SQLite and, when configured, PostgreSQL, except LISTEN/NOTIFY (PostgreSQL only)."""

from __future__ import annotations

import asyncio

import pytest
from faultproxy import FaultProxy
from pg import PG_URL
from store_harness import T0, new_context

from pipeproof.errors import StoreTimeout, StoreUnavailable
from pipeproof.impl.store import Store, open_store
from pipeproof.impl.store.cluster import advisory_key

TTL = 10.0
postgres_only = pytest.mark.skipif(PG_URL is None, reason="PIPEPROOF_TEST_POSTGRES_URL is not set")


async def alive(store: Store, *node_ids: str, now: float = T0) -> None:
    for node_id in node_ids:
        await store.join_cluster(node_id, now, now + TTL)


async def test_slots_count_every_alive_node_and_the_user_limit_before_the_account(store: Store) -> None:
    await alive(store, "a", "b")
    verdicts = [
        await store.open_session(f"s{i}", ("a", "b")[i % 2], "alice", "acme", T0, max_per_user=3, max_per_account=4)
        for i in range(4)
    ]
    assert verdicts == ["granted", "granted", "granted", "user"]
    assert await store.open_session("s9", "b", "bob", "acme", T0, max_per_user=3, max_per_account=4) == "granted"
    assert await store.open_session("s10", "a", "carol", "acme", T0, max_per_user=3, max_per_account=4) == "account"
    assert await store.count_sessions("alice", "acme", T0) == (3, 4)
    await store.close_session("s0")
    await store.close_session("s0")  # idempotent
    assert await store.count_sessions("alice", "acme", T0) == (2, 3)


async def test_a_dead_nodes_slots_stop_counting_and_are_reaped(store: Store) -> None:
    await alive(store, "a", "b")
    for i, node in enumerate(("a", "a", "b")):
        assert await store.open_session(f"s{i}", node, "alice", "acme", T0, max_per_user=3, max_per_account=9) == (
            "granted")
    # b keeps its heartbeat, a does not: past a's expiry only b's socket counts.
    later = T0 + TTL + 1
    await store.heartbeat("b", later, later + TTL)
    assert await store.count_sessions("alice", "acme", later) == (1, 1)
    assert await store.open_session("s3", "b", "alice", "acme", later, max_per_user=3, max_per_account=9) == "granted"
    assert await store.reap_dead_nodes(later) == 2
    assert await store.alive_nodes(later) == ["b"]
    # A node rejoining under its id lets go of what its previous process held.
    await store.join_cluster("b", later, later + TTL)
    assert await store.count_sessions("alice", "acme", later) == (0, 0)


async def test_slots_taken_at_once_on_two_nodes_never_pass_the_limit(store: Store) -> None:
    await alive(store, "a", "b")
    verdicts = await asyncio.gather(*(
        store.open_session(f"s{i}", ("a", "b")[i % 2], "alice", "acme", T0, max_per_user=5, max_per_account=50)
        for i in range(20)
    ))
    assert verdicts.count("granted") == 5 and set(verdicts) == {"granted", "user"}


async def test_one_owner_per_context_taken_by_compare_and_set(store: Store) -> None:
    await alive(store, "a", "b")
    cid = await new_context(store)
    assert await store.claim_delivery(cid, "a", T0) == "a"
    assert await store.claim_delivery(cid, "b", T0) == "a"  # a is alive: b is told who owns it
    assert await store.claim_delivery(cid, "a", T0 + 1) == "a"  # its own: kept
    assert await store.owned_deliveries("a") == [cid]
    later = T0 + TTL + 1
    await store.heartbeat("b", later, later + TTL)
    assert await store.claim_delivery(cid, "b", later) == "b"  # a died: b takes it
    assert await store.claim_delivery(cid, "a", later) == "b"
    await store.release_delivery([cid], "a")  # not a's: nothing changes
    assert await store.owned_deliveries("b") == [cid]
    await store.leave_cluster("b")
    assert await store.owned_deliveries("b") == [] and await store.alive_nodes(later) == []


async def test_claims_racing_for_one_context_elect_one_owner(store: Store) -> None:
    nodes = [f"n{i}" for i in range(6)]
    await alive(store, *nodes)
    cid = await new_context(store)
    owners = await asyncio.gather(*(store.claim_delivery(cid, n, T0) for n in nodes))
    assert len(set(owners)) == 1 and owners[0] in nodes


async def test_orphaned_deliveries_are_contexts_in_delivery_with_no_alive_owner(store: Store) -> None:
    await alive(store, "a", "b")
    owned, orphan, done = [await new_context(store, u) for u in ("u1", "u2", "u3")]
    for cid in (owned, orphan, done):
        await store.append_event(cid, "run", "agent_started", {}, T0)
    await store.ack_through(done, 1)
    assert await store.claim_delivery(owned, "a", T0) == "a"
    assert await store.orphaned_deliveries(T0) == sorted([orphan])  # nobody owns it
    assert await store.claim_delivery(orphan, "b", T0) == "b"
    assert await store.orphaned_deliveries(T0) == []
    later = T0 + TTL + 1
    await store.heartbeat("a", later, later + TTL)  # b died
    assert await store.orphaned_deliveries(later) == [orphan]
    assert await store.acked_among(done, [1, 2]) == [1] and await store.acked_among(owned, [1]) == []


async def test_advisory_keys_are_stable_signed_64_bit() -> None:
    key = advisory_key("user", "alice")
    assert key == advisory_key("user", "alice") != advisory_key("account", "alice")
    assert -(1 << 63) <= key < 1 << 63


async def test_notify_reaches_a_listener(store: Store) -> None:
    if store.dialect != "postgresql":
        with pytest.raises(ValueError):
            await store.listen("x", lambda p: None, lambda: None, check_every=1, timeout=1)
        await store.notify("x", ["ignored on SQLite"])  # one node: nobody to tell
        return
    got: list[str] = []
    listening = asyncio.Event()
    task = asyncio.create_task(store.listen("pipeproof.test", got.append, listening.set, check_every=0.2, timeout=2))
    await asyncio.wait_for(listening.wait(), 5)
    await store.notify("pipeproof.test", ["e|a|ctx-1", "s|a|ctx-1"])
    async with asyncio.timeout(5):
        while len(got) < 2:
            await asyncio.sleep(0.02)
    assert got == ["e|a|ctx-1", "s|a|ctx-1"]
    # After several liveness checks too: a check must not leave the connection in a transaction,
    # where PostgreSQL would hold every later notification back.
    await asyncio.sleep(0.7)
    await store.notify("pipeproof.test", ["a|b|ctx-2"])
    async with asyncio.timeout(5):
        while len(got) < 3:
            await asyncio.sleep(0.02)
    assert got[2] == "a|b|ctx-2"
    with pytest.raises(ValueError):
        await store.notify("pipeproof.test", ["x" * 8000])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@postgres_only
async def test_a_listener_whose_connection_is_cut_or_stalls_raises_a_store_error() -> None:
    # Through a fault proxy: a cut is seen by the driver, a stall by the liveness query's timeout.
    assert PG_URL is not None
    for fault in ("cut", "stall"):
        with FaultProxy.for_url(PG_URL) as proxy:
            store = await open_store(proxy.route(PG_URL), timeout=2)
            try:
                listening = asyncio.Event()
                task = asyncio.create_task(
                    store.listen("pipeproof.fault", lambda p: None, listening.set, check_every=0.1, timeout=1)
                )
                await asyncio.wait_for(listening.wait(), 5)
                getattr(proxy, fault)()
                with pytest.raises((StoreUnavailable, StoreTimeout)):
                    await asyncio.wait_for(task, 10)
                proxy.restore()
            finally:
                await store.close()
