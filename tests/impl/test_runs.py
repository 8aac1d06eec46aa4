"""Runs over real sockets (PROTOCOL section 4): ordering, tools, failures, cancel, idempotency,
validation, and the audit log of run and delivery machines replayed against the model."""

# ruff: noqa: F811 - pytest fixtures are imported from runs_harness and used as parameters
from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from pydantic import BaseModel
from runs_harness import (  # noqa: F401 - fixtures
    BACKENDS,
    Client,
    Factory,
    chains,
    metric,
    replay,
    start_runtime,
)

from pipeproof.impl.agents import AgentRequest, FinalAnswer, Step, Thinking, ToolCall
from pipeproof.impl.delivery import DeliveryService
from pipeproof.impl.runs import AgentRuntime
from pipeproof.impl.tools import Tool, ToolOutcome, default_registry
from pipeproof.model.delivery import delivery_machine
from pipeproof.model.run import run_machine

KINDS = ("agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed", "agent_failed")


def well_formed(events: list[dict[str, Any]]) -> None:
    """Section 4: started first, tool pairs matched by tool_call_id, exactly one terminal, last."""
    kinds = [e["event"] for e in events]
    terminal = [k for k in kinds if k in ("agent_completed", "agent_failed")]
    assert len(terminal) == 1 and kinds[-1] == terminal[0], kinds
    if kinds[0] == "agent_started":
        open_call = None
        for e in events[1:-1]:
            if e["event"] == "tool_executing":
                assert open_call is None, kinds
                open_call = e["data"]["tool_call_id"]
            elif e["event"] == "tool_completed":
                assert e["data"]["tool_call_id"] == open_call, kinds
                open_call = None
            else:
                assert e["event"] == "agent_thinking", kinds
        assert open_call is None, kinds
    else:
        assert kinds == ["agent_failed"], kinds


class Boom(Exception):
    pass


class RaisingParams(BaseModel):
    pass


class RaisingTool(Tool):
    name = "explode"
    description = "always raises"
    params = RaisingParams

    async def run(self, params: Any) -> dict[str, Any]:
        raise Boom("kaboom")


class CrashingAgent:
    """Thinks once, then crashes inside the agent."""

    async def steps(self, request: AgentRequest) -> AsyncGenerator[Step, ToolOutcome | None]:
        yield Thinking("about to crash")
        raise RuntimeError("agent bug")


class RunawayAgent:
    """Never answers: only thinks (hits run_max_steps)."""

    async def steps(self, request: AgentRequest) -> AsyncGenerator[Step, ToolOutcome | None]:
        while True:
            yield Thinking("hmm")


class PonderingAgent:
    """Thinks once, then takes a long time inside its own step (no tool involved)."""

    def __init__(self, swallow: bool = False) -> None:
        self.swallow = swallow
        self.interrupted = 0

    async def steps(self, request: AgentRequest) -> AsyncGenerator[Step, ToolOutcome | None]:
        yield Thinking("starting")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.interrupted += 1
            if not self.swallow:
                raise
        yield Thinking("still here")
        yield FinalAnswer("done")


def registry_with_explode() -> Any:
    tools = default_registry()
    tools.register(RaisingTool())
    return tools


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_full_run_is_ordered_seq_1_to_n_and_every_event_acked(start_runtime: Factory) -> None:
    server = start_runtime()
    client = await Client.connect(server)
    accepted = await client.start("r1", "6*7")
    assert accepted["type"] == "run.accepted" and accepted["request_id"] == "r1"
    events = await client.until_terminal(accepted["run_id"])
    assert [e["event"] for e in events] == [
        "agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_thinking", "agent_completed",
    ]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["attempt"] == 1 for e in events)
    assert events[3]["data"]["result"]["value"] == 42 and events[3]["data"]["ok"] is True
    assert events[2]["data"]["tool_call_id"] == events[3]["data"]["tool_call_id"]
    assert "42" in events[-1]["data"]["answer"]
    well_formed(events)
    await asyncio.sleep(0.3)
    assert metric(server, "pipeproof_events_acked_total") == len(events)
    assert metric(server, "pipeproof_events_live") == 0
    assert metric(server, "pipeproof_escalations_total") == 0
    await client.close()


