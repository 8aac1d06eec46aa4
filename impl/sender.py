"""The single choke point that writes to a socket (DESIGN.md, impl/; PROTOCOL sections 1, 5, 6).

Every JSON frame and the close frame of a socket go through one :class:`Sender`:

* ``send(frame)`` serialises with the pydantic model, fires the model event the frame stands for
  (``connection_ack`` -> ``send_ack``; ``event`` -> ``deliver``) *before* queueing it, so the
  machine decides whether the frame may go out at all (nothing before READY, the ack once), and
  appends it to a bounded queue (``send_queue_max``);
* ``close(code, reason)`` queues the close frame behind the frames already queued (flush, then
  close) and refuses further frames;
* one writer task drains the queue in order. A failed write is never swallowed: the writer calls
  ``on_failure`` (the session fires ``send_error`` and tears the socket down) and stops;
* before each data frame the writer flushes the audit log (impl/audit.py), so the lines of the
  transitions behind the frame are in the OS before the peer sees it. When that flush raises
  :class:`~pipeproof.errors.AuditWriteFailed`, no data frame is written: the queued data frames
  are dropped (their events stay in the store and are resent or redelivered on resume), a queued
  close frame is kept, ``on_failure`` hears ``SendFailed("audit")`` once (the session closes
  ``try_again_later``, PROTOCOL section 6), and the writer keeps running to write that
  close frame: a close frame is preceded by a flush too, but goes out even if that flush fails
  (the socket must close either way).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from starlette.websockets import WebSocket, WebSocketDisconnect

from pipeproof.errors import AuditWriteFailed, PipeproofError
from pipeproof.protocol.frames import ConnectionAck, EventFrame

from .audit import TracedMachine
from .handlers import OutboundFrame

log = logging.getLogger("pipeproof.sender")

WRITE_ERRORS: Final = (WebSocketDisconnect, OSError, RuntimeError)
"""What a write to a Starlette WebSocket raises when the peer is gone: WebSocketDisconnect (1006
from uvicorn's ClientDisconnected), OSError (transport), RuntimeError (Starlette refuses to send
after a close)."""


class SendFailed(PipeproofError):
    """A frame could not be queued or written: ``why`` is ``closed``, ``queue_full``, ``write``
    or ``audit`` (the audit log could not be written, so the frame was not sent)."""

    def __init__(self, why: str, detail: str = "") -> None:
        self.why = why
        self.detail = detail
        super().__init__(f"send failed ({why})" + (f": {detail}" if detail else ""))


@dataclass(frozen=True)
class _Close:
    code: int
    reason: str


class Sender:
    """The writer of one socket. ``on_failure`` receives the :class:`SendFailed` of a failed write."""

    def __init__(
        self,
        ws: WebSocket,
        conn: TracedMachine,
        *,
        queue_max: int,
        on_failure: Callable[[SendFailed], None],
    ) -> None:
        self._ws = ws
        self._conn = conn
        self._queue_max = queue_max
        self._on_failure = on_failure
        self._items: deque[str | _Close] = deque()
        self._wake = asyncio.Event()
        self._written = asyncio.Event()  # set after each frame written: room in the queue
        self._closing = False
        self._audit_reported = False  # on_failure heard SendFailed("audit") (told once)
        self.frames_written = 0
        self.close_sent: tuple[int, str] | None = None
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"sender-{conn.instance_id}")

    @property
    def closing(self) -> bool:
        return self._closing

    def send(self, frame: OutboundFrame) -> None:
        """Queue ``frame``; raises SendFailed (``closed`` / ``queue_full``) or IllegalTransition."""
        if self._closing:
            raise SendFailed("closed", f"{frame.type} after close")
        if len(self._items) >= self._queue_max:
            raise SendFailed("queue_full", f"{self._queue_max} frames queued")
        text = frame.to_wire()
        if isinstance(frame, ConnectionAck):
            self._conn.fire("send_ack", {"frame": frame.type})
        elif isinstance(frame, EventFrame):
            self._conn.fire(
                "deliver", {"seq": frame.seq, "attempt": frame.attempt, "event_id": frame.event_id}
            )
        self._items.append(text)
        self._wake.set()

    async def wait_room(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until the queue can take a frame, or the socket is
        closing. A burst (a resume redelivering a backlog) then flows at the reader's pace; a
        reader too slow to make room within ``timeout`` gets ``queue_full`` on the next send."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._closing and len(self._items) >= self._queue_max:
            self._written.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._written.wait(), remaining)
            except TimeoutError:
                return

    def close(self, code: int, reason: str) -> None:
        """Queue the close frame after what is already queued; later frames are refused."""
        if self._closing:
            return
        self._closing = True
        self._items.append(_Close(code, reason))
        self._wake.set()

    def abandon(self) -> None:
        """The peer is gone: drop what is queued (delivery keeps events pending) and stop."""
        self._closing = True
        self._items.clear()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._items:
                item = self._items.popleft()
                if isinstance(item, _Close):
                    self.close_sent = (item.code, item.reason)
                    try:
                        # As for a data frame, the line of the closing transition goes first.
                        # If the log cannot take it, the socket closes anyway: the failure is
                        # already the writer's state (readiness 503, logged once), and the line
                        # stays held in order for when the log works again.
                        self._conn.audit.flush()
                    except AuditWriteFailed:
                        log.info("close %s %s written before its audit line (log failing)", item.code, item.reason)
                    try:
                        await self._ws.close(item.code, item.reason)
                    except WRITE_ERRORS as exc:
                        # The peer left before our close frame: the socket is closed either way;
                        # logged so an operator sees it, not a failure of anything pending.
                        log.info(
                            "close %s %s not written, peer already gone: %r", item.code, item.reason, exc
                        )
                    return
                try:
                    # The audit lines of the transitions behind this frame reach the OS before the
                    # frame reaches the peer (the writer buffers lines within an event-loop turn).
                    self._conn.audit.flush()
                except AuditWriteFailed as exc:
                    self._drop_data_frames(exc)
                    continue
                try:
                    await self._ws.send_text(item)
                except WRITE_ERRORS as exc:
                    self._items.clear()
                    self._closing = True
                    self._on_failure(SendFailed("write", f"{type(exc).__name__}: {exc}"))
                    return
                self.frames_written += 1
                self._written.set()
            if self._closing and not self._items:
                return

    def _drop_data_frames(self, exc: AuditWriteFailed) -> None:
        """The audit log cannot be written: the data frame just taken from the queue and every
        queued data frame are dropped, not sent, since the lines behind them are not in the log.
        Their events stay in the store (delivery keeps them SENT or PENDING, never acked), so they
        are resent on this context's next socket (resume) or when their ack wait ends; a frame a
        client never saw costs a resend, a frame whose line is missing would break the log. A
        queued close frame is kept and written without a flush (the socket must close either way).
        The session is told once; it queues its close frame (``try_again_later``) and the loop goes on to write
        it (PROTOCOL sections 5 and 6)."""
        kept = [item for item in self._items if isinstance(item, _Close)]
        dropped = 1 + len(self._items) - len(kept)
        self._items = deque(kept)
        self._written.set()  # room in the queue: a wait_room caller re-checks and finds the socket closing
        if self._audit_reported:
            return
        self._audit_reported = True
        self._on_failure(SendFailed("audit", f"{dropped} data frame(s) dropped: {exc}"))


__all__ = ["WRITE_ERRORS", "SendFailed", "Sender"]
