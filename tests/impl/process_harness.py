"""``pipeproof serve`` in child processes, for the tests that kill a server (``kill -9``) and start
it again, or start several nodes on one store: tests/impl/test_durability.py, test_leases.py,
test_cluster.py and the kit's two-node test.

:class:`ServerProcess` is one node. :class:`Cluster` is N nodes on one PostgreSQL database made
for the test (or a given one), each with its own ``PIPEPROOF_NODE_ID`` and the same secret, any of
them reaching the database through a :class:`~faultproxy.FaultProxy`::

    with Cluster(tmp_path, 2, proxied=[1]) as cluster:
        a, b = cluster.nodes
        cluster.proxy(1).stall()      # node 1 loses its store, node 0 keeps it
        cluster.kill9(0); cluster.start(0)

The context manager always stops every process (a SIGSTOPped one too), closes the proxies and
drops the database it made, whatever the test did."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
import pytest
from faultproxy import FaultProxy
from pg import PG_URL, create_database, drop_database
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
            # Below the ack wait, as startup requires on PostgreSQL (a lost notice costs no attempt).
            "PIPEPROOF_CLUSTER_POLL_INTERVAL": "0.2",
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
        """Start the process (on the same port as before, when started again) and wait until
        ``/readyz`` answers 200."""
        return self.launch().wait_ready()

    def launch(self) -> ServerProcess:
        """Start the process without waiting for it: several nodes then boot side by side."""
        with self.log.open("ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVE, "--port", str(self.port), "--log-level", "warning"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout: float = 20.0) -> ServerProcess:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
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

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def base_url(self) -> str:
        """``ws://127.0.0.1:PORT``: what ``pipeproof conform`` takes."""
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGTERM (a graceful drain), SIGKILL if it has not exited within 10 s."""
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


_T = TypeVar("_T")


def _in_thread(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion on a fresh event loop in another thread: the cluster's
    database set-up and teardown work from plain and from async tests (whose own loop is busy
    running the test and cannot be re-entered)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cluster-db") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


class Cluster:
    """``n`` ``pipeproof serve`` nodes on one PostgreSQL database (PROTOCOL section 6, "Several
    nodes"); a context manager that always cleans up.

    By default a fresh database is created on the test server (``PIPEPROOF_TEST_POSTGRES_URL``) and
    dropped at the end; the test is skipped when that server is not configured or does not answer.
    ``database_url`` uses a given database instead (a :class:`~pgcluster.PgCluster`'s, to restart
    PostgreSQL under the nodes) and leaves it in place. Node ``i`` gets ``PIPEPROOF_NODE_ID``
    ``node-i`` and the harness's secret; ``env`` is added to every node, ``node_env[i]`` to node i
    only. A node listed in ``proxied`` reaches the database through its own :class:`FaultProxy`
    (:meth:`proxy`), so a test can cut, stall or slow one node's store and not the others'."""

    def __init__(
        self,
        tmp_path: Path,
        n: int = 2,
        *,
        proxied: Collection[int] = (),
        env: Mapping[str, str] | None = None,
        node_env: Mapping[int, Mapping[str, str]] | None = None,
        database_url: str | None = None,
        prefix: str = "pp_cluster",
        ready_timeout: float = 30.0,
    ) -> None:
        if n < 1 or any(not 0 <= i < n for i in proxied):
            raise ValueError(f"{n} nodes, proxied {sorted(proxied)}")
        self.tmp_path, self.n, self.prefix = tmp_path, n, prefix
        self.proxied = frozenset(proxied)
        self.common_env = dict(env or {})
        self.node_env = {i: dict(e) for i, e in (node_env or {}).items()}
        self.ready_timeout = ready_timeout
        self.database_url = database_url or ""
        self._owns_database = database_url is None
        self.nodes: list[ServerProcess] = []
        self.proxies: dict[int, FaultProxy] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> Cluster:
        """Make the database and the proxies, and start every node (side by side) until each is ready."""
        if self._owns_database:
            if PG_URL is None:
                pytest.skip("PostgreSQL is not configured: set PIPEPROOF_TEST_POSTGRES_URL to run cluster tests")
            try:
                self.database_url = _in_thread(lambda: create_database(self.prefix))
            except (OSError, ConnectionError) as exc:
                pytest.skip(f"PostgreSQL at {PG_URL.split('@')[-1]} is not reachable: {exc}")
        for i in range(self.n):
            url = self.database_url
            if i in self.proxied:
                self.proxies[i] = FaultProxy.for_url(url).start()
                url = self.proxies[i].route(url)
            self.nodes.append(ServerProcess(self.tmp_path / f"node{i}" / "data", {
                "PIPEPROOF_DATABASE_URL": url,
                "PIPEPROOF_NODE_ID": f"node-{i}",
                **self.common_env,
                **self.node_env.get(i, {}),
            }))
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_ready(self.ready_timeout)
        return self

    def close(self) -> None:
        """Stop every node (SIGCONT first: a stopped process cannot take SIGTERM), close the
        proxies, drop the database this cluster made. Safe to call twice."""
        for node in self.nodes:
            if node.running:
                assert node.proc is not None
                os.kill(node.proc.pid, signal.SIGCONT)
            node.stop()
        for proxy in self.proxies.values():
            proxy.close()
        if self._owns_database and self.database_url:
            url, self.database_url = self.database_url, ""
            _in_thread(lambda: drop_database(url))  # WITH (FORCE): a dying node's sessions go too

    # -- nodes -------------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> ServerProcess:
        return self.nodes[i]

    def __len__(self) -> int:
        return len(self.nodes)

    def proxy(self, i: int) -> FaultProxy:
        """Node ``i``'s fault proxy (the node must be listed in ``proxied``)."""
        if i not in self.proxies:
            raise KeyError(f"node {i} reaches the database directly; list it in proxied=")
        return self.proxies[i]

    def kill9(self, i: int) -> None:
        """SIGKILL node ``i``: no drain, no goodbye to its sockets or its leases."""
        self.nodes[i].kill9()

    def stop(self, i: int) -> None:
        """SIGTERM node ``i`` (its graceful drain) and wait for it to exit."""
        self.nodes[i].stop()

    def start(self, i: int) -> ServerProcess:
        """Start node ``i`` again (same port, same node id) and wait until it is ready."""
        if self.nodes[i].running:
            raise RuntimeError(f"node {i} is still running")
        self.nodes[i].launch()
        return self.nodes[i].wait_ready(self.ready_timeout)

    def pause(self, i: int) -> None:
        """SIGSTOP node ``i``: a node frozen as by a long GC pause (its sockets stay open)."""
        proc = self.nodes[i].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        proc = self.nodes[i].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGCONT)

    @property
    def urls(self) -> list[str]:
        """Every node's ``ws://127.0.0.1:PORT``, in node order (``pipeproof conform URL1 URL2 ...``)."""
        return [node.base_url for node in self.nodes]


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


__all__ = ["SERVE", "TERMINAL", "Cluster", "ServerProcess", "ended", "events_of", "free_port", "read_until"]
