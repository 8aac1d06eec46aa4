"""Tests for pipeproof.impl.audit: one JSON line per transition, exactly the documented keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeproof.errors import IllegalTransition
from pipeproof.impl.audit import AuditWriter, TracedMachine
from pipeproof.model.connection import CONNECTION
from pipeproof.model.context import context_machine

KEYS = {"ts", "machine", "id", "user", "context_id", "event", "from", "to", "vars", "detail"}


def test_every_fire_writes_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "audit.jsonl"
    writer = AuditWriter(path)
    conn = TracedMachine(CONNECTION, "connection", "s1", writer)
    conn.fire("recv_init")
    conn.fire("recv_frame", {"type": "ack"})
    conn.user, conn.context_id = "alice", "c1"
    conn.fire("auth_ok")
    with pytest.raises(IllegalTransition):
        conn.fire("auth_ok")  # refused: nothing is written
    ctx = TracedMachine(context_machine(2), "context", "c1", writer, user="alice", context_id="c1")
    ctx.fire("create", account_full=False)
    writer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["recv_init", "recv_frame", "auth_ok", "create"]
    assert all(set(line) == KEYS for line in lines)
    assert lines[1]["vars"] == {"queued": 1, "ack_sent": False} and lines[1]["detail"] == {"type": "ack"}
    assert (lines[0]["user"], lines[2]["user"], lines[2]["context_id"]) == (None, "alice", "c1")
    assert (lines[2]["from"], lines[2]["to"]) == ("INITIALISING", "READY")
    assert lines[3]["detail"] == {"inputs": {"account_full": False}}
    assert lines[3]["vars"] == {"epoch": 1, "conns": 1, "instances": 1}


def test_off_and_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    off = TracedMachine(CONNECTION, "connection", "s1", AuditWriter("off"))
    off.fire("recv_init")
    assert capsys.readouterr().out == ""
    out = TracedMachine(CONNECTION, "connection", "s2", AuditWriter("stdout"))
    out.fire("recv_init")
    assert json.loads(capsys.readouterr().out)["id"] == "s2"
