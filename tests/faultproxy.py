"""A TCP fault proxy for the tests: a loopback port in front of a target (PostgreSQL) whose
connections can be cut, stalled or slowed while they are in use.

Server nodes run in child processes and reach their store through the proxy's port; the test
process steers it. The proxy runs its own asyncio event loop in its own thread, so a test can call
:meth:`FaultProxy.cut`, :meth:`~FaultProxy.stall`, :meth:`~FaultProxy.delay` and
:meth:`~FaultProxy.restore` synchronously, from async or plain test code alike, and each call has
taken effect on every connection when it returns.

Modes (one at a time; :meth:`~FaultProxy.restore` goes back to passing bytes):

* **pass** (the default): bytes are forwarded as they come.
* **drop**: every current connection is reset (RST to the client, the upstream side closed), and
  every new one is accepted and reset at once, until restored. A client fails fast with a
  connection error, as when a database host dies or a firewall rejects it.
* **stall**: connections stay open but no byte moves in either direction until restored (what
  was read meanwhile is held and forwarded then). A client hangs, as under a partition that drops
  packets silently or a store frozen by a long pause; only its own timeouts end the wait.
* **delay**: every chunk waits ``ms`` milliseconds before it is forwarded, in each direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from sqlalchemy.engine import make_url

_T = TypeVar("_T")
CHUNK = 65536


class Mode(enum.Enum):
    PASS = "pass"
    DROP = "drop"
    STALL = "stall"
    DELAY = "delay"


@dataclass(frozen=True)
class ProxyStats:
    """Counters since the proxy started: connections proxied (``accepted``), connections reset on
    arrival because the proxy was in drop mode (``refused``), connections open now, and bytes
    forwarded client -> target (``bytes_up``) and target -> client (``bytes_down``)."""

    accepted: int
    refused: int
    open: int
    bytes_up: int
    bytes_down: int


@dataclass(eq=False)
class _Conn:
    """One proxied connection: the client's transport, the target's, and the two pumps."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN: the peer's next read or write fails at once instead of
    seeing an orderly end of stream (what a dead host or a rejecting firewall looks like)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A TCP proxy on ``127.0.0.1:<port>`` in front of ``target_host:target_port``.

    Start it with :meth:`start` (or use it as a context manager), point a client at :attr:`port`
    (:meth:`route` rewrites a database URL), then steer it with the mode methods. ``port=0`` picks
    a free port."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target_host, self.target_port = target_host, target_port
        self.host, self.port = host, port
        self._mode = Mode.PASS
        self._delay = 0.0
        self._accepted = self._refused = self._up = self._down = 0
        self._conns: set[_Conn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None  # set unless stalled; created on the proxy's loop

    @classmethod
    def for_url(cls, url: str) -> FaultProxy:
        """A proxy in front of the host and port of a database URL (PostgreSQL's 5432 by default)."""
        u = make_url(url)
        return cls(u.host or "127.0.0.1", u.port or 5432)

    def route(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's: the same database, through the proxy."""
        return str(make_url(url).set(host=self.host, port=self.port).render_as_string(hide_password=False))

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=f"faultproxy-{self.target_port}", daemon=True)
        self._thread.start()
        self._call(self._listen())
        return self

    def close(self) -> None:
        """Stop listening, reset every connection and end the proxy's thread."""
        if self._loop is None or self._thread is None:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- controls (synchronous, from any thread but the proxy's) ---------------------------------
    @property
    def mode(self) -> Mode:
        return self._mode

    def cut(self) -> None:
        """Drop mode: reset every current connection, and reset new ones, until :meth:`restore`."""
        self._call(self._set(Mode.DROP))

    def stall(self) -> None:
        """Stall mode: connections stay open, no byte moves either way, until :meth:`restore`."""
        self._call(self._set(Mode.STALL))

    def delay(self, ms: float) -> None:
        """Delay mode: each chunk waits ``ms`` milliseconds before it is forwarded, both ways."""
        if ms < 0:
            raise ValueError(f"delay must be >= 0 ms, got {ms}")
        self._call(self._set(Mode.DELAY, ms / 1000.0))

    def restore(self) -> None:
        """Back to passing bytes; held bytes of a stall are forwarded now."""
        self._call(self._set(Mode.PASS))

    def stats(self) -> ProxyStats:
        return ProxyStats(self._accepted, self._refused, len(self._conns), self._up, self._down)

    @property
    def accepted(self) -> int:
        return self._accepted

    @property
    def bytes_up(self) -> int:
        return self._up

    @property
    def bytes_down(self) -> int:
        return self._down

    # -- the proxy's own loop ----------------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the fault proxy is not running: call start() first")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._drop_all()
        if self._server is not None:
            await self._server.wait_closed()

    async def _set(self, mode: Mode, delay: float = 0.0) -> None:
        assert self._flowing is not None
        self._mode, self._delay = mode, delay
        if mode is Mode.STALL:
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode is Mode.DROP:
            await self._drop_all()

    async def _drop_all(self) -> None:
        conns, self._conns = list(self._conns), set()
        for conn in conns:
            self._abort(conn)
        # Let the cancelled pumps finish, so that "cut() returned" means every pump has stopped.
        tasks = [t for c in conns for t in c.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)

    def _abort(self, conn: _Conn) -> None:
        for task in conn.tasks:
            task.cancel()
        _reset(conn.client)
        if conn.upstream is not None:
            conn.upstream.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode is Mode.DROP:
            self._refused += 1
            _reset(writer)
            return
        conn = _Conn(writer)
        self._conns.add(conn)
        self._accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            self._conns.discard(conn)
            _reset(writer)
            return
        conn.upstream = up_writer
        if conn not in self._conns:  # cut while the upstream connection was being made
            self._abort(conn)
            return
        conn.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, up=True)),
            asyncio.create_task(self._pump(up_reader, writer, up=False)),
        ]
        # Either direction ending (EOF, error) ends the connection: PostgreSQL's protocol has no
        # use for a half-closed socket, and a lingering half would hide a dead peer.
        await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
        if conn in self._conns:
            self._conns.discard(conn)
            for task in conn.tasks:
                task.cancel()
            writer.transport.close()
            up_writer.transport.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        assert self._flowing is not None
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    return
                # Held here while stalled: what was read waits for restore(), and nothing more is
                # read, so the peers' TCP buffers fill and their writes block, as on a dead link.
                await self._flowing.wait()
                if self._mode is Mode.DELAY and self._delay > 0:
                    await asyncio.sleep(self._delay)
                await self._flowing.wait()  # a stall that began during the delay holds the chunk too
                # Counted before the write: a peer that has the bytes sees them counted.
                if up:
                    self._up += len(data)
                else:
                    self._down += len(data)
                writer.write(data)
                await writer.drain()


__all__ = ["FaultProxy", "Mode", "ProxyStats"]
