"""The memory guard acts on a measure that falls when load falls (impl/memory.py; section 6)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import Factory, ServerPool, expect_close, init_frame, open_ws, recv_json

from pipeproof.errors import ConfigError
from pipeproof.impl.auth import mint_token
from pipeproof.impl.memory import MemoryGuard, check_memory_limit


class Load:
    def __init__(self) -> None:
        self.rss = 100.0
        self.live = 0


def test_the_guard_releases_when_load_falls_although_rss_stays_high() -> None:
    load = Load()
    guard = MemoryGuard(200.0, lambda: load.live, lambda: load.rss)
    load.live, load.rss = 10, 250.0
    assert guard.exceeded()  # over the limit at 10 live sockets
    load.live = 0  # every socket closed; the allocator keeps the pages
    assert not guard.exceeded()
    load.live = 10
    assert guard.exceeded()  # the same load again: refused again
    load.rss = 150.0
    assert not guard.exceeded() and guard.tripped_at is None


def test_an_rss_only_guard_would_latch_and_this_one_does_not() -> None:
    # The broken design the issue measured: a guard on RSS alone keeps refusing after the peak.
    load = Load()
    rss_only = lambda: load.rss > 200.0  # noqa: E731 - the broken variant, for contrast
    guard = MemoryGuard(200.0, lambda: load.live, lambda: load.rss)
    load.live, load.rss = 10, 250.0
    guard.exceeded()
    load.live = 0
    assert rss_only() and not guard.exceeded()


def test_a_limit_below_the_idle_process_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="PIPEPROOF_MEMORY_LIMIT_MB"):
        check_memory_limit(10.0, "PIPEPROOF_MEMORY_LIMIT_MB", lambda: 60.0)
    check_memory_limit(100.0, "PIPEPROOF_MEMORY_LIMIT_MB", lambda: 60.0)


def test_serve_refuses_a_limit_below_idle_rss_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PIPEPROOF_MEMORY_LIMIT_MB": "1", "PIPEPROOF_DATA_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pipeproof.cli", "serve", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "PIPEPROOF_MEMORY_LIMIT_MB" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert "listening on" not in proc.stdout


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Factory]:
    pool = ServerPool(tmp_path, "sqlite", "pp_mem")
    yield pool.start
    pool.close()


async def test_the_server_refuses_then_accepts_again_and_readyz_agrees(start_server: Factory) -> None:
    server = start_server()
    state = server.app.state.pipeproof
    load = Load()
    state.memory = MemoryGuard(200.0, lambda: len(state.sessions), lambda: load.rss)
    sockets = []
    for _ in range(3):
        ws = await open_ws(server)
        await ws.send(init_frame(mint_token(server.settings, "alice")))
        assert (await recv_json(ws))["type"] == "connection_ack"
        sockets.append(ws)
    load.rss = 250.0  # the peak
    refused = await open_ws(server)
    code, reason, _ = await expect_close(refused)
    assert (code, reason) == (1013, "try_again_later")
    answer = server.get("/readyz")
    assert answer.status_code == 503 and answer.json()["failing"] == "memory"
    for ws in sockets:
        await ws.close()
    await _until(lambda: not state.sessions)
    # RSS stays at its peak (the allocator keeps it), but the load has fallen: accepted again.
    assert server.get("/readyz").status_code == 200
    again = await open_ws(server)
    await again.send(init_frame(mint_token(server.settings, "alice")))
    assert (await recv_json(again))["type"] == "connection_ack"
    await again.close()


async def _until(predicate: object, timeout: float = 5.0) -> None:
    import asyncio

    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.05)
