"""Tests for pipeproof.impl.store.stream: the per-context event stream (PROTOCOL section 5), its seqs,
its forward-only states and the hot writes as merged batch statements (append, also ``sent=True``,
mark_sent, ack_through, mark_pending and escalate), over SQLite (always) and PostgreSQL.

Writes issued in one loop turn (``asyncio.gather``) are queued before the writer task runs, so they
share one group; the tests that depend on that check it with a spy rather than assume it.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from store_harness import T0, T_WALL, TTL, Opener, contexts_for, new_context, spy_merge, stored

from pipeproof.errors import LeaseLost
from pipeproof.impl.store import EventState, Store
from pipeproof.protocol import EscalationReason


async def test_twenty_concurrent_appends_get_seqs_without_gaps_or_duplicates(opener: Opener) -> None:
    stores = [await opener(pool_size=5) for _ in range(4)]
    cid = await new_context(stores[0])
    records = await asyncio.gather(
        *(stores[i % 4].append_event(cid, "run-1", "agent_thinking", {"i": i}, T0 + i) for i in range(20))
    )
    assert sorted(r.seq for r in records) == list(range(1, 21))
    assert len({r.event_id for r in records}) == 20
    stream = await stores[1].events_after(cid, 0, limit=100)
    assert [e.seq for e in stream] == list(range(1, 21))
    assert all(e.state is EventState.PENDING and e.attempt == 0 for e in stream)
    info = await stores[2].find_context(cid)
    assert info is not None and info.last_seq == 20


async def test_seqs_are_per_context(store: Store) -> None:
    a = await new_context(store, "alice")
    b = await new_context(store, "bob")
    assert (await store.append_event(a, "r", "agent_started", {}, T0)).seq == 1
    assert (await store.append_event(b, "r", "agent_started", {}, T0)).seq == 1
    assert (await store.append_event(a, "r", "agent_thinking", {}, T0)).seq == 2


async def test_event_record_round_trips_its_payload(store: Store) -> None:
    cid = await new_context(store)
    data = {"tool_call_id": "t1", "ok": False, "nested": {"n": [1, 2.5, None]}, "text": "héllo"}
    rec = await store.append_event(cid, "run-9", "tool_completed", data, T0 + 3)
    assert (rec.context_id, rec.seq, rec.run_id, rec.kind) == (cid, 1, "run-9", "tool_completed")
    assert dict(rec.data) == data
    assert (rec.created_at, rec.updated_at, rec.reason) == (T0 + 3, T0 + 3, None)
    (read,) = await store.events_after(cid, 0)
    assert read == rec
    with pytest.raises(TypeError):
        await store.append_event(cid, "r", "agent_thinking", {"bad": object()}, T0)
    assert len(await store.events_after(cid, 0)) == 1  # the failed append left no trace


async def test_appending_touches_the_context(store: Store) -> None:
    cid = await new_context(store)
    await store.append_event(cid, "r", "agent_thinking", {}, T0 + TTL - 1)
    assert (await store.get_or_create_context("alice", "acme", T0 + 2 * TTL - 2, TTL)).context_id == cid


async def test_ack_is_cumulative_and_monotonic(store: Store) -> None:
    cid = await new_context(store)
    for i in range(6):
        await store.append_event(cid, "r", "agent_thinking", {"i": i}, T0)
    for seq in (1, 2, 3):
        await store.mark_sent(cid, seq, attempt=1)
    # Cumulative: acks SENT and never-sent PENDING events alike, up to and including seq.
    assert await store.ack_through(cid, 2) == [1, 2]
    escalated = await store.escalate(cid, 4, "max_attempts")
    assert escalated.state is EventState.ESCALATED and escalated.reason == "max_attempts"
    # A later cumulative ack skips the escalated one: it never un-escalates.
    assert await store.ack_through(cid, 5) == [3, 5]
    # An older ack moves nothing backwards and acks nothing twice.
    assert await store.ack_through(cid, 1) == []
    assert await store.ack_through(cid, 5) == []
    states = {e.seq: e.state for e in await store.events_after(cid, 0)}
    assert states == {
        1: EventState.ACKED,
        2: EventState.ACKED,
        3: EventState.ACKED,
        4: EventState.ESCALATED,
        5: EventState.ACKED,
        6: EventState.PENDING,
    }
    # Acking beyond the stream acks what exists, nothing more.
    assert await store.ack_through(cid, 1000) == [6]


async def test_terminal_events_do_not_move(store: Store) -> None:
    cid = await new_context(store)
    for _ in range(2):
        await store.append_event(cid, "r", "agent_thinking", {}, T0)
    await store.ack_through(cid, 1)
    await store.escalate(cid, 2, "no_session")
    # ACKED stays ACKED whatever is attempted.
    assert (await store.mark_sent(cid, 1, attempt=2)).state is EventState.ACKED
    assert (await store.escalate(cid, 1, "max_attempts")).state is EventState.ACKED
    assert (await store.mark_pending(cid, 1)).state is EventState.ACKED
    # ESCALATED keeps its first reason and is not resent or acked.
    assert (await store.mark_sent(cid, 2, attempt=3)).state is EventState.ESCALATED
    again = await store.escalate(cid, 2, "send_failed")
    assert (again.state, again.reason) == (EventState.ESCALATED, "no_session")
    assert await store.ack_through(cid, 2) == []


async def test_attempts_never_decrease_and_resends_alternate_sent_and_pending(store: Store) -> None:
    cid = await new_context(store)
    await store.append_event(cid, "r", "agent_thinking", {}, T0)
    sent = await store.mark_sent(cid, 1, attempt=1, now=T0 + 1)
    assert (sent.state, sent.attempt, sent.updated_at) == (EventState.SENT, 1, T0 + 1)
    assert (await store.mark_pending(cid, 1)).state is EventState.PENDING
    assert (await store.mark_sent(cid, 1, attempt=3)).attempt == 3
    stale = await store.mark_sent(cid, 1, attempt=2)  # a racing sender with an older attempt
    assert (stale.state, stale.attempt) == (EventState.SENT, 3)
    with pytest.raises(ValueError):
        await store.mark_sent(cid, 1, attempt=0)
    with pytest.raises(ValueError):
        await store.escalate(cid, 1, "bored")  # type: ignore[arg-type]


async def test_unacked_after_and_escalations(store: Store) -> None:
    cid = await new_context(store)
    for _ in range(5):
        await store.append_event(cid, "r", "agent_thinking", {}, T0)
    await store.mark_sent(cid, 2, attempt=1)
    await store.ack_through(cid, 1)
    await store.escalate(cid, 4, "send_failed")
    assert [e.seq for e in await store.unacked_after(cid, 0)] == [2, 3, 5]
    assert [e.seq for e in await store.unacked_after(cid, 2)] == [3, 5]
    assert [e.seq for e in await store.unacked_after(cid, 0, include_escalated=True)] == [2, 3, 4, 5]
    assert [(e.seq, e.reason) for e in await store.escalations(cid)] == [(4, "send_failed")]
    assert [e.seq for e in await store.events_after(cid, 1, limit=2)] == [2, 3]
    other = await new_context(store, "bob")
    assert await store.escalations(other) == []
    assert await store.events_after(other, 0) == []


async def test_escalate_takes_the_protocols_reason_and_stores_its_wire_string(store: Store) -> None:
    cid = await new_context(store)
    for _ in range(2):
        await store.append_event(cid, "r", "agent_thinking", {}, T0)
    escalated = await store.escalate(cid, 1, EscalationReason.NO_SESSION)
    assert (escalated.state, escalated.reason) == (EventState.ESCALATED, "no_session")
    (read,) = await store.escalations(cid)
    assert read == escalated and type(read.reason) is str
    # The wire string works as well (the store's callers may hold either).
    assert (await store.escalate(cid, 2, "send_failed")).reason == EscalationReason.SEND_FAILED


async def test_append_sent_stores_sent_with_attempt_one(store: Store) -> None:
    (cid,) = await contexts_for(store, 1)
    record = await store.append_event(cid, "run-1", "agent_thinking", {"step": 1}, T_WALL + 1, sent=True)
    assert (record.seq, record.state, record.attempt, record.reason) == (1, EventState.SENT, 1, None)
    assert (record.created_at, record.updated_at) == (T_WALL + 1, T_WALL + 1)
    assert await stored(store, record) == record
    # The caller's send failed: mark_pending keeps attempt 1, so the resend is attempt 2.
    pending = await store.mark_pending(cid, 1, now=T_WALL + 2)
    assert (pending.state, pending.attempt, pending.updated_at) == (EventState.PENDING, 1, T_WALL + 2)
    stale = await store.mark_sent(cid, 1, attempt=1, now=T_WALL + 3)  # not below the stored attempt
    assert (stale.state, stale.attempt) == (EventState.SENT, 1)
    resent = await store.mark_sent(cid, 1, attempt=2, now=T_WALL + 4)
    assert (resent.state, resent.attempt, resent.updated_at) == (EventState.SENT, 2, T_WALL + 4)
    plain = await store.append_event(cid, "run-1", "agent_thinking", {"step": 2}, T_WALL + 5)
    assert (plain.seq, plain.state, plain.attempt) == (2, EventState.PENDING, 0)
    assert await store.ack_through(cid, 2) == [1, 2]


async def test_merged_appends_take_sent_per_item(store: Store) -> None:
    cids = await contexts_for(store, 3)
    sizes = spy_merge(store, "_append_many")
    records = await asyncio.gather(
        *(
            store.append_event(cids[i % 3], "run", "agent_thinking", {"i": i}, T_WALL + i, sent=i % 2 == 0)
            for i in range(12)
        )
    )
    assert sizes == [12]  # one group, one merged append
    for i, record in enumerate(records):
        expected = (EventState.SENT, 1) if i % 2 == 0 else (EventState.PENDING, 0)
        assert (record.state, record.attempt, dict(record.data)) == (*expected, {"i": i})
        assert await stored(store, record) == record
    # SENT-at-append events are acked like any other, and only once.
    assert await store.ack_through(cids[0], 4) == [1, 2, 3, 4]
    assert await store.ack_through(cids[0], 4) == []


async def test_a_group_of_many_and_repeated_contexts_gets_consecutive_seqs_in_queue_order(
    store: Store,
) -> None:
    cids = await contexts_for(store, 7)
    await store.append_event(cids[0], "run", "agent_started", {}, T_WALL)  # cids[0] continues at 2
    rng = random.Random(7)
    order = [rng.choice(cids) for _ in range(120)]  # some contexts many times, in a jumbled order
    sizes = spy_merge(store, "_append_many")
    records = await asyncio.gather(
        *(store.append_event(c, "run", "agent_thinking", {"i": i}, T_WALL + i) for i, c in enumerate(order))
    )
    assert sizes == [120]
    for cid in cids:
        first = 2 if cid == cids[0] else 1
        in_queue_order = [r.seq for r in records if r.context_id == cid]
        assert in_queue_order == list(range(first, first + order.count(cid)))
        info = await store.find_context(cid)
        assert info is not None and info.last_seq == first - 1 + order.count(cid)
        assert info.last_used_at == max(T_WALL + i for i, c in enumerate(order) if c == cid)
    for record in records:
        assert await stored(store, record) == record


async def test_exact_timestamps_survive_every_hot_write(store: Store) -> None:
    # Binary floats as they come from time.time(): stored and returned exactly, never rounded
    # through a decimal text form.
    rng = random.Random(11)
    stamps = [T_WALL + rng.random() * 1e6 for _ in range(5)]
    (cid,) = await contexts_for(store, 1)
    appended = await asyncio.gather(*(store.append_event(cid, "r", "k", {}, stamps[0]) for _ in range(3)))
    assert {r.created_at for r in appended} == {stamps[0]}
    sent = await store.mark_sent(cid, 1, 1, now=stamps[1])
    pending = await store.mark_pending(cid, 1, now=stamps[2])
    escalated = await store.escalate(cid, 2, "max_attempts", now=stamps[3])
    await store.ack_through(cid, 3, now=stamps[4])
    assert (sent.updated_at, pending.updated_at, escalated.updated_at) == tuple(stamps[1:4])
    final = {e.seq: e.updated_at for e in await store.events_after(cid, 0)}
    assert final == {1: stamps[4], 2: stamps[3], 3: stamps[4]}


async def test_repeated_transitions_of_one_event_in_a_group_apply_as_in_queue_order(store: Store) -> None:
    (cid,) = await contexts_for(store, 1)
    for _ in range(3):
        await store.append_event(cid, "r", "agent_thinking", {}, T_WALL)
    sent_sizes = spy_merge(store, "_mark_sent_many")
    # Attempts 3 then 2 for seq 1: the stale 2 changes nothing. 2 then 2 for seq 2: the later stamp.
    sent = await asyncio.gather(
        store.mark_sent(cid, 1, 3, now=T_WALL + 1),
        store.mark_sent(cid, 1, 2, now=T_WALL + 2),
        store.mark_sent(cid, 2, 2, now=T_WALL + 3),
        store.mark_sent(cid, 2, 2, now=T_WALL + 4),
    )
    assert sent_sizes == [4]
    assert [(e.seq, e.attempt, e.updated_at) for e in sent] == [
        (1, 3, T_WALL + 1),
        (1, 3, T_WALL + 1),
        (2, 2, T_WALL + 4),
        (2, 2, T_WALL + 4),
    ]
    escalate_sizes = spy_merge(store, "_escalate_many")
    escalated = await asyncio.gather(
        store.escalate(cid, 1, "send_failed", now=T_WALL + 5), store.escalate(cid, 1, "max_attempts", now=T_WALL + 6)
    )
    assert escalate_sizes == [2]
    assert {(e.state, e.reason, e.updated_at) for e in escalated} == {(EventState.ESCALATED, "send_failed", T_WALL + 5)}
    pending_sizes = spy_merge(store, "_mark_pending_many")
    pending = await asyncio.gather(
        store.mark_pending(cid, 2, now=T_WALL + 7),
        store.mark_pending(cid, 2, now=T_WALL + 8),
        store.mark_pending(cid, 1, now=T_WALL + 9),  # ESCALATED: unchanged
        store.mark_pending(cid, 3, now=T_WALL + 9),  # PENDING already: unchanged
    )
    assert pending_sizes == [4]
    assert [(e.state, e.attempt, e.updated_at) for e in pending] == [
        (EventState.PENDING, 2, T_WALL + 7),
        (EventState.PENDING, 2, T_WALL + 7),
        (EventState.ESCALATED, 3, T_WALL + 5),
        (EventState.PENDING, 0, T_WALL),
    ]


async def test_a_holders_appends_are_stored_only_while_it_holds_the_runs_lease(store: Store) -> None:
    # Section 6: an append made for a node (``holder``) is fenced on the run's lease in the same
    # transaction, so a node whose run was taken over stores nothing more for it.
    cid, other = await contexts_for(store, 2)
    run, _ = await store.create_run(cid, "req", "user-0", T_WALL, owner_node="a", lease_expires=T_WALL + 10)
    (first,) = await store.submit_append_events(cid, [(run.run_id, "agent_started", "{}")], T_WALL, holder="a")
    await store.claim_runs("b", T_WALL + 20, T_WALL + 30)
    with pytest.raises(LeaseLost) as lost:
        await store.submit_append_events(cid, [(run.run_id, "agent_thinking", "{}")], T_WALL + 21, holder="a")
    assert (lost.value.run_ids, lost.value.code) == (frozenset({run.run_id}), "lease_lost")
    # Grouped with other writes: only the fenced one is refused, and it spent no seq.
    sizes = spy_merge(store, "_append_many")
    fenced, theirs, unfenced = await asyncio.gather(
        store.submit_append_events(cid, [(run.run_id, "tool_completed", "{}")], T_WALL + 22, holder="a"),
        store.submit_append_events(cid, [(run.run_id, "agent_failed", "{}")], T_WALL + 22, holder="b"),
        store.submit_append_events(other, [("run-x", "agent_thinking", "{}")], T_WALL + 22),
        return_exceptions=True,
    )
    assert isinstance(fenced, LeaseLost)
    assert not isinstance(theirs, BaseException) and [r.seq for r in theirs] == [first.seq + 1]
    assert not isinstance(unfenced, BaseException) and [r.seq for r in unfenced] == [1]
    assert sizes[0] == 2  # one group (its fenced write left out), then each write alone
    assert [e.kind for e in await store.events_after(cid, 0)] == ["agent_started", "agent_failed"]
    with pytest.raises(LeaseLost):  # a run with no row at all is held by nobody
        await store.submit_append_events(other, [("run-x", "agent_thinking", "{}")], T_WALL, holder="a")
