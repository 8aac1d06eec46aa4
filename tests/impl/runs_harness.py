"""Shared helpers for the runs / delivery / durability tests: a server with runs enabled (uvicorn
on loopback, SQLite or PostgreSQL), an event-reading client, and audit-log replay."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import ServerThread, init_frame, make_settings, open_ws
from sqlalchemy.ext.asyncio import create_async_engine
from websockets.asyncio.client import ClientConnection

from pipeproof.impl.auth import mint_token
from pipeproof.impl.runs import AgentRuntime
from pipeproof.impl.store import open_store
from pipeproof.model.spec import Machine

PG_URL = os.environ.get("PIPEPROOF_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(not PG_URL, reason="set PIPEPROOF_TEST_POSTGRES_URL to run PostgreSQL tests")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, needs_pg])]
TERMINAL = ("agent_completed", "agent_failed")

Factory = Callable[..., ServerThread]


def _drop_schema(schema: str) -> None:
    async def drop() -> None:
        from sqlalchemy import text

        assert PG_URL is not None
        engine = create_async_engine(PG_URL)
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()

    asyncio.run(drop())


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def start_runtime(tmp_path: Path, backend: str) -> Iterator[Factory]:
    """Start servers with an AgentRuntime (or ``runtime=``); check their metrics at teardown."""
    servers: list[ServerThread] = []
    schemas: list[str] = []

    def start(runtime: AgentRuntime | None = None, app_kwargs: dict[str, Any] | None = None,
              **overrides: Any) -> ServerThread:
        kwargs = dict(app_kwargs or {})
        kwargs["handler"] = runtime if runtime is not None else AgentRuntime()
        if backend == "postgresql":
            assert PG_URL is not None
            schema = f"pp_run_{uuid.uuid4().hex[:12]}"
            schemas.append(schema)
            overrides.setdefault("database_url", PG_URL)
            kwargs.setdefault("store_opener", functools.partial(open_store, pg_schema=schema))
        overrides.setdefault("ack_timeout", 1.0)
        overrides.setdefault("ack_jitter", 0.0)
        settings = make_settings(tmp_path / f"srv{len(servers)}", **overrides)
        server = ServerThread(settings, kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        alive = server.thread is not None and server.thread.is_alive()
        text = server.metrics() if alive else ""
        server.stop()
        assert 'code="1011"' not in text
        for line in text.splitlines():
            if line.startswith("pipeproof_illegal_transitions_total{"):
                raise AssertionError(f"the server fired an event its model refused: {line}")
    for schema in schemas:
        _drop_schema(schema)


def token(server: ServerThread, user: str = "alice", **kwargs: Any) -> str:
    return mint_token(server.settings, user, **kwargs)


class Client:
    """A READY socket that reads frames, records event frames, and acks (or not)."""

    def __init__(self, ws: ClientConnection, ack: dict[str, Any]) -> None:
        self.ws = ws
        self.connection_ack = ack
        self.frames: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, server: ServerThread, user: str = "alice", resume: int | None = None) -> Client:
        ws = await open_ws(server)
        extra: dict[str, Any] = {} if resume is None else {"resume": {"last_seq": resume}}
        await ws.send(init_frame(token(server, user), **extra))
        ack = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert ack["type"] == "connection_ack", ack
        return cls(ws, ack)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def start(self, request_id: str, text: str, tools: list[str] | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "run.start", "request_id": request_id, "input": text}
        if tools is not None:
            frame["tools"] = tools
        await self.send(frame)
        return await self.reply()

    async def ack(self, seq: int) -> None:
        await self.send({"type": "ack", "seq": seq})

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.frames.append(frame)
        if frame["type"] == "event":
            self.events.append(frame)
        return frame

    async def reply(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next non-event frame (events read meanwhile are recorded, not acked)."""
        while True:
            frame = await self.next(timeout)
            if frame["type"] != "event":
                return frame

    async def until_terminal(self, run_id: str, *, ack: bool = True, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Read (and ack, cumulatively) until the run's terminal event; the run's event frames."""
        async with asyncio.timeout(timeout):
            while True:
                if any(e["run_id"] == run_id and e["event"] in TERMINAL for e in self.events):
                    break
                frame = await self.next(timeout)
                if frame["type"] == "event" and ack:
                    await self.ack(frame["seq"])
        return [e for e in self.events if e["run_id"] == run_id]

    async def close(self) -> None:
        await self.ws.close()


def http_get(server: ServerThread, path: str, user: str | None = "alice", auth: str | None = None) -> httpx.Response:
    headers = {}
    if auth is not None:
        headers["Authorization"] = auth
    elif user is not None:
        headers["Authorization"] = f"Bearer {token(server, user)}"
    return httpx.get(server.http_url + path, headers=headers, timeout=10)


def replay(machine: Machine, lines: list[dict[str, Any]]) -> None:
    """Every audit line of one instance is a step the model allows from the previous one."""
    config = machine.initial_config()
    for line in lines:
        assert line["from"] == config[0].name, line
        transition, config = machine.step(config, line["event"], line["detail"].get("inputs", {}))
        assert transition.target.name == line["to"], line
        assert dict(zip(machine.var_names, config[1], strict=True)) == line["vars"], line


def chains(server: ServerThread, machine: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for line in server.audit_lines():
        if line["machine"] == machine:
            out.setdefault(line["id"], []).append(line)
    return out


def metric(server: ServerThread, name: str) -> float:
    total = 0.0
    for line in server.metrics().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


__all__ = [
    "BACKENDS",
    "TERMINAL",
    "Client",
    "Factory",
    "backend",
    "chains",
    "http_get",
    "metric",
    "replay",
    "start_runtime",
    "token",
]
