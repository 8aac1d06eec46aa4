"""Delivery over real sockets (PROTOCOL section 5): resends, escalation, resume, fan-out, the
HTTP stream, and a slow reader (section 6 back-pressure)."""

# ruff: noqa: F811 - pytest fixtures are imported from runs_harness and used as parameters
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator

import psutil
import pytest
from runs_harness import (  # noqa: F401 - fixtures
    BACKENDS,
    Client,
    Factory,
    chains,
    http_get,
    metric,
    replay,
    start_runtime,
    token,
)
from server_harness import RawClient, init_frame

from pipeproof.impl.agents import AgentRequest, FinalAnswer, Step, Thinking
from pipeproof.impl.runs import AgentRuntime
from pipeproof.impl.tools import ToolOutcome
from pipeproof.model.delivery import delivery_machine


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_withheld_acks_resend_same_seq_with_growing_attempt_then_escalate(start_runtime: Factory) -> None:
    server = start_runtime(ack_timeout=0.15, max_attempts=3, ack_backoff=2.0)
    client = await Client.connect(server)
    run = await client.start("r", "hello")
    await client.until_terminal(run["run_id"], ack=False)
    n = max(e["seq"] for e in client.events)
    # Every event goes out max_attempts times (attempt 1, 2, 3), then is escalated.
    async with asyncio.timeout(5):
        while len(client.events) < 3 * n:
            await client.next()
    by_seq: dict[int, list[int]] = {}
    for e in client.events:
        by_seq.setdefault(e["seq"], []).append(e["attempt"])
    assert by_seq == {s: [1, 2, 3] for s in range(1, n + 1)}
    first = {e["seq"]: e["event_id"] for e in client.events if e["attempt"] == 1}
    assert all(first[e["seq"]] == e["event_id"] for e in client.events)  # the same event, resent
    await asyncio.sleep(0.15 * 4 + 0.5)
    body = http_get(server, "/v1/escalations").json()
    assert [e["seq"] for e in body["escalations"]] == list(range(1, n + 1))
    assert {e["reason"] for e in body["escalations"]} == {"max_attempts"}
    assert {e["attempt"] for e in body["escalations"]} == {3}
    assert metric(server, 'pipeproof_escalations_total{reason="max_attempts"}') == n
    stream = http_get(server, "/v1/events?after=0").json()
    assert {e["state"] for e in stream["events"]} == {"ESCALATED"}
    machine = delivery_machine(3, 1, 1)
    for lines in chains(server, "delivery").values():
        replay(machine, lines)
        assert [ln["event"] for ln in lines] == ["send", "tick", "ack_timeout"] * 2 + ["send", "tick", "ack_timeout"]
        assert lines[-1]["to"] == "ESCALATED"
    # An escalated event is never sent again, even if acked late.
    await client.ack(n)
    await asyncio.sleep(0.3)
    assert len(client.events) == 3 * n
    await client.close()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_drop_mid_run_then_resume_loses_nothing_and_resends_nothing_acked(start_runtime: Factory) -> None:
    server = start_runtime(ack_timeout=1.0)
    first = await Client.connect(server)
    run = await first.start("r", '/sleep {"seconds": 0.6}\nhello')
    while not any(e["event"] == "tool_executing" for e in first.events):
        await first.next()
    seen = max(e["seq"] for e in first.events)
    await first.ack(seen - 1)  # the last one received is not acked
    await asyncio.sleep(0.1)
    first.ws.transport.abort()  # dropped, no close handshake
    await asyncio.sleep(1.0)  # the run goes on while nobody is connected
    second = await Client.connect(server, resume=seen - 1)
    assert second.connection_ack["recovered"] is True
    assert second.connection_ack["last_seq"] >= seen
    events = await second.until_terminal(run["run_id"])
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seen, seqs[-1] + 1)), seqs  # in order, nothing missing, nothing acked
    kinds = [e["event"] for e in first.events[: seen - 1]] + [e["event"] for e in events]
    assert kinds == [
        "agent_started", "agent_thinking", "tool_executing", "tool_completed",
        "tool_executing", "tool_completed", "agent_thinking", "agent_completed",
    ]
    await asyncio.sleep(0.3)
    stream = http_get(server, "/v1/events?after=0").json()
    assert [e["state"] for e in stream["events"]] == ["ACKED"] * len(kinds)
    assert metric(server, "pipeproof_escalations_total") == 0
    await second.close()


