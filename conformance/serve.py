"""``pipeproof conform --serve``: the reference server in its own process, on a free loopback port
(docs/conformance.md, "Serving the reference server").

The server is ``python -m pipeproof.cli serve`` with a temporary data directory, ``PIPEPROOF_ENV=test``,
a random JWT secret shared with the kit, and the small declared timing of :data:`~.timing.SMALL`.
The kit talks to it only over sockets, exactly as it would to a server on another host.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

from .errors import KitError
from .timing import SMALL, Timing

DISABLED_USER = "pp-disabled-user"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServedServer:
    """A running reference server process; ``url``, ``secret``, ``audit_log``; a context manager."""

    timing: Timing = SMALL
    startup_timeout: float = 20.0
    extra_env: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.secret = secrets.token_urlsafe(32)
        self._tmp = tempfile.TemporaryDirectory(prefix="pipeproof-conform-")
        self.dir = Path(self._tmp.name)
        self.audit_log = self.dir / "audit.jsonl"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEPROOF_")}
        env.update(self.timing.server_env())
        env.update({
            "PIPEPROOF_ENV": "test",
            "PIPEPROOF_JWT_SECRET": self.secret,
            "PIPEPROOF_DATA_DIR": str(self.dir / "data"),
            "PIPEPROOF_AUDIT_LOG": str(self.audit_log),
            "PIPEPROOF_MAX_CONNECTIONS_PER_ACCOUNT": "512",
            "PIPEPROOF_SHUTDOWN_GRACE": "1.0",
            "PIPEPROOF_DISABLED_USERS": DISABLED_USER,
        })
        env.update(self.extra_env or {})
        return env

    def start(self) -> ServedServer:
        for _ in range(3):  # a free port can be taken between probing and binding: try another
            self.port = free_port()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeproof.cli", "serve", "--port", str(self.port), "--log-level", "warning"],
                cwd=self.dir, env=self.env(), stdout=subprocess.DEVNULL, stderr=(self.dir / "server.log").open("wb"),
            )
            if self._wait_ready():
                return self
            self.stop()
        raise KitError(f"the reference server did not become ready; see {self.dir / 'server.log'}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # polling a process that is starting: there is nothing to wait on
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> ServedServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


__all__ = ["DISABLED_USER", "ServedServer", "free_port"]
