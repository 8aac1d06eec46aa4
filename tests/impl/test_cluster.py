"""Several ``pipeproof serve`` nodes on one PostgreSQL database (PROTOCOL section 3, section 5,
section 5 "Several nodes"; impl/cluster.py and the cluster paths of impl/delivery.py), started by
the :class:`~process_harness.Cluster` harness. Each row of what was measured against two nodes,
as the protocol says it must behave:

* both become ready, and 50 ``connection_init`` for one user sent at the same moment, half to each
  node, are all acked with one ``context_id`` (a database constraint, not a per-process lock);
* a user with a socket on A and one on B sees a run started on A on both;
* a socket dropped on A mid-run and resumed on B gets the rest there, and nothing is escalated
  ``no_session`` while the user holds B's socket;
* a finished run nobody acked is redelivered by a resume on the other node;
* the per-user limit holds across nodes, and a dead node's sockets stop counting.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from pgcluster import PgCluster
from process_harness import Cluster, ended, events_of, read_until
from server_harness import init_frame
from test_leases import query, send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

INITS = 50
LEASES = {"PIPEPROOF_RUN_LEASE_TTL": "1.5", "PIPEPROOF_RUN_LEASE_RENEW_INTERVAL": "0.3"}


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return frame


async def test_two_nodes_are_ready_and_concurrent_inits_on_both_make_one_context(tmp_path: Path) -> None:
    # The per-user limit is raised above INITS: this test is about the context, not the limit.
    with Cluster(tmp_path, 2, env={"PIPEPROOF_MAX_CONNECTIONS_PER_USER": str(INITS + 14)}) as cluster:
        async with httpx.AsyncClient(timeout=5) as http:
            for node in cluster.nodes:
                assert (await http.get(f"{node.http}/readyz")).status_code == 200
        assert len({node.env["PIPEPROOF_NODE_ID"] for node in cluster.nodes}) == 2
        token = cluster[0].token("alice")  # one secret for the cluster: node 0's token is good on node 1
        sockets = await asyncio.gather(*(
            connect(cluster[i % 2].ws, ping_interval=None, open_timeout=10) for i in range(INITS)))
        try:
            await asyncio.gather(*(ws.send(init_frame(token)) for ws in sockets))
            acks = await asyncio.gather(*(recv_json(ws) for ws in sockets))
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
        assert [a["type"] for a in acks] == ["connection_ack"] * INITS, acks
        per_node = {n: {a["context_id"] for a in acks[n::2]} for n in (0, 1)}
        assert per_node[0] == per_node[1] and len(per_node[0]) == 1, per_node
        assert len({a["epoch"] for a in acks}) == 1


async def test_a_proxied_node_reaches_the_store_through_its_proxy_and_a_killed_node_starts_again(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, 2, proxied=[1]) as cluster:
        assert cluster.proxy(1).accepted >= 1 and cluster.proxy(1).bytes_down > 0  # node 1's pool
        assert cluster[1].env["PIPEPROOF_DATABASE_URL"] != cluster.database_url
        with pytest.raises(KeyError):
            cluster.proxy(0)
        ws, ack = await cluster[1].connect("bob")
        await ws.close()
        port = cluster[0].port
        cluster.kill9(0)
        assert not cluster[0].running and cluster[1].running
        cluster.start(0)  # the same port and node id, the same database: bob's context is there
        assert cluster[0].port == port
        ws, again = await cluster[0].connect("bob")
        await ws.close()
        assert again["context_id"] == ack["context_id"]
        cluster.stop(0)
        assert not cluster[0].running
    assert not cluster[1].running  # the context manager stopped the rest


# -- fan-out, resume, limits across nodes ----------------------------------------------------------

RUN = 'hello\n/sleep {"seconds": 1}\nbye'


async def collect(
    ws: ClientConnection, predicate: Any, timeout: float = 15.0, ack: bool = True
) -> list[dict[str, Any]]:
    return await read_until(ws, predicate, timeout=timeout, ack=ack)


async def start_run(ws: ClientConnection, text: str = RUN, request_id: str = "r1") -> str:
    await send(ws, {"type": "run.start", "request_id": request_id, "input": text})
    frames = await read_until(ws, lambda fs: any(f["type"] == "run.accepted" for f in fs), timeout=5)
    return str(next(f["run_id"] for f in frames if f["type"] == "run.accepted"))


def seqs(frames: list[dict[str, Any]], run_id: str | None = None) -> list[int]:
    return [e["seq"] for e in events_of(frames, run_id)]


async def states(url: str) -> dict[str, int]:
    rows = await query(url, "SELECT state, reason, count(*) AS n FROM events GROUP BY state, reason")
    return {f"{r.state}:{r.reason}" if r.reason else str(r.state): int(r.n) for r in rows}


@pytest.mark.parametrize("learning", ["notices", "polls"])
async def test_a_run_on_a_reaches_the_users_socket_on_b(tmp_path: Path, learning: str) -> None:
    # Each way a node learns, alone: notices with a poll too slow to matter within the test, then
    # polls alone (notices off), as behind a pooler that cannot hold a LISTEN.
    learn = ({"PIPEPROOF_CLUSTER_POLL_INTERVAL": "120", "PIPEPROOF_ACK_TIMEOUT": "200"} if learning == "notices" else
             {"PIPEPROOF_CLUSTER_NOTIFY": "false", "PIPEPROOF_CLUSTER_POLL_INTERVAL": "0.2"})
    with Cluster(tmp_path, 2, env={**LEASES, **learn}) as cluster:
        a, b = cluster.nodes
        database = cluster.database_url
        ws_a, _ = await a.connect()
        ws_b, _ = await b.connect()
        run_id = await start_run(ws_a)
        on_a, on_b = await asyncio.gather(collect(ws_a, ended(run_id)), collect(ws_b, ended(run_id)))
        assert seqs(on_a, run_id) == seqs(on_b, run_id) == list(range(1, len(seqs(on_a, run_id)) + 1))
        assert [e["event_id"] for e in events_of(on_a)] == [e["event_id"] for e in events_of(on_b)]
        assert b.metric("pipeproof_events_relayed_total") > 0
        async with asyncio.timeout(10):
            while (counted := await states(database)) != {"ACKED": len(seqs(on_a, run_id))}:
                await asyncio.sleep(0.2)
        assert counted == {"ACKED": len(seqs(on_a, run_id))}
        await ws_a.close()
        await ws_b.close()


async def test_a_socket_dropped_on_a_mid_run_resumes_on_b_and_gets_the_rest(tmp_path: Path) -> None:
    # A short resume window: a no_session escalation would come within the test if B's socket
    # were not seen as the user's session.
    with Cluster(tmp_path, 2, env={**LEASES, "PIPEPROOF_RESUME_WINDOW": "2"}) as cluster:
        a, b = cluster.nodes
        database = cluster.database_url
        ws_a, _ = await a.connect()
        run_id = await start_run(ws_a, 'hello\n/sleep {"seconds": 2}\nbye')
        first = await read_until(ws_a, lambda fs: any(e["event"] == "tool_executing" for e in events_of(fs)),
                                 timeout=10, ack=True)
        last = seqs(first)[-1]
        await ws_a.close()
        ws_b, ack = await b.connect(resume=last)
        assert ack["recovered"] is True
        rest = await collect(ws_b, ended(run_id), timeout=20)
        got = sorted(set(seqs(rest, run_id)))
        assert got[0] == last + 1 and got == list(range(last + 1, got[-1] + 1))
        await asyncio.sleep(3)  # past the resume window: still nothing escalated
        counted = await states(database)
        assert counted == {"ACKED": got[-1]}, counted
        assert a.metric('pipeproof_escalations_total{reason="no_session"}') == 0
        assert b.metric('pipeproof_escalations_total{reason="no_session"}') == 0
        await ws_b.close()


async def test_a_finished_run_nobody_acked_is_redelivered_on_the_other_node(tmp_path: Path) -> None:
    with Cluster(tmp_path, 2, env=LEASES) as cluster:
        a, b = cluster.nodes
        database = cluster.database_url
        ws_a, _ = await a.connect()
        run_id = await start_run(ws_a, "hello")
        frames = await collect(ws_a, ended(run_id), ack=False)
        sent = seqs(frames, run_id)
        await ws_a.close()
        ws_b, _ = await b.connect(resume=0)
        again = await collect(ws_b, lambda fs: set(seqs(fs, run_id)) >= set(sent), timeout=15)
        assert sorted(set(seqs(again, run_id))) == sent
        # The attempt in flight (caught up on, as a joining socket is on one node) or a later one.
        assert all(e["attempt"] >= 1 for e in events_of(again))
        async with asyncio.timeout(10):
            while await states(database) != {"ACKED": len(sent)}:
                await asyncio.sleep(0.2)
        await ws_b.close()


async def test_the_per_user_limit_holds_across_nodes_and_a_dead_nodes_sockets_stop_counting(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, 2, env={**LEASES, "PIPEPROOF_MAX_CONNECTIONS_PER_USER": "8"}) as cluster:
        a, b = cluster.nodes
        database = cluster.database_url
        held: list[ClientConnection] = []
        refused: list[int] = []
        for i in range(16):
            node = (a, b)[i % 2]
            ws = await connect(node.ws, ping_interval=None, open_timeout=5)
            await ws.send(json.dumps({"type": "connection_init", "token": node.token("carol")}))
            try:
                reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert reply["type"] == "connection_ack", reply
                held.append(ws)
            except ConnectionClosed as closed:
                assert closed.rcvd is not None
                refused.append(closed.rcvd.code)
        assert len(held) == 8 and refused == [4429] * 8
        (row,) = await query(database, "SELECT count(*) AS n FROM sessions WHERE user_id = 'carol'")
        assert row.n == 8
        # A dies holding its four: once its heartbeat runs out they no longer count.
        a.kill9()
        async with asyncio.timeout(10):
            while not await _slot_free(b):
                await asyncio.sleep(0.3)
        for ws in held:
            await ws.close()


async def _slot_free(node: Any) -> bool:
    ws = await connect(node.ws, ping_interval=None, open_timeout=5)
    try:
        await ws.send(json.dumps({"type": "connection_init", "token": node.token("carol")}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        return bool(reply["type"] == "connection_ack")
    except ConnectionClosed:
        return False
    finally:
        await ws.close()


# -- nodes failing: kill -9, drain, the store cut or restarted -------------------------------------

SLEEPING = 'hello\n/sleep {"seconds": 10}\nbye'


async def run_to_sleep(ws: ClientConnection, text: str = SLEEPING) -> tuple[str, list[dict[str, Any]]]:
    """Start a run and read (acking) until its sleep tool runs; returns the run id and the frames."""
    run_id = await start_run(ws, text)
    frames = await read_until(ws, lambda fs: any(
        e["event"] == "tool_executing" and e["data"]["tool"] == "sleep" for e in events_of(fs)), timeout=10, ack=True)
    return run_id, frames


async def settled(database: str, timeout: float = 15.0) -> dict[str, int]:
    """Wait until no event is PENDING or SENT; returns the counts by state (and reason)."""
    async with asyncio.timeout(timeout):
        while True:
            counted = await states(database)
            if not {"PENDING", "SENT"} & set(counted):
                return counted
            await asyncio.sleep(0.2)


async def test_a_node_killed_mid_run_its_run_ends_on_the_other_node_and_reaches_the_socket_there(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, 2, env=LEASES) as cluster:
        a, b = cluster.nodes
        ws_b, _ = await b.connect()
        ws_a, _ = await a.connect()
        run_id, frames = await run_to_sleep(ws_a)
        before = await read_until(ws_b, lambda fs: seqs(fs, run_id)[-1:] == seqs(frames, run_id)[-1:],
                                  timeout=10, ack=True)
        cluster.kill9(0)
        rest = await collect(ws_b, ended(run_id), timeout=20)
        events = events_of(before + rest, run_id)
        assert events[-1]["event"] == "agent_failed" and events[-1]["data"]["code"] == "node_lost"
        assert sorted({e["seq"] for e in events}) == list(range(1, events[-1]["seq"] + 1))
        # Retrying the request on B answers with the run as it is; a cancel of it is answered.
        await send(ws_b, {"type": "run.start", "request_id": "r1", "input": SLEEPING})
        replies = await read_until(ws_b, lambda fs: any(f["type"] == "run.accepted" for f in fs), timeout=5)
        assert [f["run_id"] for f in replies if f["type"] == "run.accepted"] == [run_id]
        await send(ws_b, {"type": "run.cancel", "run_id": run_id})
        reply = await read_until(ws_b, lambda fs: any(f["type"] == "error" for f in fs), timeout=5, ack=True)
        assert [f["code"] for f in reply if f["type"] == "error"] == ["run_finished"]
        assert await settled(cluster.database_url) == {"ACKED": events[-1]["seq"]}
        (row,) = await query(cluster.database_url, "SELECT state FROM runs WHERE run_id = :r", r=run_id)
        assert row.state == "FAILED"
        await ws_b.close()


async def test_a_draining_node_hands_its_sockets_to_another_and_nothing_is_lost(tmp_path: Path) -> None:
    # SIGTERM mid-run: the socket is closed 1001 going_away; resumed on B, it gets the rest of the
    # run, its terminal event included, whichever node appended it.
    env = {**LEASES, "PIPEPROOF_SHUTDOWN_GRACE": "2"}
    with Cluster(tmp_path, 2, env=env) as cluster:
        a, b = cluster.nodes
        ws_a, _ = await a.connect()
        run_id, frames = await run_to_sleep(ws_a, 'hello\n/sleep {"seconds": 1}\nbye')
        last = seqs(frames, run_id)[-1]
        stopping = asyncio.get_running_loop().run_in_executor(None, cluster.stop, 0)
        with pytest.raises(ConnectionClosed) as closed:
            await read_until(ws_a, lambda fs: False, timeout=10, ack=True)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        ws_b, _ = await b.connect(resume=last)
        rest = await collect(ws_b, ended(run_id), timeout=20)
        await stopping
        got = sorted({e["seq"] for e in events_of(rest, run_id)})
        assert got == list(range(last + 1, got[-1] + 1)), got
        assert events_of(rest, run_id)[-1]["event"] in ("agent_completed", "agent_failed")
        assert await settled(cluster.database_url) == {"ACKED": got[-1]}
        await ws_b.close()


async def test_three_nodes_a_run_reaches_every_socket_and_each_event_is_acked_once(tmp_path: Path) -> None:
    with Cluster(tmp_path, 3, env=LEASES) as cluster:
        sockets = [(await node.connect())[0] for node in cluster.nodes]
        run_id = await start_run(sockets[1])
        seen = await asyncio.gather(*(collect(ws, ended(run_id)) for ws in sockets))
        assert len({tuple(seqs(frames, run_id)) for frames in seen}) == 1
        total = len(seqs(seen[0], run_id))
        assert await settled(cluster.database_url) == {"ACKED": total}
        acked = sum(node.metric("pipeproof_events_acked_total") for node in cluster.nodes)
        assert acked == total  # each event's ack fired once, on its owner
        for ws in sockets:
            await ws.close()


async def test_one_nodes_store_cut_past_its_lease_and_restored_loses_nothing(tmp_path: Path) -> None:
    # A reaches PostgreSQL through a fault proxy. Cut for longer than the lease TTL mid-run: B
    # takes A's run over (node_lost) and the context's delivery; restored, A finds both gone and
    # appends nothing more. The socket on B gets every event, the terminal one included.
    with Cluster(tmp_path, 2, proxied=[0], env=LEASES) as cluster:
        a, b = cluster.nodes
        ws_b, _ = await b.connect()
        ws_a, _ = await a.connect()
        run_id, _ = await run_to_sleep(ws_a)
        cluster.proxy(0).cut()
        rest = await collect(ws_b, ended(run_id), timeout=20)
        cluster.proxy(0).restore()
        events = events_of(rest, run_id)
        assert sorted({e["seq"] for e in events}) == list(range(1, events[-1]["seq"] + 1))
        assert events[-1]["data"]["code"] == "node_lost"
        await asyncio.sleep(2)  # A is back: it must add nothing to the ended run
        assert await terminals_of(cluster.database_url, run_id) == ["agent_failed"]
        counted = await settled(cluster.database_url)
        assert set(counted) <= {"ACKED", "ESCALATED:max_attempts"}, counted
        await ws_b.close()
        await ws_a.close()


async def test_a_stalled_store_connection_delays_delivery_and_loses_nothing(tmp_path: Path) -> None:
    # B's store stalls (packets held, no error) for a second mid-run, then flows again: B's socket
    # still gets every event once the store answers, and every event ends acked.
    with Cluster(tmp_path, 2, proxied=[1], env=LEASES) as cluster:
        a, b = cluster.nodes
        ws_a, _ = await a.connect()
        ws_b, _ = await b.connect()
        run_id = await start_run(ws_a, 'hello\n/sleep {"seconds": 2}\nbye')
        cluster.proxy(1).stall()
        reading = asyncio.gather(collect(ws_a, ended(run_id), timeout=30), collect(ws_b, ended(run_id), timeout=30))
        await asyncio.sleep(1.0)
        cluster.proxy(1).restore()
        on_a, on_b = await reading
        assert sorted(set(seqs(on_b, run_id))) == seqs(on_a, run_id)
        assert await settled(cluster.database_url, timeout=30) == {"ACKED": len(seqs(on_a, run_id))}
        await ws_a.close()
        await ws_b.close()


async def test_postgresql_restarted_under_two_nodes_every_run_ends_and_nothing_is_lost(tmp_path: Path) -> None:
    with PgCluster() as pg:
        database = pg.url
        with Cluster(tmp_path, 2, env={**LEASES, "PIPEPROOF_STORE_TIMEOUT": "2"}, database_url=database) as cluster:
            a, b = cluster.nodes
            ws_a, _ = await a.connect()
            ws_b, _ = await b.connect()
            run_id = await start_run(ws_a, 'hello\n/sleep {"seconds": 2}\nbye')
            await read_until(ws_a, lambda fs: any(e["event"] == "tool_executing" for e in events_of(fs)),
                             timeout=10, ack=True)
            await asyncio.get_running_loop().run_in_executor(None, pg.restart)
            # Sockets may be closed try_again_later while the store is away: resume until the run ends.
            events = await resume_until_ended(b, run_id, ws_b)
            assert events[-1]["event"] in ("agent_completed", "agent_failed")
            counted = await settled(database, timeout=30)
            assert set(counted) <= {"ACKED", "ESCALATED:max_attempts", "ESCALATED:no_session"}, counted
            assert await terminals_of(database, run_id) in (["agent_completed"], ["agent_failed"])
            await ws_a.close()


async def resume_until_ended(
    node: Any, run_id: str, ws: ClientConnection, timeout: float = 40.0
) -> list[dict[str, Any]]:
    """Read (acking) on ``ws`` and, whenever it closes, resume on ``node`` from the highest seq
    received, until the run's terminal event; returns every event of the run received."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                frames = await read_until(ws, ended(run_id), timeout=timeout, ack=True)
                got.extend(events_of(frames, run_id))
                return got
            except ConnectionClosed:
                pass
            while True:
                try:
                    ws, _ = await node.connect(resume=max([e["seq"] for e in got], default=0))
                    break
                except (ConnectionClosed, AssertionError, OSError):
                    await asyncio.sleep(0.5)


