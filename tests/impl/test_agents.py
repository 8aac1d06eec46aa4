"""The demo agent (PROTOCOL section 4): a deterministic plan that really uses tools."""

from __future__ import annotations

import pytest

from pipeproof.impl.agents import AgentFailed, AgentRequest, DemoAgent, FinalAnswer, Thinking, ToolCall
from pipeproof.impl.tools import ToolOutcome, default_registry, execute

TOOLS = ("calc", "clock", "echo", "sleep")


def request(text: str, tools: tuple[str, ...] = TOOLS) -> AgentRequest:
    return AgentRequest("run-1", "alice", text, tools)


def test_plan_is_deterministic() -> None:
    agent = DemoAgent()
    plan = agent.plan(request('2 * (3 + 4)\nwhat time is it?\n/sleep {"seconds": 0.1}\nhello\n/echo raw text'))
    assert plan == [
        ToolCall("calc", {"expression": "2 * (3 + 4)"}),
        ToolCall("clock", {}),
        ToolCall("sleep", {"seconds": 0.1}),
        ToolCall("echo", {"text": "hello"}),
        ToolCall("echo", {"text": "raw text"}),
    ]
    assert agent.plan(request("2+2", tools=("echo",))) == [ToolCall("echo", {"text": "2+2"})]


async def test_steps_use_the_tools_and_answer() -> None:
    registry = default_registry()
    gen = DemoAgent().steps(request("6*7\nhi"))
    steps = [await gen.asend(None)]
    outcome: ToolOutcome | None = None
    while not isinstance(steps[-1], FinalAnswer):
        step = steps[-1]
        outcome = await execute(registry, step.tool, step.arguments) if isinstance(step, ToolCall) else None
        steps.append(await gen.asend(outcome))
    assert [type(s) for s in steps] == [Thinking, ToolCall, ToolCall, Thinking, FinalAnswer]
    assert steps[-1] == FinalAnswer("6*7 = 42; hi")


async def test_a_failed_tool_fails_the_run_with_tool_error() -> None:
    gen = DemoAgent().steps(request("/calc {}"))
    await gen.asend(None)
    await gen.asend(None)
    with pytest.raises(AgentFailed) as exc:
        await gen.asend(ToolOutcome(False, code="invalid_parameters", detail="expression: missing"))
    assert exc.value.code == "tool_error"
