"""Typed outcomes of the conformance kit: a violation is data, never a swallowed exception.

``Violation`` is what both the live kit and trace-check raise when a server did something the
model does not allow: the property it breaks, what was observed, what the model allowed from the
state it was in, and the client actions (or log lines) that led there. ``KitError`` means the kit
could not run at all (server unreachable, bad arguments); ``TraceUnreadable`` means a trace file is
not a JSONL audit log (exit code 2 of ``pipeproof trace-check``).
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeproof.errors import PipeproofError


class Violation(AssertionError):
    """The server under test did something the model does not allow (docs/conformance.md).

    An ``AssertionError`` so Hypothesis treats it as a failing example and shrinks it.
    """

    def __init__(
        self,
        prop: str,
        observed: str,
        allowed: Sequence[str] = (),
        *,
        where: str = "",
        context: Sequence[str] = (),
    ) -> None:
        self.prop = prop
        self.observed = observed
        self.allowed = tuple(allowed)
        self.where = where
        self.context = tuple(context)
        self.trace: tuple[str, ...] = ()
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.prop}: {self.observed}"]
        if self.where:
            lines.append(f"  at: {self.where}")
        lines.append("  the model allows: " + (", ".join(self.allowed) if self.allowed else "nothing here"))
        for c in self.context:
            lines.append(f"  | {c}")
        if self.trace:
            lines.append("  client actions (shrunk):")
            lines.extend(f"    {i + 1}. {step}" for i, step in enumerate(self.trace))
        return "\n".join(lines)


class KitError(PipeproofError):
    """The kit could not run (server unreachable, refused to start, bad target description)."""


class TraceUnreadable(PipeproofError):
    """A trace line is not an audit-log record: ``line`` is 1-based, ``why`` says what is wrong."""

    def __init__(self, line: int, why: str) -> None:
        self.line = line
        self.why = why
        super().__init__(f"line {line}: {why}")


__all__ = ["KitError", "TraceUnreadable", "Violation"]
