"""Every frame of the wire protocol as a pydantic v2 model, and the close-code table (PROTOCOL.md).

This module is the single source for the frame shapes: the reference server parses and serialises
with it, and the JSON Schemas / AsyncAPI document are generated from it.

* client -> server (section 1, 4, 5): :class:`ConnectionInit`, :class:`Ack`, :class:`RunStart`,
  :class:`RunCancel`, joined in the discriminated union :data:`ClientFrame`;
* server -> client: :class:`ConnectionAck`, :class:`EventFrame`, :class:`RunAccepted`,
  :class:`ErrorFrame`, joined in :data:`ServerFrame`.

Every model has a ``Literal`` ``type`` field (the discriminator; dotted names such as
``"run.start"`` are plain literal values) and ignores unknown fields (Transport: "unknown fields
are ignored by both sides"). :func:`parse_client_frame` is the only way the server reads a client
frame: bad JSON, an unknown ``type`` or a schema violation raise :class:`InvalidMessage`, never
return ``None``. Each model carries a ``json_example()`` used in the docs and validated against the
model's JSON Schema by the tests.

The close table lives in :mod:`pipeproof.protocol.closes`, the vocabularies in :mod:`pipeproof.protocol.names`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, TypeAdapter, ValidationError

from pipeproof.errors import ProtocolError

from .closes import CloseReason
from .names import CLIENT_FRAME_TYPES, ID_MAX, SEQ_MAX, TOKEN_MAX, TOOLS_MAX, ErrorCode, EventKind

# Bounded values (docs/protocol.md, "Bad input"): every string a client sends is capped and NUL-free,
# every number is a plain integer in the stores' range (true, 3.0 and 2**63 are refused).
Id = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX, pattern=r"^[^\x00]*$")]
Seq = Annotated[StrictInt, Field(ge=0, le=SEQ_MAX)]


class _Frame(BaseModel):
    """Common configuration: unknown fields are ignored (Transport section), values are immutable."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    example: ClassVar[dict[str, Any]] = {}

    @classmethod
    def json_example(cls) -> dict[str, Any]:
        """A valid example of this frame as it appears on the wire (docs; validated by the tests)."""
        return dict(cls.example)

    def to_wire(self) -> str:
        """The frame as one JSON text frame: aliases used, unset optional fields left out."""
        return self.model_dump_json(by_alias=True, exclude_none=True)


# -- client -> server ---------------------------------------------------------------------------


class Resume(_Frame):
    """``resume`` of ``connection_init``: every seq <= ``last_seq`` is acked (section 5)."""

    last_seq: Seq


class ConnectionInit(_Frame):
    """The first frame of every socket (section 1). ``token`` is a JWT (section 2); a missing token
    is not a schema violation but the auth failure ``token_missing``."""

    type: Literal["connection_init"] = "connection_init"
    token: Annotated[str, StringConstraints(max_length=TOKEN_MAX)] | None = None
    resume: Resume | None = None

    example: ClassVar[dict[str, Any]] = {
        "type": "connection_init",
        "token": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",
        "resume": {"last_seq": 41},
    }


class Ack(_Frame):
    """Cumulative ack of every event with seq <= ``seq`` of the session's context (section 5)."""

    type: Literal["ack"] = "ack"
    seq: Seq

    example: ClassVar[dict[str, Any]] = {"type": "ack", "seq": 42}


class RunStart(_Frame):
    """Start a run (section 4); the same ``request_id`` twice starts one run."""

    type: Literal["run.start"] = Field(default="run.start", alias="type")
    request_id: Id
    input: str
    tools: Annotated[list[Id], Field(max_length=TOOLS_MAX)] | None = None

    example: ClassVar[dict[str, Any]] = {
        "type": "run.start",
        "request_id": "req-1",
        "input": "Summarise my inbox",
        "tools": ["search"],
    }


class RunCancel(_Frame):
    """Cancel a run (section 4); a cancel that arrives before the run starts still applies."""

    type: Literal["run.cancel"] = Field(default="run.cancel", alias="type")
    run_id: Id

    example: ClassVar[dict[str, Any]] = {"type": "run.cancel", "run_id": "run-7f3a"}


ClientFrame = Annotated[ConnectionInit | Ack | RunStart | RunCancel, Field(discriminator="type")]
"""Any frame a client may send (discriminated on ``type``)."""

CLIENT_FRAME_MODELS: Final[tuple[type[_Frame], ...]] = (ConnectionInit, Ack, RunStart, RunCancel)

# -- server -> client ---------------------------------------------------------------------------


class ConnectionAck(_Frame):
    """Sent once the socket is READY, never before (section 1)."""

    type: Literal["connection_ack"] = "connection_ack"
    session_id: str
    context_id: str
    epoch: int = Field(ge=1)
    heartbeat_ms: int = Field(ge=1)
    recovered: bool
    last_seq: int = Field(ge=0)

    example: ClassVar[dict[str, Any]] = {
        "type": "connection_ack",
        "session_id": "5d1c0e9a2b7f4c3e8a6b1d2f3e4a5b6c",
        "context_id": "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        "epoch": 1,
        "heartbeat_ms": 15000,
        "recovered": False,
        "last_seq": 0,
    }