async def test_tool_that_raises_and_tool_with_bad_parameters_end_well_formed(start_runtime: Factory) -> None:
    server = start_runtime(AgentRuntime(tools=registry_with_explode()))
    client = await Client.connect(server)
    run = await client.start("raise", "/explode {}")
    events = await client.until_terminal(run["run_id"])
    well_formed(events)
    completed = next(e for e in events if e["event"] == "tool_completed")
    assert completed["data"]["ok"] is False and completed["data"]["error"]["code"] == "tool_raised"
    assert completed["data"]["error"]["detail"] == "Boom"
    assert events[-1]["event"] == "agent_failed" and events[-1]["data"]["code"] == "tool_error"

    run = await client.start("bad", '/calc {"expression": 12}')
    events = await client.until_terminal(run["run_id"])
    well_formed(events)
    completed = next(e for e in events if e["event"] == "tool_completed")
    assert completed["data"]["error"]["code"] == "invalid_parameters"
    assert events[-1]["data"]["code"] == "tool_error"

    run = await client.start("unsafe", "/calc {\"expression\": \"__import__('os')\"}")
    events = await client.until_terminal(run["run_id"])
    completed = next(e for e in events if e["event"] == "tool_completed")
    assert completed["data"]["error"]["code"] == "tool_error"
    await client.close()


async def test_agent_crash_and_step_limit_end_with_agent_failed(start_runtime: Factory) -> None:
    server = start_runtime(AgentRuntime(agent=CrashingAgent()))
    client = await Client.connect(server)
    run = await client.start("c", "anything")
    events = await client.until_terminal(run["run_id"])
    assert [e["event"] for e in events] == ["agent_started", "agent_thinking", "agent_failed"]
    assert events[-1]["data"]["code"] == "internal"
    await client.close()

    server = start_runtime(AgentRuntime(agent=RunawayAgent()), run_max_steps=3)
    client = await Client.connect(server)
    run = await client.start("loop", "anything")
    events = await client.until_terminal(run["run_id"])
    assert [e["event"] for e in events] == ["agent_started"] + ["agent_thinking"] * 3 + ["agent_failed"]
    assert events[-1]["data"]["code"] == "step_limit"
    await client.close()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_cancel_before_start_gives_one_agent_failed_and_no_agent_started(start_runtime: Factory) -> None:
    server = start_runtime()
    client = await Client.connect(server)
    first = await client.start("slow", '/sleep {"seconds": 0.8}')
    second = await client.start("queued", "hello")
    # Runs of one context execute in order: the second waits ACCEPTED behind the first.
    await client.send({"type": "run.cancel", "run_id": second["run_id"]})
    events_first = await client.until_terminal(first["run_id"])
    events_second = await client.until_terminal(second["run_id"])
    assert events_first[-1]["event"] == "agent_completed"
    assert [e["event"] for e in events_second] == ["agent_failed"]
    assert events_second[0]["data"]["code"] == "cancelled"
    well_formed(events_second)
    # The run machine's log shows the cancel winning: ACCEPTED --cancel--> ACCEPTED --agent_failed--> FAILED.
    lines = chains(server, "run")[second["run_id"]]
    assert [ln["event"] for ln in lines] == ["validate_ok", "cancel", "agent_failed"]
    await client.close()