async def terminals_of(url: str, run_id: str) -> list[str]:
    rows = await query(url, "SELECT kind FROM events WHERE run_id = :r AND kind IN "
                            "('agent_completed', 'agent_failed') ORDER BY seq", r=run_id)
    return [str(r.kind) for r in rows]


async def test_retries_and_escalations_happen_once_in_the_cluster(tmp_path: Path) -> None:
    # Nobody acks: each event goes out max_attempts times, each attempt to the sockets on both
    # nodes once, and is escalated once, counted once across the nodes.
    env = {**LEASES, "PIPEPROOF_ACK_TIMEOUT": "0.3", "PIPEPROOF_ACK_BACKOFF": "1", "PIPEPROOF_MAX_ATTEMPTS": "3"}
    with Cluster(tmp_path, 2, env=env) as cluster:
        a, b = cluster.nodes
        ws_a, _ = await a.connect()
        ws_b, _ = await b.connect()
        run_id = await start_run(ws_a, "hello")

        def attempts_done(frames: list[dict[str, Any]]) -> bool:
            return any(e["attempt"] == 3 and e["event"] == "agent_completed" for e in events_of(frames, run_id))

        on_a, on_b = await asyncio.gather(
            read_until(ws_a, attempts_done, timeout=20), read_until(ws_b, attempts_done, timeout=20))
        counted = await settled(cluster.database_url)
        total = sum(counted.values())
        assert counted == {"ESCALATED:max_attempts": total}, counted
        for frames in (on_a, on_b):
            pairs = [(e["seq"], e["attempt"]) for e in events_of(frames, run_id)]
            assert sorted(pairs) == sorted({(s, n) for s in range(1, total + 1) for n in (1, 2, 3)}), pairs
        rows = await query(cluster.database_url, "SELECT attempt FROM events")
        assert {r.attempt for r in rows} == {3}
        escalations = sum(node.metric('pipeproof_escalations_total{reason="max_attempts"}') for node in cluster.nodes)
        assert escalations == total
        await ws_a.close()
        await ws_b.close()
