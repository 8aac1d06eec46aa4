"""The wire protocol's facts, in one package that the model, the server, the conformance kit and
the drawings all import (docs/protocol.md; docs/architecture.md).

Rules:
- nothing here does I/O or keeps state: enums, frozen dataclasses and pydantic frame models;
- a protocol fact (a close code, a reason, a frame shape, an event kind) has its only home here:
  the SQL CHECK constraints, the docs' close table and the trace checker's table are rendered
  from these enums, and tests tie every other table to them;
- ``emits`` on a model transition is typed with :mod:`.emits`, never parsed from text.
"""

from __future__ import annotations

from .closes import AUTH_CLOSES, CloseCode, CloseReason, Reaction, close_table_markdown
from .emits import Append, Close, Emit, Escalate, Send
from .names import (
    CLIENT_FRAME_TYPES,
    LIVE_STATES,
    TERMINAL_KINDS,
    TERMINAL_STATES,
    AuthCode,
    DeliveryState,
    ErrorCode,
    EscalationReason,
    EventKind,
    FailureCode,
    FastEnum,
    FrameType,
    Property,
)

__all__ = [
    "AUTH_CLOSES",
    "CLIENT_FRAME_TYPES",
    "LIVE_STATES",
    "TERMINAL_KINDS",
    "TERMINAL_STATES",
    "Append",
    "AuthCode",
    "Close",
    "CloseCode",
    "CloseReason",
    "DeliveryState",
    "Emit",
    "ErrorCode",
    "Escalate",
    "EscalationReason",
    "EventKind",
    "FailureCode",
    "FastEnum",
    "FrameType",
    "Property",
    "Reaction",
    "Send",
    "close_table_markdown",
]
