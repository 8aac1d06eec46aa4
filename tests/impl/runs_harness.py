"""Shared helpers for the runs / delivery / durability tests: a server with runs enabled (uvicorn
on loopback, SQLite or PostgreSQL), an event-reading client, and audit-log replay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pg import BACKENDS
from server_harness import ServerPool, ServerThread, init_frame, open_ws
from websockets.asyncio.client import ClientConnection

from pipeproof.impl.auth import mint_token
from pipeproof.impl.runs import AgentRuntime
from pipeproof.model.spec import Machine

TERMINAL = ("agent_completed", "agent_failed")

Factory = Callable[..., ServerThread]


@pytest.fixture
def start_runtime(tmp_path: Path, backend: str) -> Iterator[Factory]:
    """Start servers with an AgentRuntime (or ``runtime=``); check their metrics at teardown."""
    pool = ServerPool(tmp_path, backend, "pp_run")

    def start(runtime: AgentRuntime | None = None, app_kwargs: dict[str, Any] | None = None,
              **overrides: Any) -> ServerThread:
        kwargs = dict(app_kwargs or {})
        kwargs["handler"] = runtime if runtime is not None else AgentRuntime()
        overrides.setdefault("ack_timeout", 1.0)
        overrides.setdefault("ack_jitter", 0.0)
        return pool.start(kwargs, **overrides)

    yield start
    pool.close()


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
    "chains",
    "http_get",
    "metric",
    "replay",
    "start_runtime",
    "token",
]
