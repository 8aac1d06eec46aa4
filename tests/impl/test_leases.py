"""Runs survive their node (PROTOCOL section 6, "When a node dies"; docs/deploy.md).

First :class:`~pipeproof.impl.leases.RunLeases` alone (its fence arithmetic, with a fake clock and
store), then real ``pipeproof serve`` processes on one PostgreSQL database each test: a run's lease, its takeover
after ``kill -9`` (on the node's own restart and on another node), the answers to a retried
``run.start`` and to ``run.cancel`` on a node that does not run the run, two nodes racing to take
the same runs over, and a stalled node that finds its run taken over.

Leases are short here (``run_lease_ttl`` 1.5 s, renewed every 0.3 s), so a takeover follows a kill
within about two seconds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
from pg import PG_URL, create_database, drop_database
from process_harness import ServerProcess, ended, events_of, read_until
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from websockets.asyncio.client import ClientConnection

from pipeproof.errors import LeaseLost
from pipeproof.impl.leases import Renewal, RunLeases
from pipeproof.impl.store import RunRecord

pytestmark = pytest.mark.slow
postgres = pytest.mark.postgres

TTL, RENEW = 1.5, 0.3
SLEEPING = 'hello\n/sleep {"seconds": 10}\nbye'


# -- RunLeases: the bookkeeping and the fence ----------------------------------------------------


class FakeStore:
    """The two lease calls of a store, answered from a dict run_id -> (owner, cancel_requested)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, bool]] = {}
        self.calls: list[tuple[str, Any]] = []

    async def renew_run_leases(self, node_id: str, run_ids: list[str], lease_expires: float) -> dict[str, bool]:
        self.calls.append(("renew", sorted(run_ids)))
        return {r: self.rows[r][1] for r in run_ids if r in self.rows and self.rows[r][0] == node_id}

    async def claim_runs(self, node_id: str, now: float, lease_expires: float, *, scope: str,
                         exclude: Collection[str]) -> list[RunRecord]:
        self.calls.append(("claim", sorted(exclude)))
        taken = [r for r, (owner, _) in self.rows.items() if owner == "dead" and r not in exclude]
        for r in taken:
            self.rows[r] = (node_id, False)
        return [RunRecord(r, "c", "req", "u", "ACCEPTED", 0.0, 0.0, node_id, lease_expires) for r in taken]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def leases_on(store: FakeStore, clock: Clock) -> RunLeases:
    return RunLeases(store, node_id="me", ttl=1.5, renew_interval=0.3,  # type: ignore[arg-type]
                     wall=lambda: 1_000.0 + clock.t, monotonic=clock)


async def test_the_fence_holds_for_ttl_minus_one_renewal_then_asks_the_store() -> None:
    store, clock = FakeStore(), Clock()
    leases = leases_on(store, clock)
    granted_at, expires = leases.stamp()
    assert expires == 1_000.0 + 100.0 + 1.5
    store.rows["r"] = ("me", False)
    leases.hold("r", granted_at)
    clock.t += 1.19
    assert leases.valid("r")
    await leases.ensure("r")
    assert store.calls == []  # inside the fence: no store round trip
    clock.t += 0.02  # 1.21 s since the grant: past ttl - renew_interval
    assert not leases.valid("r")
    await leases.ensure("r")  # renewed in the store, valid again
    assert store.calls == [("renew", ["r"])] and leases.valid("r")
    store.rows["r"] = ("other", False)  # taken over while this node stalled
    clock.t += 5
    with pytest.raises(LeaseLost) as lost:
        await leases.ensure("r")
    assert lost.value.run_ids == {"r"} and leases.lost("r") and not leases.holds("r")
    with pytest.raises(LeaseLost):
        await leases.ensure("r")
    assert len(store.calls) == 2  # known lost: no second round trip
    leases.release("r")
    assert not leases.lost("r")


async def test_a_renewal_reports_lost_leases_and_recorded_cancels_and_claims_skip_held_runs() -> None:
    store, clock = FakeStore(), Clock()
    leases = leases_on(store, clock)
    store.rows.update({"mine": ("me", False), "cancelled": ("me", True), "gone": ("other", False),
                       "orphan": ("dead", False)})
    granted_at, _ = leases.stamp()
    for run_id in ("mine", "cancelled", "gone"):
        leases.hold(run_id, granted_at)
    # A run being created: its row may not be committed yet, so a renewal must not ask for it
    # (it would find nothing and take the lease for lost), and a claim must not take it.
    leases.granting("new")
    renewal = await leases.renew()
    assert store.calls[-1] == ("renew", ["cancelled", "gone", "mine"])
    assert (renewal.lost, renewal.cancelled) == ({"gone"}, {"cancelled"})
    assert sorted(leases.held()) == ["cancelled", "mine"]
    claimed = await leases.claim("expired")
    assert [r.run_id for r in claimed] == ["orphan"] and leases.holds("orphan")
    assert store.calls[-1] == ("claim", ["cancelled", "mine", "new"])  # never its own live runs
    leases.hold("new", granted_at)
    assert sorted(leases.held()) == ["cancelled", "mine", "new", "orphan"]
    assert await RunLeases(store, node_id="x", ttl=1, renew_interval=0.5).renew() == Renewal(  # type: ignore[arg-type]
        frozenset(), frozenset())
    with pytest.raises(ValueError):
        RunLeases(store, node_id="x", ttl=1, renew_interval=1)  # type: ignore[arg-type]


