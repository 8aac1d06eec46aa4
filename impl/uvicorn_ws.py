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
from typing import Any, cast

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame

EXTENSION = "pipeproof"

PingFn = Callable[[], "asyncio.Future[float]"]
ShutdownHook = Callable[[Callable[[], None], float], None]


class PipeproofWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O websockets protocol plus app-driven pings and graceful drain."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pp_pings: dict[bytes, tuple[asyncio.Future[float], float]] = {}
        self._pp_drain: tuple[Callable[[], None], float] | None = None
        self._pp_forced: asyncio.TimerHandle | None = None

    async def run_asgi(self) -> None:
        extensions = cast(dict[str, Any], self.scope.setdefault("extensions", {}))
        extensions[EXTENSION] = {"ping": self._pp_ping, "on_shutdown": self._pp_on_shutdown}
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


__all__ = ["EXTENSION", "PingFn", "PipeproofWebSocketProtocol", "ShutdownHook"]
