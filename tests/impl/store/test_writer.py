"""Tests for pipeproof.impl.store.writer: group commit. Writes issued in one loop turn share a
transaction, every caller gets what a write of its own would have returned, a refused write fails
alone, and close() commits what is queued (PROTOCOL section 5: stored before sent).

Writes issued in one loop turn (``asyncio.gather``) are queued before the writer task runs, so they
share one group; the tests that depend on that check it with a spy rather than assume it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy.exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncTransaction
from store_harness import T0, T_WALL, Opener, contexts_for, new_context

from pipeproof.errors import StoreIntegrityError, StoreRollbackFailed, StoreUnavailable
from pipeproof.impl.store import EventRecord, EventState, Store


async def test_failed_rollback_is_store_rollback_failed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_rollback(self: AsyncTransaction) -> None:
        raise sa_exc.OperationalError("ROLLBACK", {}, Exception("disk I/O error"))

    monkeypatch.setattr(AsyncTransaction, "rollback", broken_rollback)
    with pytest.raises(StoreRollbackFailed) as err:
        await store.append_event("no-such-context", "r", "agent_started", {}, T0)
    assert err.value.operation == "append_event"
    assert "disk I/O error" in err.value.detail
    assert "no context 'no-such-context'" in err.value.detail  # the failure that needed the rollback
    assert isinstance(err.value.__cause__, sa_exc.OperationalError)


async def test_group_commit_merges_concurrent_writes_and_each_caller_gets_its_own_result(
    store: Store,
) -> None:
    # Writes issued in one loop turn share a transaction (merged by kind); every caller still gets
    # exactly what a write of its own would have returned.
    a, b = await new_context(store, "alice"), await new_context(store, "bob")
    appended = await asyncio.gather(
        *(store.append_event(c, "r", "agent_thinking", {"i": i}, T0 + i) for i in range(5) for c in (a, b))
    )
    assert sorted((e.context_id, e.seq) for e in appended) == sorted(
        (c, s) for c in (a, b) for s in range(1, 6)
    )
    for record in appended:
        (stored,) = [e for e in await store.events_after(record.context_id, record.seq - 1, 1)]
        assert stored == record  # the merged insert returns what a read gives back
    sent = await asyncio.gather(*(store.mark_sent(c, s, 1) for c in (a, b) for s in (1, 2, 3)))
    assert [(e.state, e.attempt) for e in sent] == [(EventState.SENT, 1)] * 6
    # Two acks of one context in one group: as if applied one after the other, in seq order.
    acks = await asyncio.gather(store.ack_through(a, 4), store.ack_through(a, 2), store.ack_through(b, 1))
    assert list(acks) == [[3, 4], [1, 2], [1]]
    assert [e.seq for e in await store.unacked_after(a, 0)] == [5]
    assert [e.seq for e in await store.unacked_after(b, 0)] == [2, 3, 4, 5]


async def test_a_refused_write_fails_alone_and_the_rest_of_its_group_commits(store: Store) -> None:
    a = await new_context(store, "alice")
    results = await asyncio.gather(
        store.append_event(a, "r", "agent_thinking", {}, T0),
        store.append_event("no-such-context", "r", "agent_thinking", {}, T0),
        store.mark_sent(a, 99, 1),
        store.append_event(a, "r", "agent_thinking", {}, T0),
        return_exceptions=True,
    )
    assert isinstance(results[1], StoreIntegrityError) and results[1].operation == "append_event"
    assert isinstance(results[2], StoreIntegrityError) and results[2].operation == "mark_sent"
    assert sorted(r.seq for r in results if not isinstance(r, BaseException)) == [1, 2]
    assert [e.seq for e in await store.events_after(a, 0)] == [1, 2]


async def test_writes_after_close_are_refused_and_queued_ones_commit_first(opener: Opener) -> None:
    store = await opener()
    a = await new_context(store, "alice")
    pending = [asyncio.ensure_future(store.append_event(a, "r", "agent_thinking", {}, T0)) for _ in range(3)]
    await asyncio.sleep(0)
    await store.close()
    assert sorted(r.seq for r in await asyncio.gather(*pending)) == [1, 2, 3]
    with pytest.raises(StoreUnavailable):
        await store.append_event(a, "r", "agent_thinking", {}, T0)


async def test_mixed_group_with_refused_writes_falls_back_and_the_rest_succeed(store: Store) -> None:
    a, b = await contexts_for(store, 2)
    for cid in (a, b):
        for _ in range(3):
            await store.append_event(cid, "r", "agent_thinking", {}, T_WALL)
    together: list[int] = []
    alone: list[str] = []
    real_together, real_alone = store._commit_together, store._commit_alone

    async def spy_together(live: list[Any], held: Any) -> None:
        together.append(len(live))
        await real_together(live, held)

    async def spy_alone(w: Any, held: Any) -> None:
        alone.append(w.operation)
        await real_alone(w, held)

    store._commit_together = spy_together  # type: ignore[method-assign]
    store._commit_alone = spy_alone  # type: ignore[method-assign]
    results = await asyncio.gather(
        store.append_event(a, "r", "agent_thinking", {"n": 1}, T_WALL + 1),
        store.append_event("no-such-context", "r", "agent_thinking", {}, T_WALL + 1),
        store.mark_sent(a, 1, 1, now=T_WALL + 2),
        store.append_event(b, "r", "agent_thinking", {"n": 2}, T_WALL + 1, sent=True),
        store.mark_pending(b, 99, now=T_WALL + 3),
        store.ack_through(b, 2, now=T_WALL + 4),
        store.escalate(a, 2, "no_session", now=T_WALL + 5),
        store.ack_through("no-such-context", 5),  # acks nothing: not a refusal
        store.append_event(a, "r", "agent_thinking", {"n": 3}, T_WALL + 1),
        return_exceptions=True,
    )
    # One group, refused, rolled back; every write then committed in its own transaction.
    assert together == [len(results)]
    assert len(alone) == len(results)
    appended_a1, unknown_ctx, sent, appended_b, unknown_event, acked, escalated, no_ack, appended_a2 = results
    assert isinstance(unknown_ctx, StoreIntegrityError) and unknown_ctx.operation == "append_event"
    assert isinstance(unknown_event, StoreIntegrityError) and unknown_event.operation == "mark_pending"
    assert isinstance(appended_a1, EventRecord) and isinstance(appended_a2, EventRecord)
    assert (appended_a1.seq, appended_a2.seq) == (4, 5)  # in queue order, no gap from the refusal
    assert isinstance(appended_b, EventRecord)
    assert (appended_b.seq, appended_b.state, appended_b.attempt) == (4, EventState.SENT, 1)
    assert isinstance(sent, EventRecord) and (sent.state, sent.attempt) == (EventState.SENT, 1)
    assert acked == [1, 2]
    assert isinstance(escalated, EventRecord) and (escalated.state, escalated.reason) == (
        EventState.ESCALATED,
        "no_session",
    )
    assert no_ack == []
    states_a = [(e.seq, e.state) for e in await store.events_after(a, 0)]
    assert states_a == [
        (1, EventState.SENT),
        (2, EventState.ESCALATED),
        (3, EventState.PENDING),
        (4, EventState.PENDING),
        (5, EventState.PENDING),
    ]
    states_b = [(e.seq, e.state) for e in await store.events_after(b, 0)]
    assert states_b == [(1, EventState.ACKED), (2, EventState.ACKED), (3, EventState.PENDING), (4, EventState.SENT)]
