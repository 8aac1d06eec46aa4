"""A real uvicorn server on a loopback port (background thread) and small WebSocket client helpers.

Used by tests/impl/test_server.py; the conformance tests may reuse it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import websockets
from pg import PG_URL, drop_schema_now
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from pipeproof.impl.app import create_app, uvicorn_config
from pipeproof.impl.settings import Settings
from pipeproof.impl.store import open_store

SECRET = "q7Vn-2xLp9!Rz4@Wm8#Tb3$Kc6%Hd1^Fg5&"


Factory = Callable[..., "ServerThread"]


class ServerPool:
    """The servers one test starts, on SQLite or on a fresh PostgreSQL schema each; ``close``
    stops them, fails the test if one closed a socket 1011 or fired an event its model refused,
    and drops the schemas (the teardown every server fixture shares)."""

    def __init__(self, tmp_path: Path, backend: str, prefix: str) -> None:
        self.tmp_path, self.backend, self.prefix = tmp_path, backend, prefix
        self.servers: list[ServerThread] = []
        self.schemas: list[str] = []

    def start(self, app_kwargs: dict[str, Any] | None = None, **overrides: Any) -> ServerThread:
        kwargs = dict(app_kwargs or {})
        if self.backend == "postgresql":
            assert PG_URL is not None
            schema = f"{self.prefix}_{uuid.uuid4().hex[:12]}"
            self.schemas.append(schema)
            overrides.setdefault("database_url", PG_URL)
            kwargs.setdefault("store_opener", functools.partial(open_store, pg_schema=schema))
            # Startup requires the cluster poll below the ack wait on PostgreSQL (section 5,
            # "Several nodes"); tests declare short ack waits.
            ack = float(overrides.get("ack_timeout", Settings.model_fields["ack_timeout"].default))
            overrides.setdefault("cluster_poll_interval", min(1.0, ack / 2))
        settings = make_settings(self.tmp_path / f"srv{len(self.servers)}", **overrides)
        server = ServerThread(settings, kwargs).start()
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            alive = server.thread is not None and server.thread.is_alive()
            text = server.metrics() if alive else ""
            server.stop()
            assert 'code="1011"' not in text
            for line in text.splitlines():
                if line.startswith("pipeproof_illegal_transitions_total{"):
                    raise AssertionError(f"the server fired an event its model refused: {line}")
        for schema in self.schemas:
            drop_schema_now(schema)


def open_sockets(server: ServerThread) -> float:
    """Sockets the server still counts in a state other than CLOSED (its connection gauges)."""
    total = 0.0
    for line in server.metrics().splitlines():
        if line.startswith("pipeproof_connections{") and 'state="CLOSED"' not in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "test",
        "jwt_secret": SECRET,
        "data_dir": tmp_path / "data",
        "audit_log": str(tmp_path / "audit.jsonl"),
        "init_timeout": 2.0,
        "heartbeat_interval": 5.0,
        "store_timeout": 3.0,
        "shutdown_grace": 2.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class ServerThread:
    """uvicorn in a daemon thread with its own event loop; ``port`` is the bound port."""

    settings: Settings
    app_kwargs: dict[str, Any] = field(default_factory=dict)
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    port: int = 0

    def start(self) -> ServerThread:
        app = create_app(self.settings, **self.app_kwargs)
        config = uvicorn_config(app, self.settings, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.app = app
        return self

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.http_url + path, timeout=10)

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=15)

    def metrics(self) -> str:
        return self.get("/metrics").text

    def audit_lines(self) -> list[dict[str, Any]]:
        path = Path(str(self.settings.audit_log))
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def open_ws(server: ServerThread) -> ClientConnection:
    return await connect(server.ws_url, ping_interval=None, open_timeout=5)


async def recv_json(ws: ClientConnection, timeout: float = 3.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))  # type: ignore[no-any-return]


async def expect_close(ws: ClientConnection, timeout: float = 5.0) -> tuple[int, str, list[dict[str, Any]]]:
    """Read until the server closes; returns (code, reason, frames received before the close)."""
    frames: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                frames.append(json.loads(await ws.recv()))
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "the server dropped the connection without a close frame"
        assert closed.rcvd.code != 1011
        return closed.rcvd.code, closed.rcvd.reason, frames
    raise AssertionError("unreachable")


def init_frame(token: str | None, **extra: Any) -> str:
    frame: dict[str, Any] = {"type": "connection_init", **extra}
    if token is not None:
        frame["token"] = token
    return json.dumps(frame)


class RawClient:
    """A sans-I/O websockets client over a raw TCP stream that never answers pings (section 6)."""

    def __init__(self, url: str) -> None:
        self.protocol = ClientProtocol(parse_uri(url))
        self.uri = parse_uri(url)
        self.frames: list[Frame] = []

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.uri.host, self.uri.port)
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        while self.protocol.handshake_exc is None and self.protocol.state.name == "CONNECTING":
            self.protocol.receive_data(await self.reader.read(65536))
            self._collect()
        assert self.protocol.state.name == "OPEN"

    def _flush(self) -> None:
        for chunk in self.protocol.data_to_send():
            if chunk:
                self.writer.write(chunk)

    def _collect(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self.frames.append(event)

    def send_text(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        self._flush()

    def send_text_bytes(self, data: bytes) -> None:
        """A text frame with exactly these bytes (not necessarily UTF-8: a hostile client)."""
        self.protocol.send_text(data)
        self._flush()

    async def next_text(self, timeout: float) -> dict[str, Any]:
        """The next text frame the server sends, as JSON."""
        async with asyncio.timeout(timeout):
            while True:
                for i, f in enumerate(self.frames):
                    if f.opcode is Opcode.TEXT:
                        del self.frames[i]
                        return json.loads(f.data)  # type: ignore[no-any-return]
                data = await self.reader.read(65536)
                if not data:
                    raise AssertionError("connection dropped")
                self.protocol.receive_data(data)
                self._flush()  # pongs
                self._collect()

    async def wait_close(self, timeout: float) -> tuple[int, str, int]:
        """Read (and drop the automatic pong replies) until a close frame arrives; returns
        (code, reason, pings received)."""
        async with asyncio.timeout(timeout):
            while True:
                data = await self.reader.read(65536)
                if not data:
                    self.protocol.receive_eof()
                else:
                    self.protocol.receive_data(data)
                self.protocol.data_to_send()  # discard pongs: this client is "silent"
                self._collect()
                if self.protocol.close_rcvd is not None:
                    pings = sum(1 for f in self.frames if f.opcode is Opcode.PING)
                    return self.protocol.close_rcvd.code, self.protocol.close_rcvd.reason, pings
                if not data:
                    raise AssertionError("connection dropped without a close frame")

    def close(self) -> None:
        self.writer.close()


__all__ = [
    "SECRET",
    "RawClient",
    "ServerThread",
    "expect_close",
    "init_frame",
    "make_settings",
    "open_sockets",
    "open_ws",
    "recv_json",
    "websockets",
]
