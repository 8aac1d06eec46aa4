"""The reference server over real sockets: uvicorn on a loopback port, the ``websockets`` client
(PROTOCOL sections 1, 2, 3 and 6; the Transport section's HTTP endpoints).

Store-backed tests run on SQLite and, when PIPEPROOF_TEST_POSTGRES_URL is set, on PostgreSQL too.
Every server is checked at teardown: no close 1011 counted, no illegal transition counted.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from pg import BACKENDS, PG_URL, needs_pg
from server_harness import (
    RawClient,
    ServerPool,
    ServerThread,
    expect_close,
    init_frame,
    open_ws,
    recv_json,
)

from pipeproof.impl.auth import UserStatus, mint_token
from pipeproof.model.connection import CONNECTION
from pipeproof.model.context import context_machine
from pipeproof.model.spec import Machine

OTHER_SECRET = "a1B2-c3D4!e5F6@g7H8#i9J0$k1L2%m3N4^"
Factory = Callable[..., ServerThread]


class SlowDirectory:
    """Every user active (except ``disabled``), answered after ``delay``: keeps sockets in
    INITIALISING long enough to pipeline frames deterministically."""

    def __init__(self, delay: float = 0.3, disabled: tuple[str, ...] = ()) -> None:
        self.delay = delay
        self.disabled = disabled

    async def status(self, user: str) -> UserStatus:
        await asyncio.sleep(self.delay)
        return "disabled" if user in self.disabled else "active"


@pytest.fixture
def start_server(tmp_path: Path, backend: str) -> Iterator[Factory]:
    """Start servers with settings overrides; stop them and check their metrics afterwards."""
    pool = ServerPool(tmp_path, backend, "pp_srv")
    yield pool.start
    pool.close()


def token(server: ServerThread, user: str = "alice", **kwargs: Any) -> str:
    return mint_token(server.settings, user, **kwargs)


async def ready_socket(server: ServerThread, user: str = "alice", account: str = "default") -> Any:
    ws = await open_ws(server)
    await ws.send(init_frame(token(server, user, account=account)))
    ack = await recv_json(ws)
    assert ack["type"] == "connection_ack", ack
    return ws, ack


def run_start(request_id: str) -> str:
    return json.dumps({"type": "run.start", "request_id": request_id, "input": "hello"})


# -- section 1: handshake ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_pipelined_frames_are_handled_after_ready_in_order(start_server: Factory) -> None:
    server = start_server({"directory": SlowDirectory(0.3)})
    ws = await open_ws(server)
    # Everything in one burst, before the server could possibly have authenticated.
    await ws.send(init_frame(token(server)))
    await ws.send(run_start("r1"))
    await ws.send("{not json")
    await ws.send(run_start("r2"))
    await ws.send(json.dumps({"type": "ack", "seq": 0}))
    ack = await recv_json(ws)
    assert ack["type"] == "connection_ack"
    assert (ack["epoch"], ack["recovered"], ack["last_seq"], ack["heartbeat_ms"]) == (1, False, 0, 5000)
    replies = [await recv_json(ws) for _ in range(3)]
    assert [(r["type"], r["code"], r.get("request_id")) for r in replies] == [
        ("error", "runs_unavailable", "r1"),
        ("error", "invalid_message", None),
        ("error", "runs_unavailable", "r2"),
    ]
    # The socket stays open after a single malformed frame.
    await ws.send(run_start("r3"))
    assert (await recv_json(ws))["request_id"] == "r3"
    await ws.close()


async def test_first_frame_must_be_init(start_server: Factory) -> None:
    server = start_server()
    for first in (run_start("r1"), json.dumps({"type": "ack", "seq": 1}), "garbage", '{"type":"nope"}'):
        ws = await open_ws(server)
        await ws.send(first)
        code, reason, frames = await expect_close(ws)
        assert (code, reason, frames) == (4401, "init_required", [])


def _auth_cases() -> list[tuple[str, Callable[[ServerThread], str | None]]]:
    past = time.time() - 7200
    exp = int(time.time()) + 600
    return [
        ("token_missing", lambda s: None),
        ("token_malformed", lambda s: "not-a-jwt"),
        (
            "token_bad_signature",
            lambda s: jwt.encode({"sub": "alice", "exp": exp}, OTHER_SECRET, algorithm="HS256"),
        ),
        ("token_expired", lambda s: mint_token(s.settings, "alice", ttl_seconds=60, now=past)),
        ("token_not_yet_valid", lambda s: mint_token(s.settings, "alice", nbf=int(time.time()) + 600)),
        ("token_bad_audience", lambda s: mint_token(s.settings, "alice", aud="someone-else")),
        ("user_unknown", lambda s: mint_token(s.settings, "alice", sub="")),
    ]


@pytest.mark.parametrize(("reason", "make_token"), _auth_cases(), ids=[c[0] for c in _auth_cases()])
async def test_each_auth_failure_closes_4401_with_its_reason(
    start_server: Factory, reason: str, make_token: Callable[[ServerThread], str | None]
) -> None:
    server = start_server({"directory": SlowDirectory(0.05)})
    ws = await open_ws(server)
    await ws.send(init_frame(make_token(server)))
    await ws.send(run_start("buffered"))  # discarded unhandled: the init is rejected
    code, got, frames = await expect_close(ws)
    assert (code, got, frames) == (4401, reason, [])


async def test_malformed_init_token_is_token_malformed(start_server: Factory) -> None:
    server = start_server()
    ws = await open_ws(server)
    await ws.send(json.dumps({"type": "connection_init", "token": 12345}))
    assert (await expect_close(ws))[:2] == (4401, "token_malformed")


async def test_disabled_user_is_4403(start_server: Factory) -> None:
    server = start_server(disabled_users=["mallory"])
    ws = await open_ws(server)
    await ws.send(init_frame(token(server, "mallory")))
    assert (await expect_close(ws))[:2] == (4403, "user_disabled")


async def test_init_timeout_is_4408(start_server: Factory) -> None:
    server = start_server(init_timeout=0.3)
    ws = await open_ws(server)
    started = time.monotonic()
    assert (await expect_close(ws))[:2] == (4408, "init_timeout")
    assert 0.25 <= time.monotonic() - started < 2.0


async def test_duplicate_init_is_4429_while_initialising_and_when_ready(start_server: Factory) -> None:
    server = start_server({"directory": SlowDirectory(0.2)})
    ws = await open_ws(server)
    await ws.send(init_frame(token(server)))
    await ws.send(init_frame(token(server)))
    code, reason, frames = await expect_close(ws)
    assert (code, reason, frames) == (4429, "duplicate_init", [])

    ws, _ack = await ready_socket(server)
    await ws.send(init_frame(token(server)))
    assert (await expect_close(ws))[:2] == (4429, "duplicate_init")


async def test_preready_buffer_overflow_frames_and_bytes(start_server: Factory) -> None:
    server = start_server(
        {"directory": SlowDirectory(0.3)}, preready_buffer_frames=2, preready_buffer_bytes=1000
    )
    ws = await open_ws(server)
    await ws.send(init_frame(token(server)))
    for i in range(3):
        await ws.send(run_start(f"r{i}"))
    assert await expect_close(ws) == (4429, "preready_buffer_full", [])

    ws = await open_ws(server)
    await ws.send(init_frame(token(server)))
    await ws.send(json.dumps({"type": "run.start", "request_id": "big", "input": "x" * 2000}))
    assert await expect_close(ws) == (4429, "preready_buffer_full", [])

    # Within both budgets the same frames are fine.
    ws = await open_ws(server)
    await ws.send(init_frame(token(server)))
    await ws.send(run_start("ok"))
    assert (await recv_json(ws))["type"] == "connection_ack"
    assert (await recv_json(ws))["request_id"] == "ok"
    await ws.close()


async def test_error_budget_then_4400(start_server: Factory) -> None:
    server = start_server(error_budget=2)
    ws, _ack = await ready_socket(server)
    for _ in range(3):
        await ws.send('{"type":"unknown"}')
    code, reason, frames = await expect_close(ws)
    assert (code, reason) == (4400, "invalid_message")
    assert [f["code"] for f in frames] == ["invalid_message", "invalid_message"]


# -- section 3: contexts and limits --------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_fifty_concurrent_inits_for_one_user_yield_one_context(start_server: Factory) -> None:
    server = start_server(max_connections_per_user=64, max_connections_per_account=64)
    results = await asyncio.gather(*(ready_socket(server) for _ in range(50)))
    assert len({ack["context_id"] for _ws, ack in results}) == 1
    assert len({ack["session_id"] for _ws, ack in results}) == 50
    bob_ws, bob_ack = await ready_socket(server, "bob")
    assert bob_ack["context_id"] != results[0][1]["context_id"]
    await asyncio.gather(*(ws.close() for ws, _ in results), bob_ws.close())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_per_user_and_per_account_limits(start_server: Factory) -> None:
    server = start_server(max_connections_per_user=2, max_connections_per_account=3)
    a1, _ = await ready_socket(server, "alice", "acme")
    a2, _ = await ready_socket(server, "alice", "acme")
    ws = await open_ws(server)
    await ws.send(init_frame(token(server, "alice", account="acme")))
    assert await expect_close(ws) == (4429, "connection_limit", [])

    b1, _ = await ready_socket(server, "bob", "acme")
    ws = await open_ws(server)
    await ws.send(init_frame(token(server, "bob", account="acme")))
    assert await expect_close(ws) == (4429, "connection_limit", [])
    # Another account is unaffected.
    c1, _ = await ready_socket(server, "carol", "globex")

    # A closed socket gives its slot back.
    await a1.close()
    await asyncio.sleep(0.1)
    b2, _ = await ready_socket(server, "bob", "acme")
    for ws in (a2, b1, b2, c1):
        await ws.close()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_context_ttl_expiry_gives_a_new_epoch(start_server: Factory) -> None:
    # A short TTL needs a delivery horizon below it (a context may not outlive its events' deadlines).
    server = start_server(context_ttl=0.3, resume_window=0.1, ack_timeout=0.05, max_attempts=1, ack_jitter=0.0)
    ws, first = await ready_socket(server)
    await ws.close()
    ws, again = await ready_socket(server)
    assert again["context_id"] == first["context_id"]
    await ws.close()
    await asyncio.sleep(0.5)
    ws, later = await ready_socket(server)
    assert later["context_id"] != first["context_id"]
    assert later["epoch"] == first["epoch"] + 1
    await ws.close()
    await asyncio.sleep(0.1)
    events = [
        (line["event"], line["to"]) for line in server.audit_lines() if line["id"] == first["context_id"]
    ]
    assert events == [
        ("create", "LIVE"),
        ("detach", "LIVE"),
        ("attach", "LIVE"),
        ("detach", "LIVE"),
        ("expire", "EXPIRED"),
    ]


async def test_users_are_isolated(start_server: Factory) -> None:
    server = start_server()
    alice, a = await ready_socket(server, "alice")
    bob, b = await ready_socket(server, "bob")
    assert a["context_id"] != b["context_id"]
    # Part 1 has no readable per-context resources yet; a foreign run id answers like an unknown one.
    await bob.send(json.dumps({"type": "run.cancel", "run_id": "never-existed"}))
    await bob.send(json.dumps({"type": "run.cancel", "run_id": a["context_id"]}))
    first, second = await recv_json(bob), await recv_json(bob)
    assert first == second
    await alice.close()
    await bob.close()


# -- section 6: heartbeat, shutdown, overload ----------------------------------------------------


async def test_silent_peer_is_closed_4408_heartbeat_timeout(start_server: Factory) -> None:
    server = start_server(heartbeat_interval=0.2)
    raw = RawClient(server.ws_url)
    await raw.connect()
    raw.send_text(init_frame(token(server)))
    started = time.monotonic()
    code, reason, pings = await raw.wait_close(5.0)
    raw.close()
    assert (code, reason) == (4408, "heartbeat_timeout")
    assert pings >= 1
    assert 0.35 <= time.monotonic() - started < 2.0
    assert 'pipeproof_heartbeat_failures_total{kind="timeout"} 1.0' in server.metrics()


async def test_a_peer_answering_pings_stays_open(start_server: Factory) -> None:
    server = start_server(heartbeat_interval=0.2)
    ws, _ack = await ready_socket(server)  # the websockets client answers pings itself
    await asyncio.sleep(1.0)
    await ws.send(run_start("still-here"))
    assert (await recv_json(ws))["request_id"] == "still-here"
    await ws.close()


async def test_graceful_shutdown_closes_1001_through_drain(start_server: Factory) -> None:
    server = start_server()
    ws, ack = await ready_socket(server)
    server.server.should_exit = True  # type: ignore[union-attr]
    assert (await expect_close(ws))[:2] == (1001, "going_away")
    server.thread.join(timeout=10)  # type: ignore[union-attr]
    events = [line["event"] for line in server.audit_lines() if line["id"] == ack["session_id"]]
    assert events[-2:] == ["drain", "drain_close"]


async def test_a_memory_limit_below_the_idle_process_stops_startup(start_server: Factory) -> None:
    # It would refuse every socket from the first (tests/impl/test_memory.py has the guard at work).
    with pytest.raises(RuntimeError, match="startup"):
        start_server(memory_limit_mb=1)


# -- HTTP: readiness, health, metrics ------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_readyz_names_the_unreachable_store_postgresql_closed_port(start_server: Factory) -> None:
    url = f"postgresql+asyncpg://pp:secret-pw@127.0.0.1:{_closed_port()}/pp"
    server = start_server(database_url=url, store_timeout=1.0)
    response = server.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == "store_reachable"
    assert body["checks"]["config"] == "ok"
    assert body["checks"]["store_reachable"].startswith("store_unavailable")
    assert "secret-pw" not in response.text
    assert server.get("/healthz").status_code == 200
    ws = await open_ws(server)
    assert (await expect_close(ws))[:2] == (1013, "try_again_later")


async def test_readyz_503_until_the_store_is_back(tmp_path: Path, start_server: Factory) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the data directory should be")
    server = start_server(data_dir=blocker / "data")
    response = server.get("/readyz")
    assert response.status_code == 503
    assert response.json()["failing"] == "store_reachable"
    blocker.unlink()
    response = server.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ready",
        "checks": {
            "config": "ok", "store_reachable": "ok", "schema_version": "ok", "store_writable": "ok", "audit_log": "ok",
        },
    }
    ws, _ack = await ready_socket(server)
    await ws.close()
    assert 'pipeproof_store_errors_total{type="store_unavailable"}' in server.metrics()


async def test_metrics_names(start_server: Factory) -> None:
    server = start_server()
    ws, _ack = await ready_socket(server)
    text = server.metrics()
    assert 'pipeproof_connections{state="READY"} 1.0' in text
    await ws.close()
    for name in (
        "pipeproof_connections",
        "pipeproof_handshake_duration_seconds_bucket",
        "pipeproof_closes_total",
        "pipeproof_store_errors_total",
        "pipeproof_heartbeat_failures_total",
        "pipeproof_illegal_transitions_total",
    ):
        assert name in text or name.removesuffix("_total") in text, name
    # Each app has its own registry: nothing in the process-global one.
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("pipeproof_connections", {"state": "READY"}) is None


# -- the audit log -------------------------------------------------------------------------------


def _replay(machine: Machine, lines: list[dict[str, Any]]) -> None:
    """Every line is a step the model allows from the previous line's configuration."""
    config = machine.initial_config()
    for line in lines:
        assert line["from"] == config[0].name, line
        inputs = line["detail"].get("inputs", {})
        transition, config = machine.step(config, line["event"], inputs)
        assert transition.target.name == line["to"], line
        assert dict(zip(machine.var_names, config[1], strict=True)) == line["vars"], line


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_audit_log_chains_are_model_steps(start_server: Factory) -> None:
    server = start_server({"directory": SlowDirectory(0.1)}, max_connections_per_user=2, error_budget=1)
    ws1, _ = await ready_socket(server)
    ws = await open_ws(server)  # pipelined and then a duplicate init
    await ws.send(init_frame(token(server)))
    await ws.send(run_start("a"))
    await ws.send(init_frame(token(server)))
    await expect_close(ws)
    ws = await open_ws(server)  # bad token
    await ws.send(init_frame("nope"))
    await expect_close(ws)
    ws2, _ = await ready_socket(server)
    ws = await open_ws(server)  # over the per-user limit
    await ws.send(init_frame(token(server)))
    await expect_close(ws)
    await ws2.send("bad")
    await ws2.send("bad")
    await expect_close(ws2)
    await ws1.send(run_start("b"))
    await recv_json(ws1)
    await ws1.close()
    await asyncio.sleep(0.2)

    lines = server.audit_lines()
    keys = {"ts", "machine", "id", "user", "context_id", "event", "from", "to", "vars", "detail"}
    assert lines and all(set(line) == keys for line in lines)
    by_id: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for line in lines:
        assert isinstance(line["ts"], float)
        by_id.setdefault((line["machine"], line["id"]), []).append(line)
    connection = CONNECTION.with_params(buffer_max=server.settings.preready_buffer_frames)
    sockets = [chain for (machine, _), chain in by_id.items() if machine == "connection"]
    assert len(sockets) == 5
    for chain in sockets:
        _replay(connection, chain)
        assert chain[-1]["to"] == "CLOSED"
    contexts = [chain for (machine, _), chain in by_id.items() if machine == "context"]
    assert len(contexts) == 1
    _replay(context_machine(2), contexts[0])
    assert [line["event"] for line in contexts[0]].count("reject_limit") == 1


class TcpProxy:
    """A loopback TCP proxy the test can cut and restore: the store "becomes unreachable"."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # one side went away: the other is closed below, as a real network cut would
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))


@pytest.mark.postgres
@needs_pg
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_readyz_follows_a_postgresql_outage(start_server: Factory) -> None:
    from sqlalchemy.engine import make_url

    assert PG_URL is not None
    url = make_url(PG_URL)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    server = start_server(database_url=proxied, store_timeout=1.0)
    loop = asyncio.get_running_loop()
    get = functools.partial(loop.run_in_executor, None, server.get)
    assert (await get("/readyz")).status_code == 200
    await proxy.stop()
    response = await get("/readyz")
    assert response.status_code == 503
    assert response.json()["failing"] == "store_reachable"
    await proxy.start()
    response = await get("/readyz")
    assert response.status_code == 200, response.text
    ws, _ack = await ready_socket(server)
    await ws.close()
    await proxy.stop()
