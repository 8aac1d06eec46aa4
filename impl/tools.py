"""Tools an agent may call, and the registry that validates them (PROTOCOL section 4).

A :class:`Tool` declares its parameters as a pydantic model (``params``); the registry checks the
declaration when the tool is registered (:class:`ToolRegistrationError`: ``duplicate_name`` or
``invalid_schema``), and :func:`execute` validates the arguments of every call. Whatever happens
inside a call, it ends as a :class:`ToolOutcome` -- ``ok`` with a JSON result, or not ok with an
error code (``invalid_parameters``, ``unknown_tool``, ``tool_error``, ``tool_raised``,
``tool_timeout``) -- which the run turns into one ``tool_completed`` event. A tool failure is data
on the wire, never a crash of the run.

Shipped tools: ``calc`` (a safe arithmetic evaluator: parsed with :mod:`ast`, no ``eval``),
``clock``, ``echo`` and ``sleep`` (for tests and demos).
"""

from __future__ import annotations

import ast
import asyncio
import math
import operator
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeproof.errors import PipeproofError

TOOL_NAME: Final = re.compile(r"^[a-z][a-z0-9_]{0,47}$")

ToolErrorCode = Literal[
    "invalid_parameters", "unknown_tool", "tool_error", "tool_raised", "tool_timeout", "cancelled"
]


class ToolRegistrationError(PipeproofError):
    """A tool could not be registered; ``code`` is ``duplicate_name`` or ``invalid_schema``."""

    def __init__(self, code: Literal["duplicate_name", "invalid_schema"], tool: str, detail: str) -> None:
        self.code = code
        self.tool = tool
        self.detail = detail
        super().__init__(f"tool {tool!r}: {code}: {detail}")


class ToolError(PipeproofError):
    """Raised by a tool for an expected failure (bad input it cannot compute, say): the call ends
    ``ok=false`` with code ``tool_error`` and ``reason`` (a short machine-readable word)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Tool:
    """Base class: set ``name``, ``description`` and ``params``; implement :meth:`run`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[type[BaseModel]]

    async def run(self, params: Any) -> dict[str, Any]:
        """Do the work with validated ``params``; return a JSON-serialisable result."""
        raise NotImplementedError


@dataclass(frozen=True)
class ToolOutcome:
    """How one tool call ended: what ``tool_completed`` carries (section 4)."""

    ok: bool
    result: Mapping[str, Any] = field(default_factory=dict)
    code: ToolErrorCode | None = None
    detail: str = ""

    def as_data(self) -> dict[str, Any]:
        if self.ok:
            return {"ok": True, "result": dict(self.result)}
        return {"ok": False, "error": {"code": self.code, "detail": self.detail}}


