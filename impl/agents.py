"""The agent interface and the built-in demo agent (PROTOCOL section 4).

An :class:`Agent` turns one run's input into an async generator of steps: :class:`Thinking`,
:class:`ToolCall` and, last, :class:`FinalAnswer`. The run driver (impl/runs.py) sends each tool
call's :class:`~pipeproof.impl.tools.ToolOutcome` back into the generator (``asend``), so an agent
reads its tool results as the value of ``yield``. The driver -- not the agent -- fires the run
machine and appends the events, so an agent cannot emit out of order: a step the machine refuses
ends the run with ``agent_failed``. An agent ends a run early by raising :class:`AgentFailed`
(with a code); any other exception becomes ``agent_failed`` with code ``internal``.

:class:`DemoAgent` is deterministic and really uses tools, so a fresh server is useful at once:

* a line ``/<tool> {json arguments}`` calls that tool with those arguments;
* otherwise an arithmetic line (digits, operators, parentheses) goes to ``calc``, a line asking
  for the time goes to ``clock``, and anything else is echoed through ``echo``.

It thinks once before and once after its tool calls, and fails with ``tool_error`` when a tool
call did not succeed.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

from pipeproof.errors import PipeproofError
from pipeproof.protocol import FailureCode

from .tools import ToolOutcome


@dataclass(frozen=True)
class Thinking:
    """An ``agent_thinking`` event."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """A ``tool_executing`` / ``tool_completed`` pair; the outcome is sent back into the agent."""

    tool: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FinalAnswer:
    """The ``agent_completed`` event: the run's answer."""

    text: str


Step = Thinking | ToolCall | FinalAnswer
StepStream = AsyncGenerator[Step, ToolOutcome | None]


class AgentFailed(PipeproofError):
    """Raised by an agent to end its run with ``agent_failed`` and ``code`` (e.g. ``tool_error``)."""

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)


@dataclass(frozen=True)
class AgentRequest:
    """What an agent is given: the run, its input, and the tools it may call."""

    run_id: str
    user: str
    input: str
    tools: Sequence[str]


@runtime_checkable
class Agent(Protocol):
    """Produces the steps of one run; a new generator per run."""

    def steps(self, request: AgentRequest) -> StepStream: ...


_ARITHMETIC: Final = re.compile(r"^[\d\s.+\-*/%()]+$")
_TOOL_LINE: Final = re.compile(r"^/([a-z][a-z0-9_]*)\s*(.*)$")
_TIME_WORDS: Final = ("time", "clock", "date")


class DemoAgent:
    """A deterministic agent that plans tool calls from its input (see module docstring)."""

    def plan(self, request: AgentRequest) -> list[ToolCall]:
        calls: list[ToolCall] = []
        for raw in request.input.splitlines() or [request.input]:
            line = raw.strip()
            if not line:
                continue
            match = _TOOL_LINE.match(line)
            if match is not None:
                calls.append(ToolCall(match.group(1), _arguments(match.group(2))))
            elif _ARITHMETIC.match(line) and any(c.isdigit() for c in line) and "calc" in request.tools:
                calls.append(ToolCall("calc", {"expression": line}))
            elif any(w in line.lower() for w in _TIME_WORDS) and "clock" in request.tools:
                calls.append(ToolCall("clock", {}))
            else:
                calls.append(ToolCall("echo", {"text": line}))
        return calls

    async def steps(self, request: AgentRequest) -> StepStream:
        calls = self.plan(request)
        yield Thinking(f"Planning {len(calls)} tool call(s) for the input.")
        answers: list[str] = []
        for call in calls:
            outcome = yield call
            if outcome is None or not outcome.ok:
                code = outcome.code if outcome is not None else "none"
                raise AgentFailed(FailureCode.TOOL_ERROR, f"{call.tool} failed: {code}")
            answers.append(_summarise(call, outcome))
        yield Thinking("All tool calls succeeded; composing the answer.")
        yield FinalAnswer("; ".join(answers) if answers else "Nothing to do.")


def _arguments(text: str) -> dict[str, Any]:
    """Arguments of a ``/tool`` line: a JSON object, or (anything else) ``{"text": ...}``."""
    text = text.strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {"text": text}
    return value if isinstance(value, dict) else {"value": value}


def _summarise(call: ToolCall, outcome: ToolOutcome) -> str:
    result = dict(outcome.result)
    if call.tool == "calc":
        return f"{result.get('expression')} = {result.get('value')}"
    if call.tool == "clock":
        return f"it is {result.get('utc')}"
    if call.tool == "echo":
        return str(result.get("text", ""))
    return f"{call.tool}: {json.dumps(result, sort_keys=True, default=str)}"


__all__ = [
    "Agent",
    "AgentFailed",
    "AgentRequest",
    "DemoAgent",
    "FinalAnswer",
    "Step",
    "StepStream",
    "Thinking",
    "ToolCall",
]
