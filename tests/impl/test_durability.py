"""Durability (PROTOCOL sections 5 and 6): ``kill -9`` the server in the middle of a run, restart
it on the same SQLite file, resume: every event created before the kill is delivered or
escalated, none is lost, none the client acked is sent again, and the interrupted run ends with
agent_failed (code ``interrupted``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from process_harness import ServerProcess
from server_harness import init_frame
from websockets.asyncio.client import connect

pytestmark = pytest.mark.slow


async def test_kill_9_mid_run_then_restart_and_resume_loses_nothing(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data").start()
    try:
        received: list[dict[str, Any]] = []
        async with connect(f"ws://127.0.0.1:{server.port}/v1/ws", ping_interval=None) as ws:
            await ws.send(init_frame(server.token()))
            assert json.loads(await ws.recv())["type"] == "connection_ack"
            await ws.send(json.dumps({"type": "run.start", "request_id": "r1",
                                      "input": "hello\n/sleep {\"seconds\": 10}\nbye"}))
            assert json.loads(await ws.recv())["type"] == "run.accepted"
            while not any(e["event"] == "tool_executing" and e["data"]["tool"] == "sleep" for e in received):
                frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if frame["type"] == "event":
                    received.append(frame)
            acked = received[-3]["seq"]  # the last two received are not acked
            await ws.send(json.dumps({"type": "ack", "seq": acked}))
            await asyncio.sleep(0.3)
            before = server.stream()
            server.kill9()  # mid-run, inside the sleep tool
        created = [e["seq"] for e in before]
        assert created == list(range(1, len(created) + 1)) and len(created) >= 5

        server.start()  # same data dir, same SQLite file
        resumed: list[dict[str, Any]] = []
        async with connect(f"ws://127.0.0.1:{server.port}/v1/ws", ping_interval=None) as ws:
            await ws.send(init_frame(server.token(), resume={"last_seq": acked}))
            ack = json.loads(await ws.recv())
            assert ack["type"] == "connection_ack" and ack["recovered"] is True
            async with asyncio.timeout(15):
                while not any(e["event"] == "agent_failed" for e in resumed):
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "event":
                        resumed.append(frame)
                        await ws.send(json.dumps({"type": "ack", "seq": frame["seq"]}))
            await asyncio.sleep(0.3)
        seqs = [e["seq"] for e in resumed]
        assert min(seqs) == acked + 1, seqs  # nothing the client acked is sent again
        # An event written before the crash and resent after it continues its attempt count: the
        # old process's write is not the new socket's.
        first_attempt = {e["seq"]: e["attempt"] for e in received}
        for e in resumed:
            if e["seq"] in first_attempt:
                assert e["attempt"] > first_attempt[e["seq"]], (e, first_attempt[e["seq"]])
        assert sorted(set(seqs)) == list(range(acked + 1, max(seqs) + 1))  # nothing lost, in order
        assert set(created) - set(range(1, acked + 1)) <= set(seqs)
        # The interrupted run ends well-formed: the open tool pair is closed, then agent_failed.
        tail = [e["event"] for e in resumed if e["seq"] > max(created)]
        assert tail == ["tool_completed", "agent_failed"], tail
        assert resumed[-1]["data"]["code"] == "interrupted"
        final = server.stream()
        assert [e["seq"] for e in final] == list(range(1, len(final) + 1))
        assert {e["state"] for e in final} <= {"ACKED", "ESCALATED"}
    finally:
        server.stop()