class ToolRegistry:
    """Named tools; registration is checked, lookups are exact."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        name = getattr(tool, "name", "")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise ToolRegistrationError("invalid_schema", str(name), f"name must match {TOOL_NAME.pattern}")
        params = getattr(tool, "params", None)
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise ToolRegistrationError(
                "invalid_schema", name, "params must be a pydantic BaseModel subclass"
            )
        try:
            schema = params.model_json_schema()
        except (TypeError, ValueError) as exc:  # pydantic's PydanticUserError is a TypeError
            raise ToolRegistrationError("invalid_schema", name, f"no JSON schema: {exc}") from None
        if schema.get("type") != "object":
            raise ToolRegistrationError("invalid_schema", name, "parameters must be a JSON object")
        if name in self._tools:
            raise ToolRegistrationError("duplicate_name", name, "a tool with this name is registered")
        self._tools[name] = tool

    def get(self, name: str) -> Tool | None:
        """The tool, or None when no tool has that name (a lookup, not a failure)."""
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def unknown(self, names: Iterable[str]) -> list[str]:
        """The names in ``names`` that are not registered (``run.start`` validation)."""
        return [n for n in names if n not in self._tools]

    def schemas(self) -> dict[str, dict[str, Any]]:
        return {n: t.params.model_json_schema() for n, t in sorted(self._tools.items())}


async def execute(
    registry: ToolRegistry,
    name: str,
    arguments: Mapping[str, Any],
    *,
    allowed: Iterable[str] | None = None,
    timeout: float | None = None,
) -> ToolOutcome:
    """Validate and run one call; every way it can end is a :class:`ToolOutcome` (section 4).

    Cancellation of the caller propagates (the run decides what a cancel means).
    """
    tool = registry.get(name)
    if tool is None or (allowed is not None and name not in set(allowed)):
        return ToolOutcome(False, code="unknown_tool", detail=f"no tool {name[:48]!r} available to this run")
    try:
        params = tool.params.model_validate(dict(arguments))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "arguments"
        return ToolOutcome(False, code="invalid_parameters", detail=f"{where}: {first.get('msg', 'invalid')}")
    try:
        async with asyncio.timeout(timeout):
            result = await tool.run(params)
    except ToolError as exc:
        return ToolOutcome(False, code="tool_error", detail=str(exc)[:300])
    except TimeoutError:
        return ToolOutcome(False, code="tool_timeout", detail=f"no result within {timeout}s")
    except Exception as exc:  # noqa: BLE001 - converted to a typed outcome, see below
        # Conversion, not swallowing: a tool's crash becomes tool_completed ok=false with its type,
        # which the user sees; the run goes on to a well-formed terminal event (section 4).
        return ToolOutcome(False, code="tool_raised", detail=type(exc).__name__)
    return ToolOutcome(True, result=result)


# -- shipped tools --------------------------------------------------------------------------------


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalcParams(_Params):
    expression: str = Field(min_length=1, max_length=200)


MAX_NODES: Final = 64
MAX_DEPTH: Final = 16
MAX_INT_BITS: Final = 256
MAX_EXPONENT: Final = 64

_BINARY: Final[dict[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: Final[dict[type[ast.unaryop], Callable[[Any], Any]]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def safe_eval(expression: str) -> int | float:
    """Evaluate arithmetic without ``eval``: numeric literals, ``+ - * / // % **``, unary ``+ -``
    and parentheses only, with bounds on length, nodes, depth, exponents and integer size.
    Raises :class:`ToolError` (``syntax``, ``not_allowed``, ``too_large``, ``division_by_zero``)."""
    if len(expression) > 200:
        raise ToolError("too_large", "expression longer than 200 characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError("syntax", "not an arithmetic expression") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError("too_large", f"more than {MAX_NODES} syntax nodes")
    return _eval(tree.body, 0)


def _check(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError("too_large", f"integer beyond {MAX_INT_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("too_large", "result is not finite")
    return value


def _eval(node: ast.expr, depth: int) -> int | float:
    if depth > MAX_DEPTH:
        raise ToolError("too_large", f"nested deeper than {MAX_DEPTH}")
    if isinstance(node, ast.Constant):
        # bool is an int subclass: True + 1 is not arithmetic on numeric literals.
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ToolError("not_allowed", "only numeric literals")
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_eval(node.operand, depth + 1)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _eval(node.left, depth + 1)
        right = _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > 2**MAX_EXPONENT):
            raise ToolError("too_large", f"exponent beyond {MAX_EXPONENT} or base too large")
        try:
            return _check(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ToolError("division_by_zero", "division by zero") from None
        except OverflowError:
            raise ToolError("too_large", "overflow") from None
    raise ToolError("not_allowed", f"{type(node).__name__} is not allowed")


class CalcTool(Tool):
    name = "calc"
    description = "Evaluate an arithmetic expression (+ - * / // % **, parentheses)."
    params = CalcParams

    async def run(self, params: Any) -> dict[str, Any]:
        assert isinstance(params, CalcParams)
        return {"expression": params.expression, "value": safe_eval(params.expression)}


class ClockParams(_Params):
    pass


class ClockTool(Tool):
    name = "clock"
    description = "The current time (UTC, ISO 8601, and Unix seconds)."
    params = ClockParams

    async def run(self, params: Any) -> dict[str, Any]:
        now = time.time()
        return {"utc": datetime.fromtimestamp(now, UTC).isoformat(), "unix": now}


class EchoParams(_Params):
    text: str = Field(max_length=4096)


class EchoTool(Tool):
    name = "echo"
    description = "Return the text it is given."
    params = EchoParams

    async def run(self, params: Any) -> dict[str, Any]:
        assert isinstance(params, EchoParams)
        return {"text": params.text}


class SleepParams(_Params):
    seconds: float = Field(ge=0, le=30)


class SleepTool(Tool):
    name = "sleep"
    description = "Wait for the given number of seconds (tests and demos)."
    params = SleepParams

    async def run(self, params: Any) -> dict[str, Any]:
        assert isinstance(params, SleepParams)
        await asyncio.sleep(params.seconds)
        return {"slept": params.seconds}


def default_registry() -> ToolRegistry:
    """The shipped tools: calc, clock, echo, sleep."""
    return ToolRegistry([CalcTool(), ClockTool(), EchoTool(), SleepTool()])


__all__ = [
    "CalcTool",
    "ClockTool",
    "EchoTool",
    "SleepTool",
    "Tool",
    "ToolError",
    "ToolOutcome",
    "ToolRegistrationError",
    "ToolRegistry",
    "default_registry",
    "execute",
    "safe_eval",
]
