"""The sans-I/O session core: received frames and timers in, commands out (pipeproof/core/session.py).

No server, no event loop, no socket: a Runner of the declared connection machine and plain calls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest

from pipeproof.core.session import (
    BeginHandshake,
    CloseSocket,
    Handle,
    Illegal,
    SendFrame,
    SessionCore,
    SessionLimits,
)
from pipeproof.model.connection import CONNECTION, Conn
from pipeproof.model.spec import Machine, Runner, Transition
from pipeproof.protocol import CloseReason
from pipeproof.protocol.frames import Ack, RunStart

LIMITS = SessionLimits(preready_buffer_bytes=100, init_timeout=3.0, heartbeat_interval=1.0)
INIT = json.dumps({"type": "connection_init", "token": "t"})


class Plain:
    """A Runner with the audited wrapper's ``fire(event, detail, **inputs)`` (no audit log here)."""

    def __init__(self, machine: Machine) -> None:
        self.runner = Runner(machine, engine="declaration")

    @property
    def state(self) -> Any:
        return self.runner.state

    def can(self, event: str, **inputs: Any) -> bool:
        return self.runner.can(event, **inputs)

    def fire(self, event: str, detail: Mapping[str, Any] | None = None, **inputs: Any) -> Transition:
        return self.runner.fire(event, **inputs)


def core(machine: Machine | None = None, **params: int) -> SessionCore:
    m = machine or CONNECTION.with_params(buffer_max=params.get("buffer_max", 2),
                                          error_budget=params.get("error_budget", 1))
    return SessionCore(Plain(m), LIMITS, now=0.0)


def ready(c: SessionCore) -> SessionCore:
    assert isinstance(c.receive(INIT, 0.1)[-1], BeginHandshake)
    assert c.ready({}) == []
    c.conn.fire("send_ack")  # the sender fires it when it queues connection_ack
    return c


def test_the_first_frame_must_be_init() -> None:
    c = core()
    assert c.receive(json.dumps({"type": "ack", "seq": 1}), 0.1) == [CloseSocket(CloseReason.INIT_REQUIRED)]
    assert c.closed and c.state is Conn.CLOSED
    assert c.receive(INIT, 0.2) == []  # after our close: discarded unhandled


def test_pipelined_frames_wait_for_ready_and_are_handled_in_order() -> None:
    c = core()
    c.receive(INIT, 0.0)
    c.receive(json.dumps({"type": "run.start", "request_id": "r1", "input": "hi"}), 0.1)
    assert c.next_frame() == []  # INITIALISING: nothing is handled
    c.ready({})
    assert c.next_frame() == []  # READY but the ack is not out yet
    c.conn.fire("send_ack")
    (cmd,) = c.next_frame()
    assert isinstance(cmd, Handle) and isinstance(cmd.item, RunStart) and cmd.item.request_id == "r1"


def test_acks_queued_back_to_back_are_one_handle_of_the_highest_seq() -> None:
    c = ready(core(buffer_max=4))
    for seq in (3, 5, 4):
        c.receive(json.dumps({"type": "ack", "seq": seq}), 1.0)
    (cmd,) = c.next_frame()
    assert cmd == Handle(Ack(seq=5), 3)


def test_preready_frame_and_byte_budgets_close_preready_buffer_full() -> None:
    frames = core(buffer_max=1)
    frames.receive(INIT, 0.0)
    assert frames.receive("{}", 0.1) == []
    assert frames.receive("{}", 0.2) == [CloseSocket(CloseReason.PREREADY_BUFFER_FULL)]
    big = core(buffer_max=8)
    big.receive(INIT, 0.0)
    assert big.receive("x" * 101, 0.1) == [CloseSocket(CloseReason.PREREADY_BUFFER_FULL)]


def test_the_error_budget_answers_then_closes_invalid_message() -> None:
    c = ready(core(error_budget=1))
    c.receive("not json", 1.0)
    (reply,) = c.next_frame()
    assert isinstance(reply, SendFrame) and reply.frame.code == "invalid_message"
    c.receive("not json", 1.1)
    assert c.next_frame() == [CloseSocket(CloseReason.INVALID_MESSAGE)]


def test_timers_close_init_timeout_and_heartbeat_timeout() -> None:
    c = core()
    assert c.next_deadline() == 3.0 and c.timer(2.9) == []
    assert c.timer(3.0) == [CloseSocket(CloseReason.INIT_TIMEOUT)]
    h = ready(core())
    h.started_heartbeat(1.0)
    assert h.next_deadline() == 3.0 and h.timer(2.5) == []
    assert h.timer(3.0) == [CloseSocket(CloseReason.HEARTBEAT_TIMEOUT)]


@pytest.mark.parametrize(("event", "close"), [
    ("unavailable", CloseReason.TRY_AGAIN_LATER),
    ("slow_consumer", CloseReason.TRY_AGAIN_LATER),
    ("internal_error", CloseReason.INTERNAL_ERROR),
])
def test_server_closes_are_declared_edges(event: str, close: CloseReason) -> None:
    assert ready(core()).server_close(event) == [CloseSocket(close)]


def test_shutdown_drains_ready_and_closes_earlier_sockets_going_away() -> None:
    assert ready(core()).shutdown() == [CloseSocket(CloseReason.GOING_AWAY)]
    early = core()
    assert early.shutdown() == [CloseSocket(CloseReason.GOING_AWAY)]
    assert early.conn.state is Conn.CLOSED


def test_auth_reject_closes_with_the_given_auth_code_and_refuses_a_foreign_one() -> None:
    c = core()
    c.receive(INIT, 0.0)
    assert c.handshake_failed("auth_reject", CloseReason.USER_DISABLED) == [CloseSocket(CloseReason.USER_DISABLED)]
    wrong = core()
    wrong.receive(INIT, 0.0)
    out = wrong.handshake_failed("auth_reject", CloseReason.CONNECTION_LIMIT)
    assert isinstance(out[0], Illegal) and out[-1] == CloseSocket(CloseReason.INTERNAL_ERROR)


def test_the_peer_leaving_sends_no_close_frame() -> None:
    assert ready(core()).peer_gone(1000, "bye") == [CloseSocket(None)]


def test_an_illegal_transition_is_a_bug_closed_internal_error_not_invalid_message() -> None:
    # The machine left READY behind the core's back: the core's next event is refused by the
    # declaration, and the core must neither carry on silently nor blame the client.
    c2 = ready(core())
    c2.conn.fire("drain")  # the machine leaves READY behind the core's back
    out = c2.handshake_failed("limit_reject")
    assert isinstance(out[0], Illegal) and out[-1] == CloseSocket(CloseReason.INTERNAL_ERROR)


def test_a_core_that_ignored_the_byte_budget_would_be_caught() -> None:
    # The byte budget is the machine's decision: a machine whose recv_frame ignores over_bytes
    # (a deliberately broken variant) buffers the oversized frame, and this test notices.
    edges = tuple(t for t in CONNECTION.transitions if not (t.event == "recv_frame" and t.source is Conn.INITIALISING))
    lax = (*edges, Transition("recv_frame", Conn.INITIALISING, Conn.INITIALISING))
    broken = replace(CONNECTION, transitions=lax).with_params(buffer_max=8, error_budget=1)
    c = core(broken)
    c.receive(INIT, 0.0)
    assert c.receive("x" * 101, 0.1) == []  # the broken design accepts it
    good = core(buffer_max=8)
    good.receive(INIT, 0.0)
    assert good.receive("x" * 101, 0.1) != []
