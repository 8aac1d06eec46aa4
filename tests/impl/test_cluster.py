"""Two ``pipeproof serve`` nodes on one PostgreSQL database (PROTOCOL section 3, one context per
user; section 6, "Several nodes"), started by the :class:`~process_harness.Cluster` harness: both
become ready, and 50 ``connection_init`` for one user sent at the same moment, half to each node,
are all acked with one ``context_id``: one context per user is a database constraint, not a
per-process lock."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from process_harness import Cluster
from server_harness import init_frame
from websockets.asyncio.client import ClientConnection, connect

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

INITS = 50


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
