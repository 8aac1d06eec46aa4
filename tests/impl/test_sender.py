"""The sender when the audit log cannot be written, over real sockets (uvicorn on loopback, the
``websockets`` client): no data frame goes out while the lines behind it are not in the log, the
socket closes 1013 ``try_again_later`` (PROTOCOL section 6), ``/readyz`` fails ``audit_log`` and new
sockets are refused until a write succeeds; then the server works again and the events that were
not sent are resent on resume (section 5). The lines held during the failure reach the log in order.
"""

# ruff: noqa: F811 - pytest fixtures are imported from runs_harness and used as parameters
from __future__ import annotations

import asyncio
import errno
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from runs_harness import (  # noqa: F401 - fixtures
    BACKENDS,
    TERMINAL,
    Client,
    Factory,
    metric,
    replay,
    start_runtime,
)
from server_harness import ServerThread, expect_close, open_ws

from pipeproof.impl.audit import AuditWriter, TracedMachine
from pipeproof.impl.sender import Sender, SendFailed
from pipeproof.impl.session import connection_machine
from pipeproof.model.connection import CONNECTION
from pipeproof.model.delivery import delivery_machine
from pipeproof.protocol.frames import ErrorFrame


class BreakableLog:
    """A text stream for an :class:`AuditWriter` whose writes raise ENOSPC while ``broken`` is set
    (a full disk), and keep what they were given otherwise. Written from the server's thread."""

    def __init__(self) -> None:
        self.broken = threading.Event()
        self.failed_writes = 0
        self._parts: list[str] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        if self.broken.is_set():
            self.failed_writes += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        with self._lock:
            self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        if self.broken.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")

    def lines(self) -> list[dict[str, Any]]:
        with self._lock:
            text = "".join(self._parts)
        return [json.loads(line) for line in text.splitlines()]


def start_with(start_runtime: Factory, log: BreakableLog, **overrides: Any) -> ServerThread:
    return start_runtime(app_kwargs={"audit": AuditWriter(log)}, **overrides)  # type: ignore[arg-type]


def readyz(server: ServerThread) -> httpx.Response:
    return server.get("/readyz")


async def refused(server: ServerThread) -> tuple[int, str]:
    """Open a socket and send nothing: a socket refused before its lifecycle is closed at once (an
    accepted one would wait ``init_timeout``, 2 s, for an init); the close (code, reason)."""
    ws = await open_ws(server)
    code, reason, frames = await expect_close(ws, timeout=1.0)
    assert frames == []
    return code, reason


def chain(lines: list[dict[str, Any]], machine: str, instance: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["machine"] == machine and line["id"] == instance]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_a_reply_the_log_cannot_cover_is_not_sent_the_socket_closes_1013(start_runtime: Factory) -> None:
    log = BreakableLog()
    server = start_with(start_runtime, log)
    client = await Client.connect(server)
    session_id = client.connection_ack["session_id"]
    log.broken.set()
    await client.send({"type": "nonsense"})  # answered by an error frame, which needs the log first
    code, reason, frames = await expect_close(client.ws)
    assert (code, reason, frames) == (1013, "try_again_later", [])
    assert log.failed_writes >= 1
    # Refused at once, without waiting for a readiness check: the writer is read live.
    assert await refused(server) == (1013, "try_again_later")
    answer = readyz(server)
    assert answer.status_code == 503
    body = answer.json()
    assert body["failing"] == "audit_log" and body["checks"]["audit_log"].startswith("write_failed")
    assert body["checks"]["store_writable"] == "ok"
    assert await refused(server) == (1013, "try_again_later")

    log.broken.clear()
    answer = readyz(server)  # the check retries the held lines: nothing else would on an idle server
    assert answer.status_code == 200 and answer.json()["checks"]["audit_log"] == "ok"
    again = await Client.connect(server)
    await again.send({"type": "nonsense"})
    reply = await again.reply()
    assert reply["type"] == "error" and reply["code"] == "invalid_message"
    await again.close()

    # Every transition of the failed socket reached the log, in order, once the disk had room.
    lines = log.lines()
    steps = chain(lines, "connection", session_id)
    replay(connection_machine(server.settings.preready_buffer_frames, server.settings.error_budget), steps)
    # The malformed frame is answered (handle_invalid); the failing log closes the socket through
    # the declared unavailable edge, whose close (try_again_later) the model fixes.
    assert [s["event"] for s in steps][-3:] == ["recv_frame", "handle_invalid", "unavailable"]
    assert steps[-1]["detail"] == {"send_failed": "audit"}
    assert not any(s["event"] == "send_error" for s in steps)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_events_not_sent_while_the_log_fails_are_resent_on_resume(start_runtime: Factory) -> None:
    log = BreakableLog()
    server = start_with(start_runtime, log, ack_timeout=1.0, max_attempts=5)
    client = await Client.connect(server)
    run = await client.start("r1", "hello")
    await client.until_terminal(run["run_id"], ack=False)
    first = list(client.events)
    assert all(e["attempt"] == 1 for e in first)
    log.broken.set()  # before the first ack wait ends: the resends meet a log that cannot be written
    code, reason, frames = await expect_close(client.ws, timeout=10)
    assert (code, reason, frames) == (1013, "try_again_later", [])
    assert readyz(server).json()["failing"] == "audit_log"

    log.broken.clear()
    deadline = time.monotonic() + 5
    while readyz(server).status_code != 200:
        assert time.monotonic() < deadline, "readyz did not recover after the log did"
        await asyncio.sleep(0.1)
    back = await Client.connect(server, resume=0)
    async with asyncio.timeout(10):
        while {e["seq"] for e in back.events} != {e["seq"] for e in first}:
            frame = await back.next()
            if frame["type"] == "event":
                await back.ack(frame["seq"])
    assert sorted(e["seq"] for e in back.events) == [e["seq"] for e in first]
    assert any(e["event"] in TERMINAL for e in back.events)
    async with asyncio.timeout(5):
        while metric(server, "pipeproof_events_acked_total") < len(first):
            await asyncio.sleep(0.05)
    await back.close()

    # The delivery lines held during the failure were kept in order: each chain is model steps.
    lines = log.lines()
    machine = delivery_machine(5, 1, 1)
    for e in first:
        steps = chain(lines, "delivery", f"{client.connection_ack['context_id']}:{e['seq']}")
        replay(machine, steps)
        assert steps[-1]["to"] == "ACKED"
    closed = chain(lines, "connection", client.connection_ack["session_id"])
    assert closed[-1]["event"] == "unavailable" and closed[-1]["to"] == "CLOSED"


