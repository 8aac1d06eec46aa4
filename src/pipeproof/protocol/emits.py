"""What a transition puts on the wire, typed (docs/model.md, "emits").

Rules:
- a transition's ``emits`` is one of :class:`Send`, :class:`Close`, :class:`Escalate` or
  :class:`Append`, or ``None`` when it writes nothing;
- the server, the conformance oracle, the trace checker and the diagrams read these fields, never
  a text rendering: ``str(emits)`` is only for people (diagram labels, reports);
- a :class:`Close` lists every reason the transition may close with (``auth_reject`` closes with
  whichever section-2 code applies); ``reason`` is the one reason when there is exactly one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .closes import CloseCode, CloseReason
from .names import EscalationReason, EventKind, FrameType


@dataclass(frozen=True)
class Send:
    """A frame of ``frame`` type is written to the socket."""

    frame: FrameType

    def __str__(self) -> str:
        return self.frame.value


@dataclass(frozen=True)
class Close:
    """The socket is closed with one of ``reasons`` (its close frame is the last thing written)."""

    reasons: tuple[CloseReason, ...]
    label: str = ""  # how a family of reasons reads in a diagram ("auth code")

    def __init__(self, *reasons: CloseReason, label: str = "") -> None:
        if not reasons:
            raise ValueError("Close needs at least one reason")
        object.__setattr__(self, "reasons", tuple(reasons))
        object.__setattr__(self, "label", label)

    @classmethod
    def any_of(cls, reasons: Iterable[CloseReason], label: str = "") -> Close:
        return cls(*sorted(reasons, key=lambda r: (int(r.code), r.value)), label=label)

    @property
    def reason(self) -> CloseReason | None:
        """The reason when the transition determines it, else None (the input decides)."""
        return self.reasons[0] if len(self.reasons) == 1 else None

    @property
    def codes(self) -> frozenset[CloseCode]:
        return frozenset(r.code for r in self.reasons)

    def allows(self, code: int, reason: str) -> bool:
        """Whether ``(code, reason)`` observed on the wire is one this transition may send."""
        return any(int(r.code) == code and r.value == reason for r in self.reasons)

    def __str__(self) -> str:
        if len(self.reasons) == 1:
            return f"close {self.reasons[0].describe()}"
        codes = "|".join(str(int(c)) for c in sorted(self.codes))
        return f"close {codes} " + (f"<{self.label}>" if self.label else "|".join(r.value for r in self.reasons))


@dataclass(frozen=True)
class Escalate:
    """The event becomes ESCALATED with ``reason`` (section 5)."""

    reason: EscalationReason

    def __str__(self) -> str:
        return f"escalation {self.reason.value}"


@dataclass(frozen=True)
class Append:
    """The run appends an agent event of ``kind`` to its context's stream (section 4)."""

    kind: EventKind

    def __str__(self) -> str:
        return self.kind.value


Emit = Send | Close | Escalate | Append
