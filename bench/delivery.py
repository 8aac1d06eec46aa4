"""Benchmark: the full acked-event path against a raw FastAPI WebSocket baseline (PROTOCOL section 5).

Run (from the repository root)::

    .venv/bin/python bench/delivery.py --sockets 50 --events 200 --window 16 --rounds 3

``--postgres postgresql://postgres@127.0.0.1:5432/postgres`` runs the pipeproof side on a fresh
PostgreSQL database (created and dropped per run) instead of a fresh SQLite file.
``PIPEPROOF_BENCH_PROFILE=FILE`` runs the pipeproof server under cProfile and writes its stats to
FILE when it stops (the numbers it prints are then not comparable).

One process tree on loopback: this process is the client; each server is a child process running
uvicorn with one worker.

* ``baseline``: a bare FastAPI WebSocket endpoint that answers ``connection_init`` and
  ``run.start`` and then pushes the same event frames with the same per-socket window, counting
  client acks in memory. No store, no model, no audit log.
* ``pipeproof``: the reference server (``create_app`` + ``AgentRuntime``) on SQLite with the audit
  log on, and a bench agent that emits ``--events`` thinking steps. Every event takes the full
  path: run machine fired, queued on its stream, durable append (seq allocated in the store, the
  event stored SENT with its first attempt), delivery machine ``send``, frame through the sender
  choke point (connection machine ``deliver``), client ack (connection machine ``recv_frame`` and
  ``handle_frame``), ``ack_through`` in the store, delivery machine ``ack``; one audit line per
  transition, six per event. The window is ``max_inflight_events`` (a run waits when its context
  has that many queued or unfinished events), the same window the baseline uses.

The client is identical for both: N sockets, one run each, every event acked at once. Latency is
measured from the moment the server created the event (a ``time.monotonic`` stamp in the event,
taken before the durable append; the same clock across processes on Linux) to the moment the
client sends the ack. Prints, per round, events/s, p50/p99 latency and the server's CPU per
event (user + system time of the server process, its SQLite thread included); then the median of
each side over the rounds (run alternately, so load from elsewhere hits both alike) and the ratio
of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

# Module level: FastAPI resolves the (string) annotation ``WebSocket`` in this module's globals.
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

SECRET = "bench-q7Vn-2xLp9!Rz4@Wm8#Tb3$Kc6%Hd1^"


# -- servers (child processes) ----------------------------------------------------------------------


def _baseline_app(events: int, window: int) -> Any:
    app = FastAPI()

    @app.websocket("/v1/ws")
    async def ws_endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.receive_text()  # connection_init
        await ws.send_text(json.dumps({"type": "connection_ack", "session_id": "s", "context_id": "c", "epoch": 1,
                                       "heartbeat_ms": 15000, "recovered": False, "last_seq": 0}))
        start = json.loads(await ws.receive_text())
        await ws.send_text(json.dumps({"type": "run.accepted", "request_id": start["request_id"], "run_id": "r"}))
        kinds = ["agent_started"] + ["agent_thinking"] * events + ["agent_completed"]
        acked = 0
        sent = 0
        room = asyncio.Event()

        async def reader() -> None:
            nonlocal acked
            try:
                while True:
                    frame = json.loads(await ws.receive_text())
                    if frame.get("type") == "ack":
                        acked = max(acked, frame["seq"])
                        room.set()
            except WebSocketDisconnect:
                room.set()

        task = asyncio.create_task(reader())
        while sent < len(kinds):
            while sent - acked >= window:
                room.clear()
                await room.wait()
            sent += 1
            frame = {"type": "event", "seq": sent, "event_id": f"e{sent}", "run_id": "r", "event": kinds[sent - 1],
                     "data": {"text": repr(time.monotonic())}, "attempt": 1}
            await ws.send_text(json.dumps(frame))
        while acked < len(kinds) and not task.done():
            room.clear()
            await room.wait()
        task.cancel()

    return app


class BenchAgent:
    """Emits ``count`` thinking steps, each stamped with the creation time, then answers."""

    def __init__(self, count: int) -> None:
        self.count = count

    async def steps(self, request: Any) -> AsyncGenerator[Any, Any]:
        from pipeproof.impl.agents import FinalAnswer, Thinking

        for _ in range(self.count):
            yield Thinking(repr(time.monotonic()))
        yield FinalAnswer("done")


def serve(kind: str, port: int, events: int, window: int, data_dir: str) -> None:
    import uvicorn

    if kind == "baseline":
        uvicorn.run(_baseline_app(events, window), host="127.0.0.1", port=port, log_level="warning",
                    ws_ping_interval=None, ws_ping_timeout=None)
        return
    from pipeproof.impl.app import create_app, uvicorn_config
    from pipeproof.impl.runs import AgentRuntime
    from pipeproof.impl.settings import Settings

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, env="test", jwt_secret=SECRET, data_dir=Path(data_dir), port=port,
        database_url=os.environ.get("PIPEPROOF_BENCH_DATABASE_URL") or None,
        ack_timeout=30.0, max_inflight_events=window, run_max_steps=events + 10,
        max_connections_per_account=4096, max_active_runs=4096, heartbeat_interval=60.0,
    )
    app = create_app(settings, handler=AgentRuntime(agent=BenchAgent(events)))
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
    profile_to = os.environ.get("PIPEPROOF_BENCH_PROFILE")
    if not profile_to:
        server.run()
        return
    import cProfile
    import signal

    # uvicorn re-raises the SIGTERM it handled once it has shut down: with this no-op handler
    # restored under it, the process lives on to write the profile.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: None)
    # Deterministic profile of the server (call counts per event), written when it stops.
    with cProfile.Profile() as profiler:
        server.run()
    profiler.dump_stats(profile_to)


# -- the client (this process) -------------------------------------------------------------------------


async def one_socket(url: str, token: str, index: int, latencies: list[float]) -> int:
    from websockets.asyncio.client import connect

    got = 0
    async with connect(url, ping_interval=None, max_size=None) as ws:
        await ws.send(json.dumps({"type": "connection_init", "token": token}))
        ack = json.loads(await ws.recv())
        assert ack["type"] == "connection_ack", ack
        await ws.send(json.dumps({"type": "run.start", "request_id": f"bench-{index}", "input": "go"}))
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] != "event":
                continue
            await ws.send(json.dumps({"type": "ack", "seq": frame["seq"]}))
            got += 1
            if frame["event"] == "agent_thinking":
                latencies.append(time.monotonic() - float(frame["data"]["text"]))
            if frame["event"] in ("agent_completed", "agent_failed"):
                return got


async def drive(port: int, sockets: int, tokens: list[str]) -> dict[str, float]:
    url = f"ws://127.0.0.1:{port}/v1/ws"
    latencies: list[float] = []
    started = time.perf_counter()
    counts = await asyncio.gather(*(one_socket(url, tokens[i], i, latencies) for i in range(sockets)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "events": float(sum(counts)),
        "seconds": elapsed,
        "events_per_s": sum(counts) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited during startup")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not open")


def _wait_ready(port: int) -> None:
    import httpx

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError("not ready")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc), to tell CPU- from wait-bound."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fresh_postgres(admin_url: str) -> tuple[str, Callable[[], None]]:
    """A new empty database on the server of ``admin_url`` (an asyncpg DSN of a database that
    exists, e.g. ``postgresql://postgres@127.0.0.1:5432/postgres``): its SQLAlchemy URL, and a
    function that drops it."""
    import asyncpg

    name = f"pp_bench_{os.getpid()}_{time.monotonic_ns()}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}", lambda: asyncio.run(run(f'DROP DATABASE "{name}" WITH (FORCE)'))


def run_one(kind: str, args: argparse.Namespace, tokens: list[str]) -> dict[str, float]:
    port = _free_port()
    env = {**os.environ}
    drop: Callable[[], None] | None = None
    if kind == "pipeproof" and args.postgres:
        env["PIPEPROOF_BENCH_DATABASE_URL"], drop = _fresh_postgres(args.postgres)
    with tempfile.TemporaryDirectory(prefix=f"pp-bench-{kind}-") as data_dir:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--port", str(port), "--events", str(args.events),
             "--window", str(args.window), "--data-dir", data_dir],
            env=env,
        )
        try:
            _wait_port(port, proc)
            if kind == "pipeproof":
                _wait_ready(port)
            cpu_before = _cpu_seconds(proc.pid)
            result = asyncio.run(drive(port, args.sockets, tokens))
            result["server_cpu_s"] = _cpu_seconds(proc.pid) - cpu_before
            return result
        finally:
            proc.terminate()
            proc.wait(15)
            if drop is not None:
                drop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sockets", type=int, default=50)
    parser.add_argument("--events", type=int, default=200, help="thinking events per run (socket)")
    parser.add_argument("--window", type=int, default=16, help="unacked events per socket")
    parser.add_argument("--rounds", type=int, default=3, help="baseline/pipeproof pairs, run alternately")
    parser.add_argument(
        "--postgres", metavar="DSN", default="",
        help="run pipeproof on a fresh PostgreSQL database created through this asyncpg DSN"
             " (e.g. postgresql://postgres@127.0.0.1:5432/postgres) instead of SQLite",
    )
    parser.add_argument("--serve", choices=["baseline", "pipeproof"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.events, args.window, args.data_dir)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeproof.impl.auth import mint_token
    from pipeproof.impl.settings import Settings

    settings = Settings(_env_file=None, env="test", jwt_secret=SECRET)  # type: ignore[call-arg]
    tokens = [mint_token(settings, f"bench-user-{i}") for i in range(args.sockets)]
    print(f"{args.sockets} sockets x {args.events + 2} events, window {args.window}, loopback, one uvicorn worker,"
          f" {args.rounds} rounds, store: {'PostgreSQL' if args.postgres else 'SQLite'}")
    rows: dict[str, list[dict[str, float]]] = {"baseline": [], "pipeproof": []}
    for round_no in range(1, args.rounds + 1):
        # Alternating, so that a burst of load from elsewhere hits both sides alike.
        for kind in ("baseline", "pipeproof"):
            r = run_one(kind, args, tokens)
            rows[kind].append(r)
            print(f"round {round_no} {kind:<10} {r['events']:>7.0f} events in {r['seconds']:6.2f}s"
                  f"  {r['events_per_s']:>8.0f} events/s  ack latency p50 {r['p50_ms']:7.2f} ms"
                  f"  p99 {r['p99_ms']:7.2f} ms  server CPU {r['server_cpu_s'] * 1e6 / r['events']:6.0f} us/event")
    median = {kind: statistics.median(r["events_per_s"] for r in runs) for kind, runs in rows.items()}
    cpu = {kind: statistics.median(r["server_cpu_s"] * 1e6 / r["events"] for r in runs) for kind, runs in rows.items()}
    for kind in rows:
        print(f"median {kind:<10} {median[kind]:>8.0f} events/s  server CPU {cpu[kind]:6.0f} us/event")
    ratio = median["pipeproof"] / median["baseline"]
    print(f"ratio (pipeproof / baseline, medians of events/s): {ratio:.3f}  (target >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