async def test_resume_acks_through_last_seq(start_runtime: Factory) -> None:
    server = start_runtime(ack_timeout=5.0)
    first = await Client.connect(server)
    run = await first.start("r", "hello")
    await first.until_terminal(run["run_id"], ack=False)
    last = first.events[-1]["seq"]
    await first.close()
    second = await Client.connect(server, resume=last)
    await asyncio.sleep(0.5)
    assert second.events == [] and not second.frames  # everything was acked by the resume
    stream = http_get(server, "/v1/events?after=0").json()
    assert {e["state"] for e in stream["events"]} == {"ACKED"}
    # An ack beyond what was delivered acks only what exists.
    await second.ack(10_000)
    await second.close()


async def test_no_session_within_resume_window_escalates_no_session(start_runtime: Factory) -> None:
    server = start_runtime(resume_window=0.5)
    client = await Client.connect(server)
    run = await client.start("r", '/sleep {"seconds": 0.3}')
    await client.close()  # gone before the events are written
    await asyncio.sleep(2.0)
    body = http_get(server, "/v1/escalations").json()
    assert body["escalations"], body
    assert {e["reason"] for e in body["escalations"]} == {"no_session"}
    assert {e["run_id"] for e in body["escalations"]} == {run["run_id"]}
    assert metric(server, 'pipeproof_escalations_total{reason="no_session"}') == len(body["escalations"])
    # The escalation list pages like the stream: after and limit, in seq order.
    seqs = [e["seq"] for e in body["escalations"]]
    assert len(seqs) >= 2 and seqs == sorted(seqs)
    first = http_get(server, "/v1/escalations?limit=1").json()
    assert [e["seq"] for e in first["escalations"]] == seqs[:1] and first["next_after"] == seqs[0]
    rest = http_get(server, f"/v1/escalations?after={seqs[0]}").json()
    assert [e["seq"] for e in rest["escalations"]] == seqs[1:]
    assert http_get(server, "/v1/escalations?limit=0").status_code == 400
    # Escalated events stay readable on the stream and are never delivered to a later session.
    later = await Client.connect(server)
    await asyncio.sleep(0.3)
    assert later.events == []
    stream = http_get(server, "/v1/events?after=0").json()
    assert [e["seq"] for e in stream["events"]] == list(range(1, len(stream["events"]) + 1))
    await later.close()


async def test_fan_out_to_every_session_and_ack_from_any(start_runtime: Factory) -> None:
    server = start_runtime(ack_timeout=0.3, max_attempts=2)
    a = await Client.connect(server)
    b = await Client.connect(server)
    bob = await Client.connect(server, "bob")
    run = await a.start("r", "hello")
    events_b = await b.until_terminal(run["run_id"])  # only b acks
    events_a = await a.until_terminal(run["run_id"], ack=False)
    assert [e["seq"] for e in events_a] == [e["seq"] for e in events_b]
    await asyncio.sleep(0.9)  # past the ack timeout: nothing is resent, the acks from b counted
    assert len(a.events) == len(events_a) and len(b.events) == len(events_b)
    assert bob.events == []  # another user's socket never sees the stream
    assert metric(server, "pipeproof_escalations_total") == 0
    for c in (a, b, bob):
        await c.close()


