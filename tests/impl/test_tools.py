"""Tools and the registry (PROTOCOL section 4): typed registration errors, validated calls, every
failure a ToolOutcome, and a calculator that never evaluates code."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from pipeproof.impl.tools import (
    EchoTool,
    Tool,
    ToolError,
    ToolRegistrationError,
    default_registry,
    execute,
    safe_eval,
)


class NoParams(BaseModel):
    pass


def make_tool(name: str, params: Any = NoParams) -> Tool:
    class T(Tool):
        pass

    T.name = name  # type: ignore[misc]
    T.params = params  # type: ignore[misc]
    return T()


def test_registration_errors_are_typed() -> None:
    registry = default_registry()
    with pytest.raises(ToolRegistrationError) as dup:
        registry.register(EchoTool())
    assert dup.value.code == "duplicate_name"
    for bad in (make_tool("Bad Name"), make_tool("ok", params=dict), make_tool("")):
        with pytest.raises(ToolRegistrationError) as exc:
            registry.register(bad)
        assert exc.value.code == "invalid_schema"
    assert registry.names() == ["calc", "clock", "echo", "sleep"]
    assert registry.schemas()["calc"]["properties"]["expression"]["type"] == "string"


@pytest.mark.parametrize(
    ("expression", "value"),
    [("1+2*3", 7), ("(1+2)*3", 9), ("-2**2", -4), ("7//2", 3), ("7%3", 1), ("1/4", 0.25), ("+5", 5), ("2**10", 1024)],
)
def test_safe_eval_computes_arithmetic(expression: str, value: float) -> None:
    assert safe_eval(expression) == value


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("__import__('os').system('true')", "not_allowed"),
        ("a + 1", "not_allowed"),
        ("True + 1", "not_allowed"),
        ("'x' * 3", "not_allowed"),
        ("[1][0]", "not_allowed"),
        ("1 if 1 else 2", "not_allowed"),
        ("1 +", "syntax"),
        ("1/0", "division_by_zero"),
        ("9**999", "too_large"),
        ("(2**64)**64", "too_large"),
        ("1e308*10", "too_large"),
        ("+".join(["1"] * 80), "too_large"),
        ("-" * 40 + "1", "too_large"),
        ("1" * 201, "too_large"),
    ],
)
def test_safe_eval_refuses_everything_else(expression: str, reason: str) -> None:
    with pytest.raises(ToolError) as exc:
        safe_eval(expression)
    assert exc.value.reason == reason


class Boom(Tool):
    name = "boom"
    params = NoParams

    async def run(self, params: Any) -> dict[str, Any]:
        raise KeyError("inside")


async def test_every_way_a_call_ends_is_an_outcome() -> None:
    registry = default_registry()
    registry.register(Boom())
    ok = await execute(registry, "calc", {"expression": "2+2"})
    assert ok.ok and ok.result["value"] == 4 and ok.as_data() == {"ok": True, "result": dict(ok.result)}
    cases = {
        "invalid_parameters": await execute(registry, "calc", {"expression": 5}),
        "unknown_tool": await execute(registry, "nope", {}),
        "tool_error": await execute(registry, "calc", {"expression": "1/0"}),
        "tool_raised": await execute(registry, "boom", {}),
        "tool_timeout": await execute(registry, "sleep", {"seconds": 1}, timeout=0.05),
    }
    for code, outcome in cases.items():
        assert not outcome.ok and outcome.code == code, (code, outcome)
        assert outcome.as_data()["error"]["code"] == code
    extra = await execute(registry, "echo", {"text": "x", "evil": 1})
    assert extra.code == "invalid_parameters"  # unknown parameters are refused, not ignored
    not_allowed = await execute(registry, "echo", {"text": "x"}, allowed=["calc"])
    assert not_allowed.code == "unknown_tool"
    assert (await execute(registry, "clock", {})).result["unix"] > 0
