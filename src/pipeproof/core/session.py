"""The session protocol, sans I/O: what one socket's received bytes and timers mean
(docs/protocol.md sections 1, 2, 3 and 6; docs/architecture.md, "the data path of a frame").

Rules:
- :class:`SessionCore` owns no socket, task or clock: the shell feeds it what happened
  (``receive(payload, now)``, ``handshake_failed``, ``ready``, ``timer(now)``, ``peer_gone``...)
  and executes the :data:`Command` values it returns, in order;
- every decision is a transition of the connection machine (model/connection.py), fired here and
  nowhere else; the core never asks "which state am I in" to decide what a frame means, it fires
  the event the input stands for and reads the transition the machine chose;
- every close is the ``Close`` the fired transition declares; a transition whose close depends on
  a fact (``auth_reject``: the auth code) is given that fact, and a close the edge does not declare
  is refused as the server's own bug;
- an :class:`~pipeproof.errors.IllegalTransition` is the server's bug: the core answers it with
  :class:`Illegal` (for the shell to count and log) and the ``internal_error`` edge, never a
  silent continue and never ``invalid_message``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pipeproof.errors import IllegalTransition
from pipeproof.model.connection import Conn
from pipeproof.model.expr import Value
from pipeproof.model.spec import Transition
from pipeproof.protocol import CloseReason
from pipeproof.protocol.frames import (
    Ack,
    ConnectionInit,
    ErrorFrame,
    InvalidMessage,
    RunCancel,
    RunStart,
    parse_client_frame,
)

ClientItem = ConnectionInit | Ack | RunStart | RunCancel | InvalidMessage
Handled = Ack | RunStart | RunCancel


class FiringMachine(Protocol):
    """What the core needs of a connection machine instance (a Runner, or the audited wrapper)."""

    @property
    def state(self) -> Any: ...

    def can(self, event: str, **inputs: Value) -> bool: ...

    def fire(self, event: str, detail: Mapping[str, Any] | None = None, **inputs: Value) -> Transition: ...


# -- commands -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendFrame:
    """Write ``frame`` through the socket's single choke point."""

    frame: ErrorFrame


@dataclass(frozen=True)
class CloseSocket:
    """The machine is CLOSED: write ``close`` as the close frame, or none (``None``: the peer is gone)."""

    close: CloseReason | None


@dataclass(frozen=True)
class BeginHandshake:
    """Authenticate ``init`` and resolve the context; answer with ``ready`` or ``handshake_failed``."""

    init: ConnectionInit | InvalidMessage


@dataclass(frozen=True)
class Handle:
    """Give ``item`` to the frame handler (runs, acks). Acks queued back to back arrive as one."""

    item: Handled
    frames: int  # how many received frames this stands for


@dataclass(frozen=True)
class Illegal:
    """The machine refused an event the core fired: the server's own bug, to count and log."""

    error: IllegalTransition


Command = SendFrame | CloseSocket | BeginHandshake | Handle | Illegal


@dataclass(frozen=True)
class SessionLimits:
    """The settings the core enforces (docs/protocol.md, "Settings")."""

    preready_buffer_bytes: int
    init_timeout: float
    heartbeat_interval: float


@dataclass(frozen=True)
class _Queued:
    item: ClientItem
    size: int


def _type_of(item: ClientItem) -> str:
    return f"invalid:{item.frame_type}" if isinstance(item, InvalidMessage) else item.type


