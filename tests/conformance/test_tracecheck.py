"""trace-check: replay per instance, adoption of windows, cross-machine invariants, exit codes
(docs/conformance.md, "trace-check")."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from pipeproof.cli import main
from pipeproof.conformance.errors import TraceUnreadable
from pipeproof.conformance.tracecheck import ModelParams, check_lines, read_lines
from pipeproof.model.connection import CONNECTION
from pipeproof.model.context import context_machine
from pipeproof.model.delivery import delivery_machine
from pipeproof.model.run import run_machine
from pipeproof.model.spec import Machine, Runner

PARAMS = ModelParams(buffer_max=2, max_attempts=2, max_connections_per_user=2, max_steps=4)
MACHINES: dict[str, Machine] = {
    "connection": CONNECTION.with_params(buffer_max=2), "context": context_machine(2),
    "delivery": delivery_machine(2, 1, 1), "run": run_machine(4),
}


class Log:
    """Writes audit lines exactly as impl/audit.py does, firing the real machines."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.runners: dict[tuple[str, str], Runner] = {}
        self.ts = 1000.0

    def fire(self, machine: str, iid: str, events: Iterable[str], *, user: str = "alice", ctx: str = "c1",
             **detail: Any) -> None:
        r = self.runners.setdefault((machine, iid), Runner(MACHINES[machine]))
        for event in events:
            inputs = {k: v for k, v in detail.items() if k in MACHINES[machine].inputs}
            t = r.fire(event, **inputs)
            self.ts += 0.01
            d = {k: v for k, v in detail.items() if k not in MACHINES[machine].inputs}
            if inputs:
                d["inputs"] = inputs
            self.lines.append({"ts": self.ts, "machine": machine, "id": iid, "user": user, "context_id": ctx,
                               "event": event, "from": t.source.name, "to": t.target.name, "vars": r.values,
                               "detail": d})

    def text(self) -> list[str]:
        return [json.dumps(x) for x in self.lines]


def session(log: Log, sid: str, user: str = "alice", ctx: str = "c1") -> None:
    log.fire("connection", sid, ["recv_init", "auth_ok", "send_ack"], user=user, ctx=ctx)


def good_log() -> Log:
    log = Log()
    session(log, "s1")
    log.fire("context", "c1", ["create"], account_full=False)
    log.fire("run", "r1", ["validate_ok", "agent_started"])
    log.fire("delivery", "c1:1", [], )
    log.fire("connection", "s1", ["deliver"], seq=1, attempt=1)
    log.fire("delivery", "c1:1", ["send"], attempt=1)
    session(log, "s2", user="bob", ctx="c2")  # another user's socket, interleaved
    log.fire("context", "c2", ["create"], user="bob", ctx="c2", account_full=False)
    log.fire("delivery", "c1:1", ["tick", "ack_timeout"], has_session=True)
    log.fire("connection", "s1", ["deliver"], seq=1, attempt=2)
    log.fire("delivery", "c1:1", ["send"], attempt=2)
    log.fire("connection", "s1", ["recv_frame", "handle_frame"])
    log.fire("delivery", "c1:1", ["ack"])
    log.fire("run", "r1", ["tool_executing", "tool_completed", "agent_completed"])
    log.fire("connection", "s1", ["peer_close"])
    log.fire("context", "c1", ["detach"])
    return log


def check(lines: list[str], **kw: Any) -> Any:
    return check_lines(read_lines(lines), PARAMS, **kw)


def test_a_log_the_model_allows_passes_with_several_users_interleaved() -> None:
    report = check(good_log().text())
    assert report.ok, report.violation and report.violation.render()
    assert report.instances == {"connection": 2, "context": 2, "delivery": 1, "run": 1}


def test_a_window_adopts_instances_mid_stream() -> None:
    lines = good_log().text()
    report = check(lines[7:])  # cut inside s1's life and the event's retries
    assert report.ok, report.violation and report.violation.render()
    assert report.adopted >= 2