async def test_cancel_while_running_cancels_the_tool_and_fails_the_run(start_runtime: Factory) -> None:
    server = start_runtime()
    client = await Client.connect(server)
    run = await client.start("long", '/sleep {"seconds": 20}')
    while not any(e["event"] == "tool_executing" for e in client.events):
        await client.next()
    await client.send({"type": "run.cancel", "run_id": run["run_id"]})
    events = await client.until_terminal(run["run_id"], timeout=5)
    well_formed(events)
    completed = next(e for e in events if e["event"] == "tool_completed")
    assert completed["data"]["error"]["code"] == "cancelled"
    assert events[-1]["event"] == "agent_failed" and events[-1]["data"]["code"] == "cancelled"
    # Another user's run (and a run that never existed) answers run_not_found, identically.
    other = await Client.connect(server, "bob")
    await other.send({"type": "run.cancel", "run_id": run["run_id"]})
    mine = await other.reply()
    await other.send({"type": "run.cancel", "run_id": "nope"})
    none = await other.reply()
    assert mine == none == {"type": "error", "code": "run_not_found", "detail": "no such run"}
    await client.close()
    await other.close()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_a_cancel_of_a_finished_run_is_answered_run_finished(start_runtime: Factory) -> None:
    # Section 4: every run.cancel gets an answer, also for a run that has ended (here or on
    # another node), which used to get none.
    server = start_runtime()
    client = await Client.connect(server)
    run = await client.start("done", "hello")
    await client.until_terminal(run["run_id"])
    await asyncio.sleep(0.3)  # its state is stored
    await client.send({"type": "run.cancel", "run_id": run["run_id"]})
    assert await client.reply() == {"type": "error", "code": "run_finished", "detail": "the run has ended (COMPLETED)"}
    other = await Client.connect(server, "bob")  # another user's finished run is not found, as ever
    await other.send({"type": "run.cancel", "run_id": run["run_id"]})
    assert (await other.reply())["code"] == "run_not_found"
    await client.close()
    await other.close()


@pytest.mark.parametrize("swallow", [False, True])
async def test_cancel_interrupts_the_agent_inside_its_step(start_runtime: Factory, swallow: bool) -> None:
    # The cancel reaches the agent at its await (the driver task is cancelled and the
    # cancellation taken back): the run ends at once with agent_failed, and the driver's own
    # later awaits (the append of agent_failed, its delivery) are not cancelled with it. An agent
    # that swallows the cancellation still ends there: the step it produced after the cancel is
    # dropped.
    agent = PonderingAgent(swallow=swallow)
    server = start_runtime(AgentRuntime(agent=agent))
    client = await Client.connect(server)
    run = await client.start("ponder", "anything")
    while not any(e["event"] == "agent_thinking" for e in client.events):
        await client.next()
    await client.send({"type": "run.cancel", "run_id": run["run_id"]})
    events = await client.until_terminal(run["run_id"], timeout=5)
    well_formed(events)
    assert [e["event"] for e in events] == ["agent_started", "agent_thinking", "agent_failed"]
    assert events[-1]["data"]["code"] == "cancelled"
    assert agent.interrupted == 1
    # The socket and the runtime carry on: a second run on the same context completes.
    agent.swallow = True
    second = await client.start("after", "anything")
    while not any(e["event"] == "agent_thinking" and e["run_id"] == second["run_id"] for e in client.events):
        await client.next()
    await client.send({"type": "run.cancel", "run_id": second["run_id"]})
    events = await client.until_terminal(second["run_id"], timeout=5)
    assert [e["event"] for e in events] == ["agent_started", "agent_thinking", "agent_failed"]
    assert agent.interrupted == 2
    await client.close()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_same_request_id_starts_one_run(start_runtime: Factory) -> None:
    server = start_runtime()
    client = await Client.connect(server)
    first = await client.start("same", "hello")
    again = await client.start("same", "hello")
    assert again == first
    second_socket = await Client.connect(server)
    assert await second_socket.start("same", "hello") == first
    await client.until_terminal(first["run_id"])
    await asyncio.sleep(0.3)
    assert sum(1 for e in client.events if e["event"] == "agent_started") == 1
    assert len(chains(server, "run")) == 1
    # After the run finished (and on the same store after a restart) the answer is the same.
    assert await client.start("same", "hello") == first
    await client.close()
    await second_socket.close()