class RecordingSocket:
    """What the Sender calls on a Starlette WebSocket, recorded (no I/O)."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.closes: list[tuple[int, str]] = []

    async def send_text(self, text: str) -> None:
        self.texts.append(text)

    async def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))


def failing_sender(on_failure: Callable[[SendFailed], None]) -> tuple[Sender, RecordingSocket, BreakableLog]:
    """A Sender on a READY-less connection whose audit writer is failing (one line held)."""
    log = BreakableLog()
    writer = AuditWriter(log)  # type: ignore[arg-type]
    conn = TracedMachine(CONNECTION, "connection", "s1", writer)
    ws = RecordingSocket()
    sender = Sender(ws, conn, queue_max=8, on_failure=on_failure)  # type: ignore[arg-type]
    log.broken.set()
    conn.fire("recv_init")  # a line the log cannot take: the sender's flush raises
    return sender, ws, log


async def test_a_close_queued_behind_unloggable_frames_is_still_written() -> None:
    failures: list[SendFailed] = []
    sender, ws, log = failing_sender(failures.append)
    for n in range(3):
        sender.send(ErrorFrame(code="invalid_message", detail=f"frame {n}"))
    sender.close(1001, "going_away")  # queued behind them, as a drain does
    await asyncio.wait_for(sender.task, 5)
    assert ws.texts == [] and sender.frames_written == 0
    assert ws.closes == [(1001, "going_away")] and sender.close_sent == (1001, "going_away")
    assert [f.why for f in failures] == ["audit"] and "3 data frame(s) dropped" in failures[0].detail
    log.broken.clear()
    sender._conn.audit.flush()
    assert [line["event"] for line in log.lines()] == ["recv_init"]


async def test_the_sender_tells_the_session_once_and_keeps_running_for_its_close() -> None:
    failures: list[SendFailed] = []
    sender, ws, _log = failing_sender(failures.append)  # a session that does not close at once
    sender.send(ErrorFrame(code="invalid_message"))
    async with asyncio.timeout(5):
        while not failures:
            await asyncio.sleep(0)
    sender.send(ErrorFrame(code="invalid_message"))  # still not closing: queued, then dropped too
    for _ in range(5):
        await asyncio.sleep(0)
    assert not sender.task.done() and ws.texts == []
    assert [f.why for f in failures] == ["audit"]
    sender.close(1013, "try_again_later")
    await asyncio.wait_for(sender.task, 5)
    assert ws.closes == [(1013, "try_again_later")] and ws.texts == [] and len(failures) == 1


async def test_a_close_frame_goes_out_after_the_line_of_its_transition() -> None:
    # The close frame is an effect like any frame: when the log works, the lines behind it
    # (here the closing transition's) are written before the frame leaves.
    log = BreakableLog()
    writer = AuditWriter(log)  # type: ignore[arg-type]
    conn = TracedMachine(CONNECTION, "connection", "s1", writer)
    order: list[str] = []

    class OrderedSocket(RecordingSocket):
        async def close(self, code: int, reason: str) -> None:
            order.append(f"close:{[line['event'] for line in log.lines()]}")
            await super().close(code, reason)

    sender = Sender(OrderedSocket(), conn, queue_max=8, on_failure=lambda _exc: None)  # type: ignore[arg-type]
    conn.fire("recv_frame", {"type": "ack", "bytes": 10})  # OPEN -> CLOSED, 4401 init_required
    sender.close(4401, "init_required")  # queued in the same loop turn as the line
    await asyncio.wait_for(sender.task, 5)
    assert order == ["close:['recv_frame']"]
