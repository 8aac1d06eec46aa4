"""The uvicorn WebSocket protocol subclass that lets the app ping and drain (PROTOCOL section 6).

ASGI has no message for WebSocket pings, and uvicorn's own keepalive closes a silent peer with
1011, which the protocol forbids. So the server runs uvicorn with ``ws_ping_interval=None`` and
this protocol class, which publishes two hooks in ``scope["extensions"]["pipeproof"]``:

* ``"ping"``: a callable sending one WebSocket ping and returning a future resolved (with the
  round-trip seconds) when the matching pong arrives; it raises ``ConnectionError`` when the
  socket is already closing. The app runs the heartbeat loop and decides the ``heartbeat_timeout`` close itself.
* ``"on_shutdown"``: register ``(callback, grace_seconds)``. On server shutdown uvicorn would send
  1012 to every socket directly; instead the callback is run so the app closes the socket through
  its machine (``drain``, ``drain_close``: ``going_away``). If the socket is still open after
  the grace period, uvicorn's own shutdown runs as a last resort.

Without these hooks (another ASGI server, Starlette's TestClient) the app logs and counts that
heartbeats are unsupported and keeps working.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any, Final, cast

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame

from pipeproof.protocol import CloseCode, CloseReason

EXTENSION = "pipeproof"
TRANSPORT_CLOSE = "pipeproof.transport_close"
"""Key of a ``websocket.disconnect`` message whose close this layer sent itself (a frame over
``max_frame_bytes``, broken framing): the app records it as its own documented close, not as the
peer's; the value is the close reason."""

_TRANSPORT_REASONS: Final[dict[int, CloseReason]] = {
    int(CloseCode.MESSAGE_TOO_BIG): CloseReason.MESSAGE_TOO_BIG,
    int(CloseCode.PROTOCOL_ERROR): CloseReason.PROTOCOL_ERROR,
}
"""The closes the WebSocket layer makes on its own, with the documented reason each gets."""

PingFn = Callable[[], "asyncio.Future[float]"]
ShutdownHook = Callable[[Callable[[], None], float], None]


class PipeproofWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O websockets protocol plus app-driven pings and graceful drain."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pp_pings: dict[bytes, tuple[asyncio.Future[float], float]] = {}
        self._pp_drain: tuple[Callable[[], None], float] | None = None
        self._pp_forced: asyncio.TimerHandle | None = None
        self._pp_wrap_fail()

    def _pp_wrap_fail(self) -> None:
        # The websockets layer fails a connection on a frame over ws_max_size with the right code but
        # its own text as the reason; the close a client sees is the documented one (message_too_big).
        fail = self.conn.fail

        def documented_fail(code: int, reason: str = "") -> None:
            fail(code, _TRANSPORT_REASONS[code].value if code in _TRANSPORT_REASONS else reason)

        self.conn.fail = documented_fail  # type: ignore[method-assign]

    def send_receive_event_to_app(self) -> None:
        # A text frame that is not UTF-8 is handed to the app as bytes, which it answers as a
        # malformed frame within its error budget (section 1), instead of uvicorn's invalid-payload close.
        if self.curr_msg_data_type == "text":
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            try:
                data.decode()
            except UnicodeDecodeError:
                self.curr_msg_data_type = "bytes"
        super().send_receive_event_to_app()

    def handle_parser_exception(self) -> None:
        # As uvicorn's, plus the marker that tells the app this layer sent the close itself.
        assert self.conn.close_sent is not None
        code, reason = self.conn.close_sent.code, self.conn.close_sent.reason
        message: dict[str, Any] = {"type": "websocket.disconnect", "code": code, "reason": reason}
        if code in _TRANSPORT_REASONS:
            message[TRANSPORT_CLOSE] = _TRANSPORT_REASONS[code].value
        self.queue.put_nowait(message)  # type: ignore[arg-type]  # ASGI messages may carry extra keys
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.transport.close()

    async def run_asgi(self) -> None:
        extensions = cast(dict[str, Any], self.scope.setdefault("extensions", {}))
        extensions[EXTENSION] = {"ping": self._pp_ping, "on_shutdown": self._pp_on_shutdown, "abort": self._pp_abort}
        await super().run_asgi()

    def _pp_ping(self) -> asyncio.Future[float]:
        if self.disconnected or self.close_sent or not self.handshake_complete:
            raise ConnectionError("websocket is closing or closed")
        payload = os.urandom(4)
        waiter: asyncio.Future[float] = self.loop.create_future()
        self._pp_pings[payload] = (waiter, self.loop.time())
        self.conn.send_ping(payload)
        self.transport.write(b"".join(self.conn.data_to_send()))
        return waiter

    def handle_pong(self, event: Frame) -> None:
        entry = self._pp_pings.pop(bytes(event.data), None)
        if entry is not None:
            waiter, sent = entry
            if not waiter.done():
                waiter.set_result(self.loop.time() - sent)
            # Older pings whose pongs never came are answered by this one: the peer is alive.
            for stale, _ in self._pp_pings.values():
                if not stale.done():
                    stale.set_result(self.loop.time() - sent)
            self._pp_pings.clear()
        super().handle_pong(event)

    def connection_lost(self, exc: Exception | None) -> None:
        for waiter, _ in self._pp_pings.values():
            if not waiter.done():
                waiter.cancel()
        self._pp_pings.clear()
        if self._pp_forced is not None:
            self._pp_forced.cancel()
        super().connection_lost(exc)

    def _pp_abort(self) -> None:
        """Drop the TCP connection now, discarding unsent bytes (a peer that stopped reading)."""
        if not self.transport.is_closing() or self.transport.get_write_buffer_size():
            self.transport.abort()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.close" and self.close_timer is not None:
            # uvicorn closes the transport close_timeout after our close frame, but transport.close()
            # waits for the send buffer to drain: a peer that never reads would hold the TCP
            # connection for ever (section 6, "a slow consumer is torn down"). Abort instead.
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self._pp_abort)

    def _pp_on_shutdown(self, callback: Callable[[], None], grace: float) -> None:
        self._pp_drain = (callback, grace)

    def shutdown(self) -> None:
        if (
            self._pp_drain is not None
            and self.handshake_complete
            and not self.close_sent
            and not self.disconnected
        ):
            callback, grace = self._pp_drain
            self._pp_drain = None
            callback()
            self._pp_forced = self.loop.call_later(grace, super().shutdown)
            return
        super().shutdown()


__all__ = ["EXTENSION", "TRANSPORT_CLOSE", "PingFn", "PipeproofWebSocketProtocol", "ShutdownHook"]