async def test_http_stream_auth_and_isolation(start_runtime: Factory) -> None:
    server = start_runtime(disabled_users=["mallory"])
    client = await Client.connect(server)
    run = await client.start("r", "hello")
    events = await client.until_terminal(run["run_id"])
    await asyncio.sleep(0.2)
    page = http_get(server, "/v1/events?after=2&limit=2").json()
    assert [e["seq"] for e in page["events"]] == [3, 4] and page["next_after"] == 4
    assert page["context_id"] == client.connection_ack["context_id"]
    assert page["last_seq"] == len(events)
    cases = {
        "missing": http_get(server, "/v1/events", user=None),
        "malformed": http_get(server, "/v1/events", auth="Bearer nope"),
        "disabled": http_get(server, "/v1/events", user="mallory"),
        "bad_after": http_get(server, "/v1/events?after=x"),
        "negative": http_get(server, "/v1/events?after=-1"),
        "bad_limit": http_get(server, "/v1/events?limit=0"),
    }
    got = {k: (r.status_code, r.json()["error"]["code"]) for k, r in cases.items()}
    assert got == {
        "missing": (401, "token_missing"),
        "malformed": (401, "token_malformed"),
        "disabled": (403, "user_disabled"),
        "bad_after": (400, "invalid_query"),
        "negative": (400, "invalid_query"),
        "bad_limit": (400, "invalid_query"),
    }
    # bob sees only his own (empty) stream; alice's context is answered like a missing one.
    assert http_get(server, "/v1/events", user="bob").json()["events"] == []
    theirs = http_get(server, f"/v1/events?context_id={page['context_id']}", user="bob")
    missing = http_get(server, "/v1/events?context_id=doesnotexist", user="bob")
    assert (theirs.status_code, theirs.json()) == (missing.status_code, missing.json())
    assert theirs.status_code == 404
    assert http_get(server, "/v1/escalations", user="bob").json()["escalations"] == []
    await client.close()


class FloodAgent:
    """Emits many large thinking events (a slow reader's nightmare)."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size

    async def steps(self, request: AgentRequest) -> AsyncGenerator[Step, ToolOutcome | None]:
        for i in range(self.count):
            yield Thinking(f"{i:05d}" + "x" * self.size)
        yield FinalAnswer("done")


async def test_slow_reader_is_closed_1013_and_its_events_stay_for_resume(start_runtime: Factory) -> None:
    count = 300
    server = start_runtime(AgentRuntime(agent=FloodAgent(count, 32_000)), send_queue_max=8, run_max_steps=1000,
                           ack_timeout=2.0, heartbeat_interval=30.0)
    reader = RawClient(server.ws_url)  # reads nothing after the handshake
    await reader.connect()
    reader.send_text(init_frame(token(server)))
    await asyncio.sleep(0.3)
    reader.send_text(json.dumps({"type": "run.start", "request_id": "flood", "input": "go"}))
    # The TCP buffers fill, then the server's bounded send queue; the server closes the socket
    # 1013 instead of buffering without bound.
    async with asyncio.timeout(20):
        while 'pipeproof_closes_total{code="1013",reason="try_again_later"}' not in server.metrics():
            await asyncio.sleep(0.1)
    # The reader still reads nothing: the server does not wait on it for ever, it drops the TCP
    # connection within shutdown_grace (+ slack) of the close instead of leaving it ESTABLISHED.
    port = reader.writer.get_extra_info("sockname")[1]

    def server_side_open() -> bool:
        return any(c.laddr and c.raddr and c.laddr.port == server.port and c.raddr.port == port
                   and c.status == psutil.CONN_ESTABLISHED for c in psutil.Process().net_connections("tcp"))

    async with asyncio.timeout(server.settings.shutdown_grace + 5):
        while server_side_open():
            await asyncio.sleep(0.1)
    reader.writer.transport.abort()
    # The events are in the store; a resuming reader gets all of them, in order.
    again = await Client.connect(server, resume=0)
    async with asyncio.timeout(30):
        while not any(e["event"] == "agent_completed" for e in again.events):
            frame = await again.next(10)
            if frame["type"] == "event":
                await again.ack(frame["seq"])
    seqs = sorted({e["seq"] for e in again.events})
    assert seqs == list(range(1, count + 3))
    await asyncio.sleep(0.3)
    assert metric(server, "pipeproof_escalations_total") == 0
    await again.close()