async def test_prerequisites_are_checked_before_anything_starts(start_runtime: Factory) -> None:
    server = start_runtime(max_queued_runs_per_context=1, run_input_max_chars=50)
    client = await Client.connect(server)
    replies = {
        "tool": await client.start("t", "hi", tools=["echo", "teleport"]),
        "empty": await client.start("e", "   "),
        "long": await client.start("l", "x" * 51),
    }
    assert replies["tool"]["code"] == "unknown_tool" and "teleport" in replies["tool"]["detail"]
    assert replies["empty"]["code"] == "invalid_input" and replies["long"]["code"] == "invalid_input"
    assert all(r["type"] == "error" and r["request_id"] for r in replies.values())
    running = await client.start("a", '/sleep {"seconds": 0.5}')
    queued = await client.start("b", "hello")
    over = await client.start("c", "hello")
    assert running["type"] == queued["type"] == "run.accepted"
    assert over["type"] == "error" and over["code"] == "over_capacity"
    await client.until_terminal(queued["run_id"])
    # Memory headroom: above the limit, new runs are refused (and the refusal is retryable).
    state = server.app.state.pipeproof
    state.memory_exceeded = lambda: True
    try:
        refused = await client.start("m", "hello")
    finally:
        del state.memory_exceeded
    assert refused["code"] == "over_capacity" and "memory" in refused["detail"]
    assert (await client.start("m", "hello"))["type"] == "run.accepted"
    assert not any(e["event"] == "agent_started" and e["data"]["request_id"] in "teclm" for e in client.events[:2])
    rejected = [c for c in chains(server, "run").values() if c[0]["event"] == "validate_fail"]
    assert len(rejected) == 5 and all(c[0]["to"] == "REJECTED" and len(c) == 1 for c in rejected)
    await client.close()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_audit_log_of_runs_and_deliveries_replays_on_the_model(start_runtime: Factory) -> None:
    server = start_runtime(AgentRuntime(tools=registry_with_explode()), run_max_steps=64, max_attempts=3,
                           ack_timeout=0.2)
    client = await Client.connect(server)
    ok = await client.start("ok", "1+1\nhello")
    await client.until_terminal(ok["run_id"])
    bad = await client.start("bad", "/explode {}")
    await client.until_terminal(bad["run_id"], ack=False)  # withheld: resends, then escalation
    await asyncio.sleep(0.2 * (1 + 2 + 4) + 0.8)
    runs = chains(server, "run")
    assert len(runs) == 2
    for lines in runs.values():
        replay(run_machine(64), lines)
        assert lines[-1]["to"] in ("COMPLETED", "FAILED")
    deliveries = chains(server, "delivery")
    assert len(deliveries) == len({e["seq"] for e in client.events})
    machine = delivery_machine(3, 1, 1)
    ends = set()
    for lines in deliveries.values():
        replay(machine, lines)
        ends.add(lines[-1]["to"])
    assert ends == {"ACKED", "ESCALATED"}
    await client.close()


def test_delivery_waits_grow_exponentially_with_jitter() -> None:
    from pipeproof.impl.settings import Settings

    settings = Settings(_env_file=None, ack_timeout=1.0, ack_backoff=2.0, ack_timeout_max=5.0, ack_jitter=0.1)  # type: ignore[call-arg]
    service = DeliveryService.__new__(DeliveryService)
    service.settings = settings
    import random

    service._rng = random.Random(1)
    waits = [service.ack_wait(a) for a in (1, 2, 3, 4, 5)]
    for got, base in zip(waits, (1.0, 2.0, 4.0, 5.0, 5.0), strict=True):
        assert base <= got <= base * 1.1
    assert len(set(waits)) == 5


def test_registry_used_by_the_runtime_is_the_default_one() -> None:
    assert AgentRuntime().tools.names() == ["calc", "clock", "echo", "sleep"]
    assert isinstance(ToolCall("echo"), ToolCall) and isinstance(FinalAnswer("x"), FinalAnswer)
