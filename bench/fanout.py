"""Benchmark: fan-out across nodes (PROTOCOL section 5, "Several nodes"; docs/deploy.md).

Run (from the repository root)::

    .venv/bin/python bench/fanout.py --users 20 --rate 20 --seconds 10
    .venv/bin/python bench/fanout.py --users 20 --rate 20 --seconds 10 --no-notify

Two ``pipeproof serve`` nodes (child processes) on a fresh PostgreSQL database (created and
dropped per run on ``--postgres``). Each of ``--users`` users holds one socket on node A and one
on node B; runs are started on A's sockets at ``--rate`` runs per second in all (the demo agent's
``hello``: six events each), every event acked at once on both sockets. For each event, latency is
the wall-clock time from its append on A (the ``created_at`` the store recorded, in the same
transaction as the insert) to its receipt by the client: on A's socket (the local path, the
baseline) and on B's socket (across nodes: NOTIFY, B's store read, B's frame). Same machine, same
clock.

With ``--no-notify`` the nodes run with ``PIPEPROOF_CLUSTER_NOTIFY=false``: B learns of events only
by its poll, so B's latency measures the poll bound (``--poll`` seconds, plus one store read).
Prints p50, p99 and max for both sockets, and the events counted.
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
import uuid
from pathlib import Path

import asyncpg
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-q7Vn-2xLp9!Rz4@Wm8#Tb3$Kc6%Hd1^"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_node(url: str, port: int, node_id: str, data: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    full = {
        **os.environ,
        "PIPEPROOF_ENV": "test",
        "PIPEPROOF_JWT_SECRET": SECRET,
        "PIPEPROOF_DATABASE_URL": url,
        "PIPEPROOF_NODE_ID": node_id,
        "PIPEPROOF_DATA_DIR": str(data),
        "PIPEPROOF_AUDIT_LOG": "off",
        "PIPEPROOF_MAX_CONNECTIONS_PER_ACCOUNT": "100000",
        **env,
    }
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "pipeproof"), "serve", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"node on port {port} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"node on port {port} not ready")


async def open_socket(port: int, token: str) -> ClientConnection:
    ws = await connect(f"ws://127.0.0.1:{port}/v1/ws", ping_interval=None, open_timeout=10, max_queue=None)
    await ws.send(json.dumps({"type": "connection_init", "token": token}))
    ack = json.loads(await ws.recv())
    if ack["type"] != "connection_ack":
        raise RuntimeError(ack)
    return ws


async def reader(ws: ClientConnection, seen: dict[tuple[str, int], float], done: asyncio.Event) -> None:
    """Ack every event as it arrives and record when each (context, seq) first arrived."""
    try:
        while not done.is_set():
            frame = json.loads(await ws.recv())
            now = time.time()
            if frame["type"] != "event":
                continue
            seen.setdefault((frame["event_id"], frame["seq"]), now)
            await ws.send(json.dumps({"type": "ack", "seq": frame["seq"]}))
    except ConnectionClosed as exc:
        if not done.is_set():  # closed by the bench at the end is expected; before it is not
            raise RuntimeError(f"socket closed mid-run: {exc!r}") from exc


def quantiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (float("nan"),) * 3
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered), p99, ordered[-1]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--rate", type=float, default=20.0, help="runs started per second, in all")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--poll", type=float, default=1.0, help="PIPEPROOF_CLUSTER_POLL_INTERVAL")
    parser.add_argument("--no-notify", action="store_true", help="PIPEPROOF_CLUSTER_NOTIFY=false: poll only")
    args = parser.parse_args()

    name = f"pp_fanout_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(args.postgres)
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = args.postgres.rsplit("/", 1)[0]
    url = f"{base.replace('postgresql://', 'postgresql+asyncpg://', 1)}/{name}"
    env = {"PIPEPROOF_CLUSTER_POLL_INTERVAL": str(args.poll),
           "PIPEPROOF_CLUSTER_NOTIFY": "false" if args.no_notify else "true",
           "PIPEPROOF_MAX_INFLIGHT_EVENTS": "1024"}
    tmp = Path(tempfile.mkdtemp(prefix="pp-fanout-"))
    ports = [free_port(), free_port()]
    procs = [start_node(url, p, f"bench-{i}", tmp / f"n{i}", env) for i, p in enumerate(ports)]
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_ready(port, proc)
        from pipeproof.impl.auth import mint_token
        from pipeproof.impl.settings import Settings

        settings = Settings(_env_file=None, env="test", jwt_secret=SECRET)  # type: ignore[call-arg]
        notices: list[str] = []
        watcher = await asyncpg.connect(f"{base}/{name}")
        await watcher.add_listener("pipeproof", lambda _c, _p, _ch, payload: notices.append(payload))
        tokens = [mint_token(settings, f"user-{i}") for i in range(args.users)]
        on_a = [await open_socket(ports[0], t) for t in tokens]
        on_b = [await open_socket(ports[1], t) for t in tokens]
        seen_a: dict[tuple[str, int], float] = {}
        seen_b: dict[tuple[str, int], float] = {}
        done = asyncio.Event()
        readers = [asyncio.create_task(reader(ws, seen_a, done)) for ws in on_a]
        readers += [asyncio.create_task(reader(ws, seen_b, done)) for ws in on_b]
        runs = int(args.rate * args.seconds)
        started = time.monotonic()
        for i in range(runs):
            await asyncio.sleep(max(0.0, started + i / args.rate - time.monotonic()))
            ws = on_a[i % args.users]
            await ws.send(json.dumps({"type": "run.start", "request_id": f"r{i}", "input": "hello"}))
        await asyncio.sleep(args.poll + 2.0)  # the last runs end and reach B (within one poll)
        done.set()
        for ws in on_a + on_b:
            await ws.close()
        await asyncio.gather(*readers, return_exceptions=True)
        await watcher.close()
        conn = await asyncpg.connect(f"{base}/{name}")
        rows = await conn.fetch("SELECT event_id, seq, created_at FROM events")
        await conn.close()
        created = {(r["event_id"], r["seq"]): float(r["created_at"]) for r in rows}
        lat_a = [(seen_a[k] - c) * 1000 for k, c in created.items() if k in seen_a]
        lat_b = [(seen_b[k] - c) * 1000 for k, c in created.items() if k in seen_b]
        mode = "poll only (notify off)" if args.no_notify else "notify + poll"
        print(f"two nodes, {mode}, poll {args.poll:g} s: {runs} runs at {args.rate:g}/s over {args.users} users, "
              f"{len(created)} events stored")
        print(f"events received: node A {len(lat_a)}, node B {len(lat_b)} (of {len(created)}); "
              f"notices sent {len(notices)} ({', '.join(f'{k} {sum(n[0] == k for n in notices)}' for k in 'easo')})")
        for label, values in (("A (local socket)", lat_a), ("B (across nodes)", lat_b)):
            p50, p99, worst = quantiles(values)
            print(f"append on A -> receipt on {label}: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
