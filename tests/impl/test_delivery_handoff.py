"""Delivery's appender and acks, driven directly (PROTOCOL section 5: an event is never lost,
never sent before it is durable, and a run's stored events have no gap).

Producers queue events; one appender per stream commits them batch by batch, all or nothing, then
tracks and sends them. A caller cancelled while waiting (a socket closing under its handler) does
not cancel the store write: a committed append is still tracked and sent, a committed ack is still
fired on its machines. These tests run DeliveryService on a real SQLite store, with a recording
session in place of a socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pipeproof.errors import StoreIntegrityError, StoreUnavailable
from pipeproof.impl.audit import AuditWriter
from pipeproof.impl.delivery import DeliveryMetrics, DeliveryService
from pipeproof.impl.handlers import OutboundFrame
from pipeproof.impl.metrics import Metrics
from pipeproof.impl.sender import SendFailed
from pipeproof.impl.settings import Settings
from pipeproof.impl.store import EventState, Store, open_store
from pipeproof.model.delivery import Delivery
from pipeproof.protocol.frames import EventFrame

SECRET = "handoff-test-secret-0123456789-abcdef"


class RecordingSession:
    """A READY session that keeps the frames queued on it."""

    def __init__(self, context_id: str, user: str) -> None:
        self.session_id = "s-1"
        self.user = user
        self.account = "acme"
        self.context_id = context_id
        self.epoch = 1
        self.ready_seq = 0
        self.closed = False
        self.frames: list[EventFrame] = []

    async def wait_room(self, timeout: float) -> None:
        return None

    async def send(self, frame: OutboundFrame) -> None:
        assert isinstance(frame, EventFrame)
        self.frames.append(frame)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[DeliveryService, Store, RecordingSession]]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, env="test", jwt_secret=SECRET, data_dir=tmp_path, ack_timeout=30.0
    )
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    audit = AuditWriter(tmp_path / "audit.jsonl")
    delivery = DeliveryService(settings, store, audit, DeliveryMetrics(Metrics()))
    await delivery.recover()
    context = await store.get_or_create_context("alice", "acme", 1000.0, 3600.0)
    session = RecordingSession(context.context_id, "alice")
    await delivery.session_ready(session, None)  # type: ignore[arg-type]
    try:
        yield delivery, store, session
    finally:
        await delivery.close()
        await store.close()
        audit.close()


async def _until(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def test_a_producer_cancelled_during_its_append_still_gets_its_event_delivered(
    world: tuple[DeliveryService, Store, RecordingSession],
) -> None:
    delivery, store, session = world
    producer = asyncio.create_task(
        delivery.publish(session.context_id, "alice", "run-1", "agent_started", {"n": 1}, durable=True)
    )
    await asyncio.sleep(0)  # the append is queued; its commit has not happened yet
    producer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await producer
    # The write was not withdrawn: it commits, and the appender tracks and sends it.
    await _until(lambda: len(session.frames) == 1)
    assert session.frames[0].seq == 1 and session.frames[0].attempt == 1
    stream = delivery.streams[session.context_id]
    assert stream.live[1].machine.state is Delivery.SENT
    (stored,) = await store.events_after(session.context_id, 0)
    assert stored.state is EventState.SENT and stored.attempt == 1


async def test_an_ack_whose_caller_is_cancelled_is_still_fired_on_the_machines(
    world: tuple[DeliveryService, Store, RecordingSession],
) -> None:
    delivery, store, session = world
    for n in range(3):
        await delivery.publish(session.context_id, "alice", "run-1", "agent_thinking", {"n": n}, durable=True)
    stream = delivery.streams[session.context_id]
    assert [t.machine.state for t in stream.live.values()] == [Delivery.SENT] * 3
    acker = asyncio.create_task(delivery.ack(session, 2))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the ack_through is queued
    acker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acker
    await _until(lambda: list(stream.live) == [3])
    assert not stream.acking
    stored = {e.seq: e.state for e in await store.events_after(session.context_id, 0)}
    assert stored == {1: EventState.ACKED, 2: EventState.ACKED, 3: EventState.SENT}
    # Acks go on working after the hand-off (the stream is not left "acking").
    assert await delivery.ack(session, 3) == [3]  # type: ignore[arg-type]
    assert not stream.live


async def test_acks_of_one_stream_are_coalesced_into_one_store_write_per_round(
    world: tuple[DeliveryService, Store, RecordingSession],
) -> None:
    delivery, store, session = world
    for n in range(5):
        await delivery.publish(session.context_id, "alice", "run-1", "agent_thinking", {"n": n}, durable=True)
    calls: list[int] = []
    submit = store.submit_ack_through

    def counting(context_id: str, seq: int, now: float | None = None) -> asyncio.Future[list[int]]:
        calls.append(seq)
        return submit(context_id, seq, now)

    store.submit_ack_through = counting  # type: ignore[method-assign]
    results = await asyncio.gather(*(delivery.ack(session, seq) for seq in (1, 2, 3, 4, 5)))  # type: ignore[arg-type]
    # The first ack writes through 1; the four that arrive during its commit are covered by one
    # second round through 5. Every seq is acked exactly once, by the caller that wrote it.
    assert calls == [1, 5]
    assert sorted(s for r in results for s in r) == [1, 2, 3, 4, 5]
    assert not delivery.streams[session.context_id].live


async def test_events_queued_together_are_one_all_or_nothing_write_then_sent_in_order(
    world: tuple[DeliveryService, Store, RecordingSession],
) -> None:
    delivery, store, session = world
    writes: list[int] = []
    submit = store.submit_append_events

    def counting(context_id: str, events: Any, now: float, *, sent: bool = False, holder: str | None = None) -> Any:
        writes.append(len(events))
        return submit(context_id, events, now, sent=sent, holder=holder)

    store.submit_append_events = counting  # type: ignore[method-assign]
    for n in range(4):
        assert await delivery.publish(session.context_id, "alice", "run-1", "agent_thinking", {"n": n}) is None
    last = await delivery.publish(session.context_id, "alice", "run-1", "agent_completed", {}, durable=True)
    assert last is not None and last.seq == 5
    # Queued without a commit in between, the five went to the store as one write.
    assert writes == [5]
    assert [(f.seq, f.event, f.attempt) for f in session.frames] == [
        (1, "agent_thinking", 1), (2, "agent_thinking", 1), (3, "agent_thinking", 1),
        (4, "agent_thinking", 1), (5, "agent_completed", 1),
    ]
    assert [f.data.get("n") for f in session.frames[:4]] == [0, 1, 2, 3]


async def test_a_refused_append_drops_what_is_queued_behind_it_and_tells_each_run(
    world: tuple[DeliveryService, Store, RecordingSession],
) -> None:
    delivery, store, session = world
    # A context the store does not know: the batch is refused as a whole (StoreIntegrityError).
    ghost = "no-such-context"
    for n in range(3):
        await delivery.publish(ghost, "alice", "run-x", "agent_thinking", {"n": n})
    other = delivery.publish(ghost, "alice", "run-y", "agent_failed", {"code": "cancelled"}, durable=True)
    with pytest.raises(StoreIntegrityError):
        await other  # a durable publish hears of its own refusal
    # The next step of run-x hears of it once; nothing of either run was stored or sent.
    with pytest.raises(StoreIntegrityError):
        await delivery.publish(ghost, "alice", "run-x", "agent_thinking", {"n": 3})
    assert delivery.metrics.append_failures._value.get() == 4
    assert await store.events_after(session.context_id, 0) == []
    assert session.frames == []
    # Told once: the run's next publish (its agent_failed, say) is queued normally again.
    delivery.check_run(ghost, "run-x")


async def test_unserialisable_data_is_refused_when_queued(
    world: tuple[DeliveryService, Store, RecordingSession],
) -> None:
    delivery, _store, session = world
    with pytest.raises(TypeError):
        await delivery.publish(session.context_id, "alice", "run-1", "agent_thinking", {"bad": object()})
    assert not delivery.streams[session.context_id].outbox


async def test_a_store_failure_after_the_append_reaches_the_producer_and_keeps_the_event(
    world: tuple[DeliveryService, Store, RecordingSession],
) -> None:
    delivery, store, session = world

    async def refuse(frame: OutboundFrame) -> None:
        raise SendFailed("closed", "socket closing")

    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise StoreUnavailable("mark_pending", "database went away")

    # The event is stored SENT (a session was there when it was queued), no session takes the
    # frame, and putting it back to PENDING fails: the durable producer hears of it, and the
    # event stays tracked (PENDING, attempt counted) for the next session or its escalation.
    session.send = refuse  # type: ignore[method-assign]
    store.mark_pending = broken  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        await delivery.publish(session.context_id, "alice", "run-1", "agent_failed", {}, durable=True)
    tracked = delivery.streams[session.context_id].live[1]
    assert tracked.machine.state is Delivery.PENDING and tracked.machine.values["attempt"] == 1
    assert not delivery.streams[session.context_id].outbox
