"""``pipeproof serve`` in child processes, for the tests that kill a server (``kill -9``) and start
it again, or start several nodes on one store: tests/impl/test_durability.py, test_leases.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from server_harness import SECRET, init_frame
from websockets.asyncio.client import ClientConnection, connect

from pipeproof.impl.auth import mint_token
from pipeproof.impl.settings import Settings

# Exactly what ``pipeproof serve`` runs, without importing the other sub-commands.
SERVE = (
    "import argparse, sys\n"
    "from pipeproof.commands import serve\n"
    "parser = argparse.ArgumentParser()\n"
    "serve.configure(parser)\n"
    "sys.exit(serve.run(parser.parse_args(sys.argv[1:])))\n"
)

TERMINAL = ("agent_completed", "agent_failed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``pipeproof serve`` in a child process on a loopback port with a tmp data dir; ``env`` adds
    or overrides ``PIPEPROOF_*`` variables (a ``PIPEPROOF_DATABASE_URL`` points it at PostgreSQL)."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "PIPEPROOF_ENV": "test",
            "PIPEPROOF_JWT_SECRET": SECRET,
            "PIPEPROOF_DATA_DIR": str(data_dir),
            "PIPEPROOF_ACK_TIMEOUT": "0.5",
            "PIPEPROOF_ACK_JITTER": "0",
            "PIPEPROOF_MAX_ATTEMPTS": "4",
            "PIPEPROOF_RESUME_WINDOW": "30",
            "PIPEPROOF_SHUTDOWN_GRACE": "1",
        }
        self.env.pop("PIPEPROOF_DATABASE_URL", None)
        self.env.update(env or {})
        self.settings = Settings(_env_file=None, env="test", jwt_secret=SECRET)  # type: ignore[call-arg]
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log = data_dir.parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "--port", str(self.port), "--log-level", "warning"],
            env=self.env, stdout=out, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.http}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(self.log.read_text())

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def token(self, user: str = "alice") -> str:
        return mint_token(self.settings, user)

    def stream(self, user: str = "alice") -> list[dict[str, Any]]:
        r = httpx.get(f"{self.http}/v1/events?after=0&limit=1000",
                      headers={"Authorization": f"Bearer {self.token(user)}"}, timeout=5)
        events: list[dict[str, Any]] = r.json()["events"]
        return events

    def metric(self, name: str) -> float:
        total = 0.0
        for line in httpx.get(f"{self.http}/metrics", timeout=5).text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def connect(self, user: str = "alice", resume: int | None = None) -> tuple[ClientConnection, dict[str, Any]]:
        """A READY socket of ``user`` (resuming after ``resume``) and its connection_ack."""
        ws = await connect(self.ws, ping_interval=None, open_timeout=5)
        extra: dict[str, Any] = {} if resume is None else {"resume": {"last_seq": resume}}
        await ws.send(init_frame(self.token(user), **extra))
        ack = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert ack["type"] == "connection_ack", ack
        return ws, ack


async def read_until(
    ws: ClientConnection, done: Any, *, timeout: float, ack: bool = False
) -> list[dict[str, Any]]:
    """Frames until ``done(frames)`` holds (every frame, events and replies, in arrival order);
    with ``ack`` each event is acked as it arrives."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while not done(frames):
            frame = json.loads(await ws.recv())
            frames.append(frame)
            if ack and frame["type"] == "event":
                await ws.send(json.dumps({"type": "ack", "seq": frame["seq"]}))
    return frames


def events_of(frames: list[dict[str, Any]], run_id: str | None = None) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == "event" and (run_id is None or f["run_id"] == run_id)]


def ended(run_id: str) -> Any:
    """``done`` for :func:`read_until`: the run's terminal event has arrived."""
    return lambda frames: any(e["event"] in TERMINAL for e in events_of(frames, run_id))


__all__ = ["SERVE", "TERMINAL", "ServerProcess", "ended", "events_of", "free_port", "read_until"]