class SessionCore:
    """One socket's protocol state: the connection machine, the frame queue and the timers."""

    def __init__(self, conn: FiringMachine, limits: SessionLimits, now: float) -> None:
        self.conn = conn
        self.limits = limits
        self._queue: deque[_Queued] = deque()
        self._queued_bytes = 0
        self._init_deadline = now + limits.init_timeout
        self.last_heard = now
        self.closed = False

    # -- facts for the shell ------------------------------------------------------------------

    @property
    def state(self) -> Conn:
        state: Conn = self.conn.state
        return state

    def can_read(self) -> bool:
        """False while a READY socket's queue is full: the shell stops reading (TCP back-pressure)
        instead of reading a frame the machine could not take."""
        return self.closed or self.state is not Conn.READY or self.conn.can("recv_frame")

    def next_deadline(self) -> float | None:
        """When :meth:`timer` has something to do (the init deadline, or a silent peer's)."""
        if self.closed:
            return None
        # The machine says which timer can fire now (init_timeout before the init, heartbeat_timeout
        # once READY); the core only keeps the clocks.
        if self.conn.can("init_timeout"):
            return self._init_deadline
        if self.conn.can("heartbeat_timeout"):
            return self.last_heard + 2 * self.limits.heartbeat_interval
        return None

    def read_deadline(self) -> float | None:
        """How long the shell may wait for the next frame: until the init deadline, or for ever."""
        return self._init_deadline if not self.closed and self.conn.can("init_timeout") else None

    # -- inputs -------------------------------------------------------------------------------

    def heard(self, now: float) -> None:
        """The peer showed it is alive (a frame, a pong)."""
        self.last_heard = max(self.last_heard, now)

    def receive(self, payload: str | bytes, now: float) -> list[Command]:
        """One received text or binary frame (Transport; section 1)."""
        if self.closed:
            return []  # after our close frame (RFC 6455 5.5.1): discarded unhandled
        self.heard(now)
        size = len(payload)
        item: ClientItem
        try:
            item = parse_client_frame(payload)
        except InvalidMessage as bad:
            item = bad
        if isinstance(item, ConnectionInit) or (
            isinstance(item, InvalidMessage) and item.frame_type == "connection_init"
        ):
            resume = isinstance(item, ConnectionInit) and item.resume is not None
            out = self._fire("recv_init", {"resume": resume})
            if not self.closed:
                out.append(BeginHandshake(item))
            return out
        # The model counts frames; the byte budget before READY is a fact the machine reads.
        over = self._queued_bytes + size > self.limits.preready_buffer_bytes
        out = self._fire("recv_frame", {"type": _type_of(item), "bytes": size}, over_bytes=over)
        if not self.closed:
            self._queue.append(_Queued(item, size))
            self._queued_bytes += size
        return out

    def handshake_failed(self, event: str, close: CloseReason | None = None,
                         detail: Mapping[str, Any] | None = None) -> list[Command]:
        """Auth, limits or the store refused the init: ``auth_reject``, ``limit_reject`` or ``unavailable``."""
        if self.closed:
            return []
        return self._fire(event, detail, close=close)

    def ready(self, detail: Mapping[str, Any]) -> list[Command]:
        """Token valid and context resolved: READY (the shell queues the ack next)."""
        if self.closed:
            return []
        self.heard(self.last_heard)
        return self._fire("auth_ok", detail)

    def started_heartbeat(self, now: float) -> None:
        """Silence is counted from READY: the time our own auth and store work took is not the peer's."""
        self.heard(now)

    def next_frame(self) -> list[Command]:
        """Handle the oldest queued frame if the machine allows (section 1): its commands, or
        ``[]`` when nothing can be handled now. Acks queued back to back are one ``Handle``."""
        if not self._queue or self.closed or not self.conn.can("handle_frame"):
            return []
        item = self._pop().item
        if isinstance(item, InvalidMessage):
            out = self._fire("handle_invalid", {"type": _type_of(item)})
            if not self.closed:
                out.append(SendFrame(ErrorFrame(code=item.code, detail=item.detail)))
            return out
        if isinstance(item, ConnectionInit):
            # recv_init handles every init: one in the queue is our own bug.
            return self._bug(IllegalTransition("connection", "handle_frame", self.state.name, "init in the queue"))
        out = self._fire("handle_frame", {"type": _type_of(item)})
        frames = 1
        if isinstance(item, Ack):
            # Acks are cumulative (section 5): acks queued right behind this one are handled with
            # it, each its own handle_frame, as one ack of the highest seq.
            while self._queue and isinstance(self._queue[0].item, Ack) and self.conn.can("handle_frame"):
                later = self._pop().item
                out += self._fire("handle_frame", {"type": "ack"})
                frames += 1
                if isinstance(later, Ack) and later.seq > item.seq:
                    item = later
        if not self.closed:
            out.append(Handle(item, frames))
        return out

    def timer(self, now: float) -> list[Command]:
        """The init deadline (4408 init_timeout) and a silent peer (4408 heartbeat_timeout)."""
        if self.closed:
            return []
        if self.conn.can("init_timeout") and now >= self._init_deadline:
            return self._fire("init_timeout", {"after_s": self.limits.init_timeout})
        silent = now - self.last_heard
        if self.conn.can("heartbeat_timeout") and silent >= 2 * self.limits.heartbeat_interval:
            return self._fire("heartbeat_timeout", {"silent_s": round(silent, 3)})
        return []

    def shutdown(self, why: str = "server shutdown") -> list[Command]:
        """Server shutdown (section 6): ``drain`` then ``drain_close`` from READY, else ``shutdown``."""
        if self.closed:
            return []
        if self.conn.can("drain"):
            out = self._fire("drain", {"why": why})
            return out + (self._fire("drain_close") if not self.closed else [])
        if self.conn.can("shutdown"):
            return self._fire("shutdown", {"why": why})
        return self._fire("unavailable", {"why": why})

    def server_close(self, event: str, detail: Mapping[str, Any] | None = None) -> list[Command]:
        """One of the server's own closes: ``slow_consumer``, ``unavailable`` or ``internal_error``."""
        if self.closed:
            return []
        return self._fire(event, detail)

    def send_failed(self, detail: Mapping[str, Any]) -> list[Command]:
        """A write failed: the peer is gone (``send_error``; ``peer_close`` where it has no such edge)."""
        if self.closed:
            return []
        return self._fire("send_error" if self.conn.can("send_error") else "peer_close", detail)

    def oversized(self) -> list[Command]:
        """The WebSocket layer refused a frame over ``max_frame_bytes`` (its close is already out)."""
        if self.closed:
            return []
        return self._fire("recv_oversized")

    def bad_framing(self) -> list[Command]:
        """The WebSocket layer failed the connection on a framing error (its close is already out)."""
        if self.closed:
            return []
        return self._fire("recv_bad_framing")

    def peer_gone(self, code: int, reason: str) -> list[Command]:
        """The peer closed or the network dropped: no close frame of ours follows."""
        if self.closed:
            return []
        return self._fire("peer_close", {"peer_code": code, "peer_reason": reason[:60]})

    # -- internals ----------------------------------------------------------------------------

    def _pop(self) -> _Queued:
        queued = self._queue.popleft()
        self._queued_bytes -= queued.size
        return queued

    def _fire(self, event: str, detail: Mapping[str, Any] | None = None, *, close: CloseReason | None = None,
              **inputs: Value) -> list[Command]:
        full: dict[str, Any] = dict(detail or {})
        if close is not None:
            full.update(code=int(close.code), reason=close.value)
        try:
            transition = self.conn.fire(event, full or None, **inputs)
        except IllegalTransition as exc:
            return self._bug(exc)
        if transition.target is not Conn.CLOSED:
            return []
        return self._closed(transition, close)

    def _closed(self, transition: Transition, given: CloseReason | None) -> list[Command]:
        declared = transition.close
        if declared is None:
            chosen: CloseReason | None = None
        elif given is not None:
            if not declared.allows(int(given.code), given.value):
                self.closed = True
                bug = IllegalTransition("connection", transition.event, transition.source.name,
                                        f"{given.describe()} is not a close this edge declares ({declared})")
                return [Illegal(bug), CloseSocket(CloseReason.INTERNAL_ERROR)]
            chosen = given
        elif declared.reason is not None:
            chosen = declared.reason
        else:
            self.closed = True
            bug = IllegalTransition("connection", transition.event, transition.source.name,
                                    f"the edge closes with one of {declared} and no reason was given")
            return [Illegal(bug), CloseSocket(CloseReason.INTERNAL_ERROR)]
        self.closed = True
        self._queue.clear()
        self._queued_bytes = 0
        return [CloseSocket(chosen)]

    def _bug(self, exc: IllegalTransition) -> list[Command]:
        out: list[Command] = [Illegal(exc)]
        if self.closed:
            return out
        if self.conn.can("internal_error"):
            self.conn.fire("internal_error", {"illegal": exc.event})
        self.closed = True
        self._queue.clear()
        self._queued_bytes = 0
        out.append(CloseSocket(CloseReason.INTERNAL_ERROR))
        return out


__all__ = [
    "BeginHandshake",
    "ClientItem",
    "CloseSocket",
    "Command",
    "FiringMachine",
    "Handle",
    "Handled",
    "Illegal",
    "SendFrame",
    "SessionCore",
    "SessionLimits",
]