class EventFrame(_Frame):
    """One agent event of the context's durable stream (sections 4 and 5)."""

    type: Literal["event"] = "event"
    seq: int = Field(ge=1)
    event_id: str
    run_id: str
    event: EventKind
    data: dict[str, Any] = Field(default_factory=dict)
    attempt: int = Field(ge=1)

    example: ClassVar[dict[str, Any]] = {
        "type": "event",
        "seq": 3,
        "event_id": "e1b2c3d4",
        "run_id": "run-7f3a",
        "event": "tool_executing",
        "data": {"tool_call_id": "call-1", "tool": "search"},
        "attempt": 1,
    }


class RunAccepted(_Frame):
    """A ``run.start`` passed its prerequisites (section 4)."""

    type: Literal["run.accepted"] = Field(default="run.accepted", alias="type")
    request_id: str
    run_id: str

    example: ClassVar[dict[str, Any]] = {"type": "run.accepted", "request_id": "req-1", "run_id": "run-7f3a"}


class ErrorFrame(_Frame):
    """A frame-level error; the socket stays open (sections 1 and 4)."""

    type: Literal["error"] = "error"
    code: str = Field(min_length=1)
    request_id: str | None = None
    detail: str | None = None

    example: ClassVar[dict[str, Any]] = {
        "type": "error",
        "code": "invalid_message",
        "detail": "unknown frame type 'run.stop'",
    }


ServerFrame = Annotated[ConnectionAck | EventFrame | RunAccepted | ErrorFrame, Field(discriminator="type")]
"""Any frame the server sends (discriminated on ``type``)."""

SERVER_FRAME_MODELS: Final[tuple[type[_Frame], ...]] = (ConnectionAck, EventFrame, RunAccepted, ErrorFrame)

CLIENT_FRAME_ADAPTER: Final[TypeAdapter[ConnectionInit | Ack | RunStart | RunCancel]] = TypeAdapter(
    ClientFrame
)
SERVER_FRAME_ADAPTER: Final[TypeAdapter[ConnectionAck | EventFrame | RunAccepted | ErrorFrame]] = TypeAdapter(
    ServerFrame
)

class CloseRequested(ProtocolError):
    """The server closes the socket with ``close``, a row of the close table (protocol/closes.py)."""

    def __init__(self, close: CloseReason, detail: str = "") -> None:
        super().__init__(close, detail)


class InvalidMessage(ProtocolError):
    """A client frame is not valid JSON, has an unknown ``type`` or violates its schema (section 1).

    ``code`` is the error-frame code (``invalid_message``); ``close_code``/``reason`` are what the
    socket is closed with once the error budget is exhausted. ``frame_type`` is the frame's
    ``type`` when it was a string (so a broken ``connection_init`` can be told apart), else None.
    ``detail`` is safe to send to the peer: it never echoes the frame's values.
    """

    code: Final = ErrorCode.INVALID_MESSAGE

    def __init__(self, detail: str, frame_type: str | None = None) -> None:
        self.frame_type = frame_type
        super().__init__(CloseReason.INVALID_MESSAGE, detail)


_KNOWN_TYPES: Final = frozenset(t.value for t in CLIENT_FRAME_TYPES)


def parse_client_frame(text: str | bytes) -> ConnectionInit | Ack | RunStart | RunCancel:
    """Parse one client text frame (Transport section; section 1 for what a bad one costs).

    Raises :class:`InvalidMessage` for a binary payload that is not UTF-8, bad JSON, a non-object,
    a missing or unknown ``type``, or a schema violation. The detail names the field and the rule,
    never the offending value (it may be a token).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidMessage("frame is not UTF-8 text") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"not JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        # Nesting deep enough to exhaust the decoder's stack: malformed, never a crashed handler.
        raise InvalidMessage("not JSON: nested too deeply") from None
    except ValueError as exc:
        # An integer literal longer than Python converts (sys.get_int_max_str_digits).
        raise InvalidMessage(f"not JSON: {str(exc)[:80]}") from None
    if not isinstance(raw, dict):
        raise InvalidMessage(f"frame must be a JSON object, not {type(raw).__name__}")
    frame_type = raw.get("type")
    if not isinstance(frame_type, str):
        raise InvalidMessage("frame has no string field 'type'")
    if frame_type not in _KNOWN_TYPES:
        raise InvalidMessage(f"unknown frame type {frame_type[:40]!r}", frame_type[:40])
    try:
        return CLIENT_FRAME_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "frame"
        raise InvalidMessage(f"{frame_type}: {where}: {first.get('msg', 'invalid')}", frame_type) from None


def parse_server_frame(text: str | bytes) -> ConnectionAck | EventFrame | RunAccepted | ErrorFrame:
    """Parse a server frame (clients and the conformance kit); raises :class:`InvalidMessage`."""
    try:
        return SERVER_FRAME_ADAPTER.validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "frame"
        raise InvalidMessage(f"server frame: {where}: {first.get('msg', 'invalid')}") from None


__all__ = [
    "CLIENT_FRAME_ADAPTER",
    "CLIENT_FRAME_MODELS",
    "SERVER_FRAME_ADAPTER",
    "SERVER_FRAME_MODELS",
    "Ack",
    "ClientFrame",
    "CloseRequested",
    "ConnectionAck",
    "ConnectionInit",
    "ErrorFrame",
    "EventFrame",
    "InvalidMessage",
    "Resume",
    "RunAccepted",
    "RunCancel",
    "RunStart",
    "ServerFrame",
    "parse_client_frame",
    "parse_server_frame",
]