# -- server processes on PostgreSQL ---------------------------------------------------------------


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for the test's server processes (they take a URL, not a schema)."""
    if PG_URL is None:
        pytest.skip("PostgreSQL is not configured: set PIPEPROOF_TEST_POSTGRES_URL to run the lease tests")
    try:
        url = await create_database("pp_lease")
    except (OSError, ConnectionError) as exc:
        pytest.skip(f"PostgreSQL at {PG_URL.split('@')[-1]} is not reachable: {exc}")
    yield url
    await drop_database(url)


class Nodes:
    """The server processes of one test, on its database; stopped at teardown."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.tmp_path, self.url = tmp_path, url
        self.procs: list[ServerProcess] = []

    def start(self, *, ttl: float = TTL, renew: float = RENEW, **env: str) -> ServerProcess:
        proc = ServerProcess(self.tmp_path / f"node{len(self.procs)}" / "data", {
            "PIPEPROOF_DATABASE_URL": self.url,
            "PIPEPROOF_RUN_LEASE_TTL": str(ttl),
            "PIPEPROOF_RUN_LEASE_RENEW_INTERVAL": str(renew),
            **{f"PIPEPROOF_{k.upper()}": v for k, v in env.items()},
        })
        self.procs.append(proc)
        return proc.start()

    def close(self) -> None:
        for proc in self.procs:
            if proc.proc is not None and proc.proc.poll() is None:
                os.kill(proc.proc.pid, signal.SIGCONT)  # a stopped process cannot take SIGTERM
            proc.stop()


@pytest.fixture
def nodes(tmp_path: Path, database: str) -> Iterator[Nodes]:
    pool = Nodes(tmp_path, database)
    yield pool
    pool.close()


async def query(url: str, sql: str, **params: Any) -> list[Any]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return list(await conn.execute(text(sql), params))
    finally:
        await engine.dispose()


async def send(ws: ClientConnection, frame: dict[str, Any]) -> None:
    await ws.send(json.dumps(frame))


async def start_sleeping_run(node: ServerProcess, request_id: str = "r1") -> tuple[ClientConnection, str, int]:
    """A socket on ``node`` with a run inside its 10 s sleep tool; returns (socket, run_id, the
    seq of its first event, which the client acked)."""
    ws, _ = await node.connect()
    await send(ws, {"type": "run.start", "request_id": request_id, "input": SLEEPING})
    frames = await read_until(ws, lambda fs: any(
        e["event"] == "tool_executing" and e["data"]["tool"] == "sleep" for e in events_of(fs)), timeout=10)
    (accepted,) = [f for f in frames if f["type"] == "run.accepted"]
    first = events_of(frames)[0]["seq"]
    await send(ws, {"type": "ack", "seq": first})
    await asyncio.sleep(0.2)  # the ack is stored
    return ws, accepted["run_id"], first


async def next_reply(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    frames = await read_until(ws, lambda fs: bool(fs) and fs[-1]["type"] != "event", timeout=timeout)
    return frames[-1]


def terminal_tail(events: list[dict[str, Any]]) -> list[str]:
    """The kinds after the last tool_executing: what ending an interrupted run appended."""
    kinds = [e["event"] for e in events]
    return kinds[max(i for i, k in enumerate(kinds) if k == "tool_executing") + 1:]


async def terminals(url: str, run_id: str) -> list[str]:
    rows = await query(url, "SELECT kind FROM events WHERE run_id = :r AND kind IN "
                            "('agent_completed', 'agent_failed') ORDER BY seq", r=run_id)
    return [str(r.kind) for r in rows]


# -- a single node on PostgreSQL ------------------------------------------------------------------


@postgres
async def test_a_restarted_node_with_a_stable_id_ends_its_own_runs_at_once(nodes: Nodes, database: str) -> None:
    # A lease of 30 s that the restart does not wait for: the same node id means the lease is this
    # node's own, left by its previous process.
    node = nodes.start(ttl=30, renew=10, node_id="node-a")
    ws, run_id, acked = await start_sleeping_run(node)
    node.kill9()
    await ws.close()
    started = time.monotonic()
    node.start()
    ws, ack = await node.connect(resume=acked)
    assert ack["recovered"] is True
    frames = await read_until(ws, ended(run_id), timeout=10, ack=True)
    assert time.monotonic() - started < 15  # well before the 30 s lease would have run out
    events = events_of(frames, run_id)
    assert [e["seq"] for e in events] == list(range(acked + 1, events[-1]["seq"] + 1))
    assert terminal_tail(events) == ["tool_completed", "agent_failed"]
    assert events[-1]["data"]["code"] == "interrupted"
    assert await terminals(database, run_id) == ["agent_failed"]
    (row,) = await query(database, "SELECT state, owner_node FROM runs WHERE run_id = :r", r=run_id)
    assert (row.state, row.owner_node) == ("FAILED", "node-a")
    await ws.close()


@postgres
async def test_a_restarted_node_with_a_fresh_id_ends_its_old_runs_when_their_lease_expires(
    nodes: Nodes, database: str
) -> None:
    node = nodes.start()
    ws, run_id, acked = await start_sleeping_run(node)
    node.kill9()
    await ws.close()
    node.start()  # a new process, a new node id: the old lease is another node's
    ws, _ = await node.connect(resume=acked)
    frames = await read_until(ws, ended(run_id), timeout=10, ack=True)
    events = events_of(frames, run_id)
    assert terminal_tail(events) == ["tool_completed", "agent_failed"]
    assert events[-1]["data"]["code"] == "node_lost"
    assert node.metric('pipeproof_runs_taken_over_total{code="node_lost"}') == 1
    (row,) = await query(database, "SELECT state FROM runs WHERE run_id = :r", r=run_id)
    assert row.state == "FAILED"
    await ws.close()


# -- two nodes on one database --------------------------------------------------------------------


@postgres
async def test_a_run_of_a_killed_node_is_taken_over_by_another_and_resumed_there(
    nodes: Nodes, database: str
) -> None:
    a, b = nodes.start(), nodes.start()
    ws_a, run_id, acked = await start_sleeping_run(a)
    stored = [e for e in a.stream() if e["run_id"] == run_id]
    a.kill9()
    await ws_a.close()
    ws, ack = await b.connect(resume=acked)
    assert ack["recovered"] is True
    frames = await read_until(ws, ended(run_id), timeout=10, ack=True)
    events = events_of(frames, run_id)
    # The resume on B gets what A stored and the client had not acked, then B's takeover.
    assert [e["event_id"] for e in events[: len(stored) - 1]] == [e["event_id"] for e in stored[1:]]
    assert [e["seq"] for e in events] == list(range(acked + 1, events[-1]["seq"] + 1))
    assert terminal_tail(events) == ["tool_completed", "agent_failed"]
    assert events[-1]["data"]["code"] == "node_lost"
    # Retrying the request on B: the same run, whose end is in the stream.
    await send(ws, {"type": "run.start", "request_id": "r1", "input": SLEEPING})
    assert await next_reply(ws) == {"type": "run.accepted", "request_id": "r1", "run_id": run_id}
    assert [e["event"] for e in b.stream() if e["run_id"] == run_id][-1] == "agent_failed"
    # A cancel of it on B is answered too.
    await send(ws, {"type": "run.cancel", "run_id": run_id})
    reply = await next_reply(ws)
    assert (reply["type"], reply["code"]) == ("error", "run_finished")
    assert await terminals(database, run_id) == ["agent_failed"]
    (row,) = await query(database, "SELECT state FROM runs WHERE run_id = :r", r=run_id)
    assert row.state == "FAILED"
    await ws.close()


@postgres
async def test_a_cancel_on_another_node_is_honoured_by_the_owner_and_answered_where_it_was_sent(
    nodes: Nodes, database: str
) -> None:
    a, b = nodes.start(), nodes.start()
    ws_a, run_id, _ = await start_sleeping_run(a)
    ws_b, _ = await b.connect()
    await send(ws_b, {"type": "run.cancel", "run_id": run_id})
    # A reads the cancel when it renews the lease and cancels the run; B hands its end to the
    # socket that asked.
    on_b = events_of(await read_until(ws_b, ended(run_id), timeout=10), run_id)
    on_a = events_of(await read_until(ws_a, ended(run_id), timeout=10), run_id)
    assert on_b[-1]["event"] == on_a[-1]["event"] == "agent_failed"
    assert on_b[-1]["data"]["code"] == "cancelled" and on_b[-1]["seq"] == on_a[-1]["seq"]
    assert await terminals(database, run_id) == ["agent_failed"]
    # Unknown runs are still run_not_found there.
    await send(ws_b, {"type": "run.cancel", "run_id": "no-such-run"})
    assert (await next_reply(ws_b))["code"] == "run_not_found"
    await ws_a.close()
    await ws_b.close()


@postgres
async def test_a_cancel_of_a_dead_nodes_run_is_honoured_by_the_takeover(nodes: Nodes, database: str) -> None:
    a, b = nodes.start(ttl=3, renew=0.5), nodes.start(ttl=3, renew=0.5)
    ws_a, run_id, acked = await start_sleeping_run(a)
    a.kill9()
    await ws_a.close()
    ws, _ = await b.connect(resume=acked)
    await send(ws, {"type": "run.cancel", "run_id": run_id})  # before A's lease runs out
    events = events_of(await read_until(ws, ended(run_id), timeout=10, ack=True), run_id)
    assert terminal_tail(events) == ["tool_completed", "agent_failed"]
    assert events[-1]["data"]["code"] == "cancelled"
    assert await terminals(database, run_id) == ["agent_failed"]
    await ws.close()


@postgres
async def test_two_nodes_taking_over_at_once_end_each_run_exactly_once(nodes: Nodes, database: str) -> None:
    # B and C scan for expired leases twenty times a second, so their claims overlap when A's
    # leases run out: one conditional UPDATE each, and the database lets one of them take a run.
    a = nodes.start()
    b, c = nodes.start(renew=0.05), nodes.start(renew=0.05)
    run_ids: list[str] = []
    sockets = []
    for i in range(6):
        ws, _ = await a.connect(f"user-{i}")
        sockets.append(ws)
        # One running, one waiting behind it: both held by A's leases.
        for req, text_ in (("slow", SLEEPING), ("queued", "2+2")):
            await send(ws, {"type": "run.start", "request_id": req, "input": text_})
            reply = await next_reply(ws)
            assert reply["type"] == "run.accepted", reply
            run_ids.append(reply["run_id"])
    await asyncio.sleep(0.5)
    a.kill9()
    for ws in sockets:
        await ws.close()
    async with asyncio.timeout(15):
        while True:
            rows = await query(database, "SELECT run_id, state, owner_node FROM runs")
            if {r.state for r in rows} == {"FAILED"}:
                break
            await asyncio.sleep(0.2)
    assert {r.run_id for r in rows} == set(run_ids)
    kinds = await query(database, "SELECT run_id, kind FROM events WHERE kind IN ('agent_completed', 'agent_failed')")
    per_run: dict[str, int] = {}
    for row in kinds:
        per_run[row.run_id] = per_run.get(row.run_id, 0) + 1
    assert per_run == dict.fromkeys(run_ids, 1)  # one terminal each: no run was ended twice
    taken = b.metric("pipeproof_runs_taken_over_total") + c.metric("pipeproof_runs_taken_over_total")
    assert taken == len(run_ids)
    assert b.metric("pipeproof_illegal_transitions_total") == c.metric("pipeproof_illegal_transitions_total") == 0


@postgres
async def test_a_stalled_node_whose_run_was_taken_over_appends_nothing_more(nodes: Nodes, database: str) -> None:
    a, b = nodes.start(), nodes.start()
    ws_a, _ = await a.connect()
    await send(ws_a, {"type": "run.start", "request_id": "r1", "input": 'hello\n/sleep {"seconds": 2}\nbye'})
    # Inside the sleep tool (the echo before it is instant and may be done by then).
    frames = await read_until(
        ws_a,
        lambda fs: any(e["event"] == "tool_executing" and e["data"]["tool"] == "sleep" for e in events_of(fs)),
        timeout=10,
    )
    run_id = next(f["run_id"] for f in frames if f["type"] == "run.accepted")
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGSTOP)  # A stalls past its lease, inside the tool
    try:
        async with asyncio.timeout(10):
            while await terminals(database, run_id) == []:
                await asyncio.sleep(0.2)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    # A wakes up with its tool done: it must find the lease gone and append nothing more.
    async with asyncio.timeout(10):
        while a.metric('pipeproof_runs_total{outcome="lease_lost"}') < 1:
            await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    rows = await query(database, "SELECT kind, data FROM events WHERE run_id = :r ORDER BY seq", r=run_id)
    kinds = [str(r.kind) for r in rows]
    sleep_ends = [r for r in rows if r.kind == "tool_completed" and json.loads(r.data)["tool"] == "sleep"]
    assert kinds[-2:] == ["tool_completed", "agent_failed"] and len(sleep_ends) == 1, kinds
    assert json.loads(rows[-1].data)["code"] == "node_lost"
    assert b.metric('pipeproof_runs_taken_over_total{code="node_lost"}') == 1
    await ws_a.close()
