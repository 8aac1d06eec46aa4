"""One socket in lockstep with the connection machine (docs/protocol.md sections 1, 2, 6).

The belief is over (configuration, frames received, frames handled); a close must be an edge
the declaration has, with the reason that edge sends.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeproof.model.connection import SERVER_CLOSE_EVENTS
from pipeproof.model.spec import Config
from pipeproof.protocol import CloseCode, CloseReason

from ..errors import Violation
from ..wire import Obs, Socket
from .belief import _CLOSE_BOUND, _HEARTBEAT, _INIT_TIMEOUT, _OVERLOAD_EVENTS, AUTH_REASONS, _allowed

if TYPE_CHECKING:
    from . import Oracle
    from .user import UserView

# -- sockets -----------------------------------------------------------------------------------


@dataclass
class Sent:
    """One frame the client sent on a socket, and what the protocol says comes back."""

    kind: str  # init | garbage | ack | start | probe | cancel
    frame: dict[str, Any] | str
    request_id: str | None = None
    t: float = field(default_factory=time.monotonic)
    reply: dict[str, Any] | None = None
    answered: bool = False

    @property
    def needs(self) -> str:
        return {"garbage": "required", "start": "required", "probe": "required", "cancel": "optional"}.get(
            self.kind, "none")

    def matches(self, frame: Mapping[str, Any]) -> bool:
        ftype, rid = frame.get("type"), frame.get("request_id")
        if self.kind == "garbage":
            return ftype == "error" and frame.get("code") == "invalid_message" and rid is None
        if self.kind in ("start", "probe"):
            return ftype in ("run.accepted", "error") and rid == self.request_id
        if self.kind == "cancel":
            return ftype == "error" and rid is None
        return False


Elem = tuple[Config, int, int]  # (connection config, frames received, non-init frames handled)


class SockView:
    """One socket: its connection-machine belief, the frames sent, the replies owed."""

    def __init__(self, kit: Oracle, sock: Socket, user: UserView | None, token_kind: str) -> None:
        self.kit = kit
        self.sock = sock
        self.label = sock.label
        self.user = user
        self.token_kind = token_kind  # "good" or the section-2 code it must be refused with
        self.machine = kit.conn_machine
        self.elems: set[Elem] = {(self.machine.initial_config(), 0, 0)}
        self.sent: list[Sent] = []
        self.frames: list[Sent] = []  # the non-init frames, in the order the server must handle them
        self.cursor = 0  # first frame whose reply (if any) may still come
        self.acked: dict[str, Any] | None = None
        self.closed: tuple[int, str] | None = None
        self.attached = False
        self.floor = 0  # seqs <= floor were acked and a later barrier proved the ack handled here
        self.resume_seq: int | None = None  # the last_seq this socket's connection_init resumed from
        self.delivered: set[int] = set()
        self.attempts: dict[int, int] = {}  # seq -> highest attempt seen on this socket

    @property
    def live(self) -> bool:
        return self.acked is not None and self.closed is None and not self.sock.dropped

    def where(self) -> str:
        user = self.user.name if self.user is not None else "-"
        return f"socket {self.label} (user {user})"

    # -- the hidden closure ----------------------------------------------------------------------
    def _moves(self, e: Elem) -> Iterator[Elem]:
        cfg, rcv, hnd = e
        m = self.machine
        if rcv < len(self.sent):
            event = "recv_init" if self.sent[rcv].kind == "init" else "recv_frame"
            for t, after in m.fire_all(cfg, event):
                if t.close is None:
                    yield (after, rcv + 1, hnd)
        for _, after in m.fire_all(cfg, "auth_ok"):
            yield (after, rcv, hnd)
        if hnd < len(self.frames):
            event = "handle_invalid" if self.frames[hnd].kind == "garbage" else "handle_frame"
            for t, after in m.fire_all(cfg, event):
                if t.close is None:
                    yield (after, rcv, hnd + 1)

    def closure(self) -> set[Elem]:
        seen = set(self.elems)
        todo = list(seen)
        while todo and len(seen) < _CLOSE_BOUND:
            for n in self._moves(todo.pop()):
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen

    def allowed(self, elems: Iterable[Elem] | None = None) -> list[str]:
        return _allowed(self.machine, {e[0] for e in (elems if elems is not None else self.closure())})

    def fail(self, prop: str, observed: str, allowed: list[str] | None = None) -> Violation:
        return self.kit.violation(prop, f"{self.where()}: {observed}",
                                  self.allowed() if allowed is None else allowed)

    # -- client actions ----------------------------------------------------------------------------
    def send(self, kind: str, frame: dict[str, Any] | str, request_id: str | None = None) -> Sent:
        item = Sent(kind, frame, request_id)
        self.sent.append(item)
        if kind != "init":
            self.frames.append(item)
        self.sock.send(frame)
        return item

    def client_close(self) -> None:
        """The kit dropped the socket: peer_close from wherever the server is."""
        if self.closed is not None:
            return
        after = {(a, r, h) for e in self.closure() for _, a in self.machine.fire_all(e[0], "peer_close")
                 for (_, r, h) in [e]}
        self.elems = after or self.elems
        self.closed = (1000, "client")
        if self.attached and self.user is not None:
            self.user.detach(self)
        self.attached = False

    # -- observations ------------------------------------------------------------------------------
    def observe(self, o: Obs) -> None:
        if self.closed is not None and not self.sock.dropped and o.close is None:
            raise self.fail("model_transition", f"{o.show()} after the close {self.closed}", [])
        if o.close is not None:
            if self.sock.dropped:
                return  # our own drop: already fired peer_close
            self._on_close(o)
            return
        f = o.frame
        if f is None or not isinstance(f.get("type"), str):
            raise self.fail("frames_valid", f"a frame that is not a JSON object with a type: {o.text!r}", [])
        self.kit.count("frames_valid")
        ftype = f["type"]
        if ftype == "connection_ack":
            self._on_ack(f)
        elif ftype == "event":
            self._on_event(f, o)
        elif ftype in ("run.accepted", "error"):
            self._on_reply(f)
        else:
            raise self.fail("frames_valid", f"unknown server frame type {ftype!r}", [])

    def _on_ack(self, f: dict[str, Any]) -> None:
        self.kit.count("ready_before_ack")
        if self.acked is not None:
            raise self.fail("ready_before_ack", "a second connection_ack", self.allowed())
        after = {(a, r, h) for (c, r, h) in self.closure() for _, a in self.machine.fire_all(c, "send_ack")}
        if not after:
            raise self.fail("ready_before_ack", "connection_ack where the model allows no send_ack")
        self.kit.count("auth_errors_specific")
        if self.token_kind != "good":
            raise self.fail("auth_errors_specific",
                            f"connection_ack for a token that must be refused with {self.token_kind}",
                            [f"close {CloseReason.of(self.token_kind).describe()}"])
        for k in ("session_id", "context_id", "epoch", "heartbeat_ms", "recovered", "last_seq"):
            if k not in f:
                raise self.fail("frames_valid", f"connection_ack without {k!r}", [])
        self.elems = after
        self.acked = f
        if self.user is not None:
            # A socket that became READY after an ack was proven handled cannot carry a copy written
            # before it: every frame on it for those seqs is a resend.
            self.floor = self.user.proven
            self.user.on_ack(self, f)
            self.attached = True
            if self.resume_seq is not None and f.get("recovered") is True:
                # Section 5: a resume acks every event through last_seq before connection_ack, and
                # the kit resumes from what it received, all delivered: none of them is sent here.
                self.floor = max(self.floor, self.resume_seq)

    def _on_event(self, f: dict[str, Any], o: Obs) -> None:
        self.kit.count("no_message_before_ready")
        after = {(a, r, h) for (c, r, h) in self.closure() for _, a in self.machine.fire_all(c, "deliver")}
        if not after:
            raise self.fail("ready_before_ack", f"event seq {f.get('seq')} where the model allows no deliver")
        self.elems = after
        for k in ("seq", "event_id", "run_id", "event", "attempt"):
            if k not in f:
                raise self.fail("frames_valid", f"event frame without {k!r}", [])
        if self.user is None:
            raise self.fail("no_cross_user_read", "an event on a socket that never authenticated", [])
        self.user.on_event(self, f, o.t)

    def _on_reply(self, f: dict[str, Any]) -> None:
        self.kit.count("replies_answer_requests")
        j = self.cursor
        while j < len(self.frames) and not (self.frames[j].needs != "none" and self.frames[j].matches(f)):
            if self.frames[j].needs == "required":
                # Store failures and internal errors may answer any frame, but they name it the same way.
                raise self.fail("replies_answer_requests",
                                f"reply {_show(f)} while frame #{j} ({self.frames[j].kind}) is still unanswered",
                                [f"the reply to frame #{j} first"])
            j += 1
        if j >= len(self.frames):
            raise self.fail("replies_answer_requests", f"reply {_show(f)} answers no frame this socket sent",
                            [f"{s.kind}: {'reply owed' if not s.answered and s.needs != 'none' else 'done'}"
                             for s in self.frames[-4:]])
        closure = self.closure()
        handled = {e for e in closure if e[2] > j}
        self.kit.count("no_message_before_ready")
        if not handled:
            raise self.fail("no_message_before_ready",
                            f"reply {_show(f)} to frame #{j} before the model allows handling it "
                            f"(it may be handled only in READY after connection_ack)")
        self.elems = handled
        item = self.frames[j]
        item.reply, item.answered = f, True
        self.cursor = j + 1
        if self.user is not None:
            self.user.on_reply(self, item, f)

    def _on_close(self, o: Obs) -> None:
        assert o.close is not None
        code, reason = o.close
        self.kit.count("no_1011")
        self.kit.count("close_codes_documented")
        if o.no_close_frame:
            raise self.fail("close_codes_documented", "the server ended the connection without a close frame",
                            self.allowed())
        if code == CloseCode.INTERNAL_ERROR:
            raise self.fail("no_1011", f"close {code} {reason!r} (a server bug)", self.allowed())
        if not CloseReason.documented(code, reason):
            raise self.fail("close_codes_documented", f"close {code} {reason!r} is not a row of the table",
                            self.allowed())
        closure = self.closure()
        after: set[Elem] = set()
        via: set[str] = set()
        for cfg, rcv, hnd in closure:
            # Every close is a declared edge (model/connection.py): one consuming the next sent
            # frame, the next handled frame, or none (the server's own decision).
            for event in ("recv_frame", "recv_init", *SERVER_CLOSE_EVENTS):
                nxt, nhnd = rcv, hnd
                if event in ("recv_frame", "recv_init"):
                    if rcv >= len(self.sent) or (self.sent[rcv].kind == "init") != (event == "recv_init"):
                        continue
                    nxt = rcv + 1
                if event == "handle_invalid":
                    if hnd >= len(self.frames) or self.frames[hnd].kind != "garbage":
                        continue
                    nhnd = hnd + 1
                if event in _OVERLOAD_EVENTS and not self.kit.tolerate_overload:
                    continue
                # The byte budget is a fact the kit does not track: either value may hold.
                for inputs in ({"over_bytes": False}, {"over_bytes": True}) if event == "recv_frame" else ({},):
                    for t, a in self.machine.fire_all(cfg, event, inputs):
                        if t.close is not None and t.close.allows(code, reason):
                            after.add((a, nxt, nhnd))
                            via.add(event)
        if not after:
            raise self.fail(_close_property(code, reason), f"close {code} {reason}")
        self._close_timing(o, code, reason, via)
        if self.token_kind != "good" and self.acked is None:
            self.kit.count("auth_errors_specific")
            if reason != self.token_kind:
                raise self.fail("auth_errors_specific", f"a {self.token_kind} token closed {code} {reason}",
                                [f"close {CloseReason.of(self.token_kind).describe()}"])
        self.elems = after
        self.closed = (code, reason)
        if self.user is not None:
            if reason == "connection_limit":
                self.user.on_limit(self)
            if self.attached:
                self.user.detach(self)
        self.attached = False

    def _close_timing(self, o: Obs, code: int, reason: str, via: set[str]) -> None:
        tm = self.kit.timing
        if reason == "init_timeout":
            self.kit.count("timeouts_honoured")
            self.kit.count("timeouts_close_the_socket")  # the timeout ended the socket with its code
            waited = o.t - self.sock.opened
            if waited < tm.early(tm.init_timeout):
                raise self.fail("timeouts_honoured",
                                f"close {_INIT_TIMEOUT} after {waited:.2f}s; init_timeout is {tm.init_timeout}s",
                                [f"not before {tm.early(tm.init_timeout):.2f}s"])
        if reason == "heartbeat_timeout":
            self.kit.count("timeouts_honoured")
            raise self.fail("timeouts_honoured", f"close {_HEARTBEAT} although the client answers "
                            "every ping (section 6)", ["keep the socket open"])


def _show(f: Mapping[str, Any]) -> str:
    keys = ("type", "code", "request_id", "run_id")
    return "{" + ", ".join(f"{k}={f[k]}" for k in keys if k in f) + "}"


def _close_property(code: int, reason: str) -> str:
    if reason == "connection_limit":
        return "connection_limits_respected"
    if reason in AUTH_REASONS:
        return "auth_errors_specific"
    return "model_transition"