def test_handle_frame_before_ready_is_reported_with_context() -> None:
    log = Log()
    log.fire("connection", "s1", ["recv_init", "recv_frame"])
    bad = {**log.lines[-1], "event": "handle_frame", "from": "INITIALISING", "to": "INITIALISING",
           "vars": {"queued": 0, "ack_sent": False}}
    report = check([*log.text(), json.dumps(bad)])
    v = report.violation
    assert v is not None and v.prop == "no_message_before_ready" and report.line_no == 3
    assert any("recv_frame" in c for c in v.context)  # the instance's earlier lines
    assert any("auth_ok" in a for a in v.allowed)  # what the model allows from INITIALISING


@pytest.mark.parametrize(("mutate", "prop"), [
    # line 18 acked c1:1; sending it again:
    (lambda ls: ls.append({**ls[15], "from": "ACKED", "to": "ACKED"}), "acked_never_resent"),
    # a second live context for alice while c1 is live:
    (lambda ls: ls.append({**ls[3], "id": "c1x"}), "one_context_per_user"),
    (lambda ls: ls.append({**ls[-1], "machine": "connection", "id": "s9", "event": "recv_frame", "from": "OPEN",
                           "to": "CLOSED", "detail": {"code": 1011, "reason": "internal"}}), "no_1011"),
    (lambda ls: ls.append({**ls[-1], "machine": "run", "id": "r1", "event": "agent_thinking",
                           "from": "COMPLETED", "to": "COMPLETED"}), "run_events_well_ordered"),
    # bob's socket is written alice's seq 1 (c2 never had a seq 1):
    (lambda ls: ls.insert(12, {**ls[6], "context_id": "c2", "id": "s2", "user": "bob"}), "no_cross_user_read"),
])
def test_broken_lines_name_the_property(mutate: Any, prop: str) -> None:
    lines = good_log().lines
    lines = [*lines]
    mutate(lines)
    report = check([json.dumps(x) for x in lines])
    assert report.violation is not None and report.violation.prop == prop, report.violation


def test_a_due_deadline_left_unhandled_is_a_stuck_event() -> None:
    log = Log()
    log.fire("delivery", "c1:1", ["send", "tick"], has_session=True)
    log.fire("connection", "s9", ["recv_init"])
    log.lines[-1]["ts"] += 5.0
    report = check(log.text(), urgency=1.0)
    assert report.violation is not None and report.violation.prop == "every_event_acked_or_escalated"


def test_unreadable_input_raises_with_the_line_number() -> None:
    with pytest.raises(TraceUnreadable) as exc:
        check([*good_log().text()[:3], "{not json"])
    assert exc.value.line == 4
    with pytest.raises(TraceUnreadable, match="missing"):
        check([json.dumps({"machine": "connection"})])
    with pytest.raises(TraceUnreadable, match="unknown machine"):
        check([json.dumps({"machine": "x", "id": "1", "event": "e", "from": "A", "to": "B"})])


def test_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad, junk = tmp_path / "good.jsonl", tmp_path / "bad.jsonl", tmp_path / "junk.jsonl"
    good.write_text("\n".join(good_log().text()) + "\n")
    lines = good_log().lines
    lines.insert(3, {**lines[1], "event": "send_ack", "from": "INITIALISING", "to": "INITIALISING"})
    bad.write_text("\n".join(json.dumps(x) for x in lines))
    junk.write_text("hello\n")
    opts = ["--buffer-max", "2", "--max-attempts", "2", "--max-connections-per-user", "2", "--max-steps", "4"]
    assert main(["trace-check", str(good), *opts]) == 0
    assert main(["trace-check", str(bad), *opts]) == 1
    assert "line 4" in capsys.readouterr().out
    assert main(["trace-check", str(junk), *opts]) == 2
    assert "line 1" in capsys.readouterr().err
