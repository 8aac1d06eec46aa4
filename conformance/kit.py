"""The live kit: a Hypothesis state machine whose rules are client actions (docs/conformance.md).

Rules open sockets and speak the protocol over real WebSockets and HTTP to a :class:`Target`
(any server: another process, another host). After every rule the oracle
(:mod:`.oracle`) has been given every observation, and a behaviour the model does not allow
raises a :class:`~.errors.Violation`; Hypothesis then shrinks the client-action trace. Every
wait is for a specific observation, bounded by a deadline derived from the declared timing
(:mod:`.timing`); no rule sleeps and hopes.

Users are fresh per example (``<prefix>-<n>-u<k>``), so examples do not see each other's
contexts, and a server that keeps state across examples is still tested from a clean slate.

A target with several nodes (one cluster) is tested as one server: each socket and each HTTP
request goes to the node :class:`~.placement.Placement` picks, and the oracle is the same.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.control import current_build_context
from hypothesis.errors import Flaky
from hypothesis.stateful import (
    RuleBasedStateMachine,
    get_state_machine_test,
    initialize,
    invariant,
    precondition,
    rule,
)

from pipeproof.protocol import CloseReason

from .errors import KitError, Violation
from .oracle import Oracle, Sent, SockView, UserView
from .placement import Placement
from .results import KitResult, Target, summary
from .wire import Http, Socket

USERS_PER_EXAMPLE = 3
RUN_INPUTS = (
    "2+2",
    "hello",
    '/sleep {"seconds": 0.2}\n3*7',
    '/sleep {"seconds": 0.6}\n6*7',
    '/sleep {"seconds": 0.05}\n/sleep {"seconds": 0.05}',
    "/no_such_tool_here",
)
QUEUE_BEHIND = '/sleep {"seconds": 0.3}\n6*7'  # a run long enough for a second one to queue behind it
TTL_PROBES = 1  # context-expiry probes per kit run: each waits context_ttl
GARBAGE = ("{not json", '{"type": "run.stop"}', '{"type": "ack", "seq": -1}', "[1, 2]", '{"type": 7}')


_counter = iter(range(1, 10**9))


def _acked(view: SockView) -> Callable[[], bool]:
    return lambda: view.acked is not None

_F = TypeVar("_F", bound=Callable[..., None])


def _budgeted(fn: _F) -> _F:
    """A rule that does nothing once the time budget is exhausted (see ``__init__``)."""

    @functools.wraps(fn)
    def wrapper(self: ConformanceMachine, *args: Any, **kwargs: Any) -> None:
        if not self.exhausted:
            fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class ConformanceMachine(RuleBasedStateMachine):
    """Client actions against ``target``; the class is specialised per run by :func:`run_kit`."""

    target: ClassVar[Target]
    result: ClassVar[KitResult]
    shrink_deadline: ClassVar[float] = 0.0
    prefix: ClassVar[str] = "pp"

    def __init__(self) -> None:
        super().__init__()
        # Past the time budget for searching and shrinking every rule is a no-op (same draws, no
        # I/O), so Hypothesis ends quickly with the smallest failing trace found so far; the final
        # replay of that trace runs for real.
        self.exhausted = time.monotonic() > self.shrink_deadline > 0 and not current_build_context().is_final
        self.tm = self.target.timing
        self.oracle = Oracle(self.tm, tolerate_overload=self.target.tolerate_overload)
        self.https = [Http(u, self.tm.late(self.tm.reply_timeout)) for u in self.target.http_urls]
        self.placement = Placement(len(self.https), self.target.seed)
        self.node_of: dict[str, int] = {}  # socket label -> node index
        n = next(_counter)
        given = sorted(self.target.tokens.given)
        if given and not self.target.tokens.can_mint:
            # Tokens given on the command line: those users, in every example (their contexts
            # outlive an example, which the oracle allows: it starts each example knowing nothing).
            self.names = [given[k % len(given)] for k in range(USERS_PER_EXAMPLE)]
        else:
            self.names = [f"{self.prefix}-{n}-u{k}" for k in range(USERS_PER_EXAMPLE)]
        self.socks: list[SockView] = []
        self.seq = 0
        type(self).result.examples += 1

    # -- helpers -----------------------------------------------------------------------------------
    def _act(self, text: str) -> None:
        self.oracle.actions.append(text)
        type(self).result.actions += 1

    def _at(self, view: SockView) -> str:
        """`` (node N)`` in a client action of a cluster target (1-based, command-line order);
        nothing for one node, so single-server traces read as they always did."""
        return f" (node {self.node_of[view.label] + 1})" if len(self.https) > 1 else ""

    def _http(self) -> Http:
        """The node the next HTTP request goes to (any node answers for the whole cluster)."""
        node = self.placement.http()
        type(self).result.http_requests[node] += 1
        return self.https[node]

    def _rid(self, kind: str) -> str:
        self.seq += 1
        return f"{kind}-{self.seq}-{uuid.uuid4().hex[:6]}"

    def _open(self, user: UserView | None, token_kind: str, resume: bool = False) -> SockView:
        label = f"s{len(self.socks)}"
        result = type(self).result
        dropped = self.placement.last_dropped(user.name) if resume and user is not None else None
        node = self.placement.socket(None if user is None else user.name, resume=resume)
        result.sessions[node] += 1
        if dropped is not None:
            result.resumes_after_drop += 1
            result.resumes_moved += node != dropped
        self.node_of[label] = node
        sock = Socket(self.target.ws_urls[node], label, self.tm.late(self.tm.reply_timeout))
        view = SockView(self.oracle, sock, user, token_kind)
        self.socks.append(view)
        self.oracle.sockets.append(view)
        if user is not None:
            user.sockets.append(view)
        return view

    def _init(self, view: SockView, token: str | None, resume: int | None = None) -> None:
        frame: dict[str, Any] = {"type": "connection_init"}
        if token is not None:
            frame["token"] = token
        if resume is not None:
            frame["resume"] = {"last_seq": resume}
            view.resume_seq = resume
            if view.user is not None:
                view.user.ack_perm = max(view.user.ack_perm, resume)
        view.send("init", frame)

    def _wait(self, view: SockView, done: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        """Feed observations to the oracle until ``done()`` or the socket closed, up to a deadline
        derived from the declared timing (never a blind sleep)."""
        limit = self.tm.late(self.tm.reply_timeout) if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            self.oracle.pump()
            if done() or view.closed is not None:
                return
            left = deadline - time.monotonic()
            if left <= 0 or (view.sock.ended and view.sock.read >= len(view.sock.obs)):
                raise self.oracle.violation("replies_answer_requests",
                                            f"{view.where()}: no {what} within {limit:.2f}s", [what])
            view.sock.wait(lambda o: True, min(left, 0.25))

    def _ready(self, user_index: int, resume: bool = False) -> SockView | None:
        user = self.oracle.user(self.names[user_index])
        if len(user.live_sockets()) >= self.tm.max_connections_per_user - 1:
            return None  # stay below the limit; limit_probe tests it on a fresh user
        view = self._open(user, "good", resume)
        last = user.delivered_prefix() if resume else None
        self._act(f"connect {view.label} as {user.name}" + (f" resume last_seq={last}" if resume else "")
                  + self._at(view))
        self._init(view, self.target.tokens.good(user.name), last)
        self._wait(view, lambda: view.acked is not None, "connection_ack")
        return view if view.live else None

    def _live(self, index: int) -> SockView | None:
        live = [s for s in self.socks if s.live and s.user is not None]
        return live[index % len(live)] if live else None

    def _barrier(self, view: SockView) -> None:
        """A frame whose reply proves every earlier frame of this socket was handled (section 1:
        in-order handling, one ordered send queue): run.start with a tool no server registers."""
        rid = self._rid("barrier")
        assert view.user is not None
        self.oracle.run_view(view.user, rid)
        item = view.send("probe", {"type": "run.start", "request_id": rid, "input": "barrier",
                                   "tools": ["pipeproof_conformance_no_such_tool"]}, rid)
        self._wait(view, lambda: item.answered, f"reply to barrier {rid}")

    # -- rules: connection lifecycle (section 1) and auth (section 2) ---------------------------------
    @initialize(start=st.booleans())
    @_budgeted
    def first_socket(self, start: bool) -> None:
        """Every example begins with one READY socket (and maybe a run), so that the delivery rules
        have something to act on from the first step."""
        self._first_socket(start)

    def _first_socket(self, start: bool) -> None:
        view = self._ready(0)
        if start and view is not None and self.target.runs:
            self.start_run(0, RUN_INPUTS[3], False)

    @rule(user=st.integers(0, USERS_PER_EXAMPLE - 1), resume=st.booleans())
    @_budgeted
    def connect(self, user: int, resume: bool) -> None:
        view = self._ready(user, resume and self.target.runs)
        if view is not None and view.user is not None and resume and self.target.runs:
            # What a resume promises (section 5): every event up to the ack's last_seq is either
            # redelivered or terminal; the stream over HTTP shows which.
            self._read_http(view.user)

    @rule(data=st.data())
    @_budgeted
    def bad_token(self, data: st.DataObject) -> None:
        kinds = list(self.target.tokens.bad_kinds()) + (["user_disabled"] if self.target.disabled_user else [])
        kind = data.draw(st.sampled_from(kinds), label="kind")
        token = (self.target.tokens.good(self.target.disabled_user) if kind == "user_disabled"
                 and self.target.disabled_user else self.target.tokens.bad(kind, self.names[0]))
        view = self._open(None, kind)
        self._act(f"connect {view.label} with a {kind} token{self._at(view)}")
        self._init(view, token)
        self._wait(view, lambda: False, f"close {kind}")

    @rule(kind=st.sampled_from(["garbage", "ack", "start"]))
    @_budgeted
    def first_frame_not_init(self, kind: str) -> None:
        view = self._open(None, "good")
        self._act(f"connect {view.label}, first frame {kind}{self._at(view)}")
        frames: dict[str, dict[str, Any] | str] = {
            "garbage": GARBAGE[0], "ack": {"type": "ack", "seq": 1},
            "start": {"type": "run.start", "request_id": "x", "input": "hi"},
        }
        frame = frames[kind]
        view.send("garbage" if kind == "garbage" else kind, frame)
        self._wait(view, lambda: False, f"close {CloseReason.INIT_REQUIRED.describe()}")

    @precondition(lambda self: self.tm.init_timeout <= 5.0)
    @rule()
    @_budgeted
    def no_init(self) -> None:
        view = self._open(None, "good")
        self._act(f"connect {view.label}, send nothing{self._at(view)}")
        self._wait(view, lambda: False, f"close {CloseReason.INIT_TIMEOUT.describe()}",
                   self.tm.late(self.tm.init_timeout) + self.tm.late(self.tm.reply_timeout))

    @rule(user=st.integers(0, USERS_PER_EXAMPLE - 1),
          frames=st.lists(st.sampled_from(["garbage", "ack", "start"]), min_size=1, max_size=7))
    def pipeline(self, user: int, frames: list[str]) -> None:
        """Frames sent right behind connection_init, before the ack (pipelining, section 1)."""
        u = self.oracle.user(self.names[user])
        if len(u.live_sockets()) >= self.tm.max_connections_per_user - 1:
            return
        if not self.target.runs:
            frames = [f for f in frames if f != "start"] or ["garbage"]
        view = self._open(u, "good")
        self._act(f"connect {view.label} as {u.name} and pipeline {frames}{self._at(view)}")
        self._init(view, self.target.tokens.good(u.name))
        for kind in frames:
            self._send_kind(view, kind)
        self._wait(view, lambda: view.acked is not None, "connection_ack or close")
        self._await_replies(view)

    def _send_kind(self, view: SockView, kind: str) -> None:
        if kind == "garbage":
            view.send("garbage", GARBAGE[self.seq % len(GARBAGE)])
            self.seq += 1
        elif kind == "ack":
            view.send("ack", {"type": "ack", "seq": 0})
        else:
            rid = self._rid("run")
            assert view.user is not None
            self.oracle.run_view(view.user, rid)
            view.send("start", {"type": "run.start", "request_id": rid, "input": "hello"}, rid)

    def _await_replies(self, view: SockView) -> None:
        """Every frame that needs a reply gets it (section 1: handled in order once READY)."""
        self._wait(view, lambda: all(i.answered for i in view.frames if i.needs == "required"),
                   "reply to every frame sent")

    @rule(index=st.integers(0, 50))
    @_budgeted
    def duplicate_init(self, index: int) -> None:
        view = self._live(index)
        if view is None or view.user is None:
            return
        self._act(f"second connection_init on {view.label}")
        self._init(view, self.target.tokens.good(view.user.name))
        self._wait(view, lambda: False, f"close {CloseReason.DUPLICATE_INIT.describe()}")

    @rule(index=st.integers(0, 50), n=st.integers(1, 3))
    @_budgeted
    def garbage(self, index: int, n: int) -> None:
        view = self._live(index)
        if view is None:
            return
        self._act(f"send {n} malformed frame(s) on {view.label}")
        for _ in range(n):
            self._send_kind(view, "garbage")
        self._await_replies(view)

    @rule(index=st.integers(0, 50), graceful=st.booleans())
    @_budgeted
    def drop(self, index: int, graceful: bool) -> None:
        view = self._live(index)
        if view is None:
            return
        self.oracle.pump()
        self._act(f"drop {view.label} ({'close 1000' if graceful else 'cut TCP'}){self._at(view)}")
        view.sock.drop(graceful)
        if view.user is not None:
            self.placement.dropped(view.user.name, self.node_of[view.label])
        self.oracle.pump()
        view.client_close()
        if not graceful and len(self.https) > 1 and view.user is not None and view.user.name in self.names:
            # A cluster's client whose connection was cut comes back at once with resume, on
            # another node (a failover behind a load balancer): every cut moves a user between
            # nodes mid-stream. It draws nothing, so a single server's examples stay as they were.
            self.connect(self.names.index(view.user.name), True)

    # -- rules: contexts and limits (section 3) --------------------------------------------------------
    @rule(users=st.integers(1, USERS_PER_EXAMPLE), each=st.integers(2, 3))
    @_budgeted
    def burst(self, users: int, each: int) -> None:
        """Several sockets for one or several users, their inits sent at once: one context per user."""
        each = min(each, self.tm.max_connections_per_user - 1)
        views: list[SockView] = []
        for k in range(users):
            u = self.oracle.user(self.names[k])
            room = self.tm.max_connections_per_user - 1 - len(u.live_sockets())
            for _ in range(max(0, min(each, room))):
                views.append(self._open(u, "good"))
        if not views:
            return
        self._act(f"burst: {len(views)} sockets init at once ({[v.label + self._at(v) for v in views]})")
        self._init_at_once(views)

    def _init_at_once(self, views: list[SockView]) -> None:
        """Send connection_init on every socket at the same moment, then wait for each answer."""
        go = threading.Barrier(len(views))

        def init(v: SockView) -> None:
            assert v.user is not None
            token = self.target.tokens.good(v.user.name)
            go.wait(timeout=5)
            v.sock.send({"type": "connection_init", "token": token})

        threads = [threading.Thread(target=init, args=(v,)) for v in views]
        for v in views:
            v.sent.append(Sent("init", {"type": "connection_init"}))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for v in views:
            self._wait(v, _acked(v), "connection_ack")

    @rule()
    @_budgeted
    def limit_probe(self) -> None:
        """A fresh user opens max_connections_per_user sockets, then one more: close connection_limit."""
        if not self.target.tokens.can_mint:
            return  # a fresh user needs a minted token
        name = f"{self.names[0]}-limit-{self.seq}"
        self.seq += 1
        user = self.oracle.user(name)
        opened = [self._open(user, "good") for _ in range(self.tm.max_connections_per_user)]
        self._act(f"limit probe: {self.tm.max_connections_per_user} + 1 sockets for {name}"
                  + (f" ({[v.label + self._at(v) for v in opened]})" if len(self.https) > 1 else ""))
        self._init_at_once(opened)
        extra = self._open(user, "good")
        self._init(extra, self.target.tokens.good(name))
        self._wait(extra, lambda: extra.acked is not None, f"close {CloseReason.CONNECTION_LIMIT.describe()}")
        if extra.closed is None and all(v.live for v in opened):
            raise extra.fail("connection_limits_respected",
                             f"socket {self.tm.max_connections_per_user + 1} of {name} was acked",
                             [f"close {CloseReason.CONNECTION_LIMIT.describe()}"])
        for v in [*opened, extra]:
            if v.closed is None:
                v.sock.drop(True)
                self.oracle.pump()
                v.client_close()

    # -- rules: runs (section 4) and delivery (section 5) -----------------------------------------------
    @precondition(lambda self: self.target.runs)
    @rule(index=st.integers(0, 50), text=st.sampled_from(RUN_INPUTS), repeat=st.booleans())
    @_budgeted
    def start_run(self, index: int, text: str, repeat: bool) -> None:
        view = self._live(index)
        if view is None or view.user is None:
            return
        rid = self._rid("run")
        self.oracle.run_view(view.user, rid)
        self._act(f"run.start {rid} {text!r} on {view.label}" + (" (twice)" if repeat else ""))
        frame = {"type": "run.start", "request_id": rid, "input": text}
        view.send("start", frame, rid)
        if repeat:
            view.send("start", frame, rid)
        self._await_replies(view)

    @precondition(lambda self: self.target.runs)
    @rule(index=st.integers(0, 50), which=st.sampled_from(["own", "foreign"]))
    @_budgeted
    def cancel(self, index: int, which: str) -> None:
        view = self._live(index)
        if view is None or view.user is None:
            return
        if which == "own":
            runs = [r for r in view.user.runs.values() if r.run_id]
            if not runs:
                return
            run = runs[index % len(runs)]
            run.cancelled = True
            run.belief.hidden.add("cancel")
            self._act(f"run.cancel own run {run.run_id} on {view.label}")
            view.send("cancel", {"type": "run.cancel", "run_id": run.run_id})
            self._barrier(view)
            return
        others = [r for u in self.oracle.users.values() if u is not view.user for r in u.runs]
        if not others:
            return
        foreign = others[index % len(others)]
        unknown = uuid.uuid4().hex
        self._act(f"run.cancel another user's run {foreign} and an unknown run on {view.label}")
        a = view.send("cancel", {"type": "run.cancel", "run_id": foreign})
        b = view.send("cancel", {"type": "run.cancel", "run_id": unknown})
        self._barrier(view)
        self.oracle.count("no_cross_user_read")
        shape_a = None if a.reply is None else (a.reply.get("type"), a.reply.get("code"))
        shape_b = None if b.reply is None else (b.reply.get("type"), b.reply.get("code"))
        if shape_a != shape_b:
            raise view.fail("no_cross_user_read", f"cancel of another user's run answered {shape_a}, "
                            f"an unknown run {shape_b}", ["the same answer for both (section 3)"])

    @precondition(lambda self: self.target.runs)
    @rule(index=st.integers(0, 50), how=st.sampled_from(["prefix", "first", "beyond", "lower"]))
    @_budgeted
    def ack(self, index: int, how: str) -> None:
        """Cumulative ack (section 5): of what was received, only the first, past the end, or a
        lower seq after a higher one (out of order); a barrier proves it handled."""
        view = self._live(index)
        if view is None or view.user is None:
            return
        self.oracle.pump()
        prefix = view.user.delivered_prefix()
        if prefix == 0 and how != "beyond":
            return
        seq = {"prefix": prefix, "first": 1, "beyond": prefix + 5, "lower": max(1, prefix - 1)}[how]
        self._act(f"ack {seq} ({how}) on {view.label}")
        view.send("ack", {"type": "ack", "seq": seq})
        view.user.ack_perm = max(view.user.ack_perm, seq)
        self._barrier(view)
        view.user.on_ack_proven(view, seq, certain=prefix)
        for other in view.user.live_sockets():
            if other is not view:
                self._barrier(other)
                view.user.on_ack_proven(other, seq, certain=prefix)

    @precondition(lambda self: self.target.runs)
    @rule(user=st.integers(0, USERS_PER_EXAMPLE - 1), bad=st.booleans())
    @_budgeted
    def read_stream(self, user: int, bad: bool) -> None:
        """GET /v1/events and /v1/escalations: the stream's delivery states, and isolation."""
        u = self.oracle.user(self.names[user])
        self.oracle.pump()
        if bad:
            self._act(f"GET /v1/events with an expired token for {u.name}")
            if not self.target.tokens.can_mint:
                return
            status, body = self._http().get("/v1/events?after=0", self.target.tokens.bad("token_expired", u.name))
            self.oracle.count("auth_errors_specific")
            code = (body.get("error") or {}).get("code") if isinstance(body, dict) else None
            if status != 401 or code != "token_expired":
                raise self.oracle.violation("auth_errors_specific", f"GET /v1/events with an expired token: "
                                            f"{status} {code}", ["401 token_expired"])
            return
        self._act(f"GET /v1/events and /v1/escalations as {u.name}")
        self._read_http(u)

    def _read_http(self, u: UserView) -> list[dict[str, Any]]:
        token = self.target.tokens.good(u.name)
        status, body = self._http().get("/v1/events?after=0&limit=1000", token)
        now = time.monotonic()
        self.oracle.pump()
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("events"), list):
            raise self.oracle.violation("frames_valid", f"GET /v1/events as {u.name}: {status} {str(body)[:120]}",
                                        ["200 with an events list"])
        if u.context_id is not None and body.get("context_id") not in (None, u.context_id):
            raise self.oracle.violation("one_context_per_user", f"GET /v1/events as {u.name} reads context "
                                        f"{body.get('context_id')}, the sockets got {u.context_id}",
                                        [f"context {u.context_id}"])
        records: list[dict[str, Any]] = [r for r in body["events"] if isinstance(r, dict)]
        u.on_listing(records)
        for rec in records:
            u.on_http_event(rec, now)
        status, esc = self._http().get("/v1/escalations", token)
        if status == 200 and isinstance(esc, dict):
            for rec in esc.get("escalations") or []:
                owner = self.oracle.run_owner.get(str(rec.get("run_id")))
                self.oracle.count("no_cross_user_read")
                if owner is not None and owner is not u:
                    raise self.oracle.violation("no_cross_user_read", f"GET /v1/escalations as {u.name} lists "
                                                f"seq {rec.get('seq')} of {owner.name}", ["own escalations only"])
        u.apply_runs()
        return records

    @precondition(lambda self: self.target.runs)
    @rule()
    @_budgeted
    def let_time_pass(self) -> None:
        """Withhold acks and let model time pass: every event must end ACKED or ESCALATED within the
        declared horizon (section 5). Polls the stream until then; never a blind sleep."""
        users = [u for u in self.oracle.users.values() if u.context_id is not None and u.runs]
        if not users:
            return
        self._act("withhold acks and let time pass (until every event is acked or escalated)")
        deadline = time.monotonic() + self.tm.delivery_horizon() + self.tm.late(self.tm.reply_timeout)
        while True:
            pending = 0
            for u in users:
                for rec in self._read_http(u):
                    if str(rec.get("state", "")).lower() in ("pending", "sent"):
                        pending += 1
            if pending == 0 or time.monotonic() > deadline:
                break
            for s in self.socks:
                s.sock.wait(lambda o: False, 0.05)  # a bounded poll interval between two reads
            self.oracle.pump()

    @precondition(lambda self: self.target.runs)
    @rule(index=st.integers(0, 50))
    @_budgeted
    def cancel_queued(self, index: int) -> None:
        """Section 4: a run.cancel that arrives before the run starts wins. A second run is started
        behind a long one on the same socket and cancelled at once; a server that runs a context's
        runs one at a time must end it with one agent_failed (cancelled) and no agent_started. The
        kit waits for its terminal event; the oracle checks what it is."""
        view = self._live(index)
        if view is None or view.user is None:
            return
        user = view.user
        first, second = self._rid("run"), self._rid("run")
        self.oracle.run_view(user, first)
        queued = self.oracle.run_view(user, second)
        self._act(f"run.start {first} {QUEUE_BEHIND!r}, run.start {second} '2+2' behind it, cancel {second} "
                  f"on {view.label}")
        view.send("start", {"type": "run.start", "request_id": first, "input": QUEUE_BEHIND}, first)
        view.send("start", {"type": "run.start", "request_id": second, "input": "2+2"}, second)
        self._await_replies(view)
        if queued.run_id is None or not view.live:
            return
        queued.cancelled = True
        queued.belief.hidden.add("cancel")
        view.send("cancel", {"type": "run.cancel", "run_id": queued.run_id})
        self._barrier(view)

        def ended() -> bool:
            return any(k in ("agent_completed", "agent_failed") for k in queued.kinds) or user.runs.get(
                queued.run_id or "") is not queued

        self._wait(view, ended, f"the terminal event of cancelled run {queued.run_id}",
                   self.tm.late(0.3) + self.tm.late(self.tm.reply_timeout))
        prefix = user.delivered_prefix()
        if prefix and view.live:
            # Ack what was received (a barrier proves it handled), so later sockets of this user
            # are checked for never getting those events again (acked_never_resent).
            self._act(f"ack {prefix} (prefix) on {view.label}")
            view.send("ack", {"type": "ack", "seq": prefix})
            user.ack_perm = max(user.ack_perm, prefix)
            self._barrier(view)
            user.on_ack_proven(view, prefix)

    @precondition(lambda self: self.tm.context_ttl <= 5.0 and self.target.tokens.can_mint)
    @rule()
    @_budgeted
    def context_expiry(self) -> None:
        """Section 3: a context idle for context_ttl with no socket attached expires, and the next
        connection_init gets a new context (new context_id, higher epoch), never the expired one.
        A fresh user connects, drops, waits the declared context_ttl, and connects again. Each wait
        costs context_ttl, so a kit run does this at most TTL_PROBES times."""
        if type(self).result.ttl_probes >= TTL_PROBES:
            return
        type(self).result.ttl_probes += 1
        name = f"{self.names[0]}-ttl-{self.seq}"
        self.seq += 1
        user = self.oracle.user(name)
        self._act(f"context expiry: {name} connects, drops, waits context_ttl {self.tm.context_ttl}s, connects")
        first = self._open(user, "good")
        self._init(first, self.target.tokens.good(name))
        self._wait(first, lambda: first.acked is not None, "connection_ack")
        if not first.live:
            return
        acked_at = time.monotonic()
        first.sock.drop(True)
        self.oracle.pump()
        first.client_close()
        # The declared idle time must pass with no socket attached: waiting for it is the action.
        # The late bound: a server may expire contexts by a periodic sweep, up to the tolerance.
        idle_until = acked_at + self.tm.late(self.tm.context_ttl)
        clock = threading.Event()  # never set: a bounded wait on the declared duration
        while time.monotonic() < idle_until:
            clock.wait(min(0.25, max(0.0, idle_until - time.monotonic())))
            self.oracle.pump()  # the example's other sockets keep being observed meanwhile
        before = first.acked
        second = self._open(user, "good")
        self._init(second, self.target.tokens.good(name))
        self._wait(second, lambda: second.acked is not None, "connection_ack")
        after = second.acked
        if before is not None and after is not None:
            # Expired means replaced: the same id and epoch again is the expired context reused.
            self.oracle.count("expired_context_never_reused")
            if (after.get("context_id"), after.get("epoch")) == (before.get("context_id"), before.get("epoch")):
                raise self.oracle.violation(
                    "expired_context_never_reused",
                    f"user {name}: after {self.tm.late(self.tm.context_ttl):.1f}s idle with no socket (context_ttl "
                    f"{self.tm.context_ttl}s) the same context {before.get('context_id')} epoch "
                    f"{before.get('epoch')} again", ["a new context_id or a higher epoch"])
        if second.closed is None:
            second.sock.drop(True)
            self.oracle.pump()
            second.client_close()

    @invariant()
    def observations_allowed(self) -> None:
        """After every client action: everything observed is allowed by the model."""
        self.oracle.end_of_step()

    def teardown(self) -> None:
        try:
            if not self.exhausted and self.target.runs:
                # End of the example: what the server stored must be what the model allows too.
                for u in list(self.oracle.users.values()):
                    if u.context_id is not None and (u.runs or u.events):
                        self._act(f"read back the stream of {u.name}")
                        self._read_http(u)
        finally:
            for s in self.socks:
                if not s.sock.ended:
                    s.sock.drop(True)
            for http in self.https:
                http.close()
        for prop, n in self.oracle.checks.items():
            type(self).result.checks[prop] = type(self).result.checks.get(prop, 0) + n


class ClusterConformanceMachine(ConformanceMachine):
    """The machine for a target of several nodes: the same rules, and each example draws where its
    users' rounds over the nodes start (:class:`~.placement.Placement`). Drawn, so that examples
    differ (with one fixed offset every example's first socket would be on one node), and part of
    the example, so that a replay while shrinking places every action as the failing run did. A
    class of its own, so that a single server's examples draw exactly what they always drew."""

    @initialize(start=st.booleans(), data=st.data())
    @_budgeted
    def first_socket(self, start: bool, data: st.DataObject) -> None:
        self.placement.salt = data.draw(st.integers(0, 2**16 - 1), label="placement")
        self._first_socket(start)


def machine_for(target: Target, *, shrink_deadline: float = 0.0, prefix: str | None = None) -> type[ConformanceMachine]:
    """The machine class specialised for ``target``, with a fresh :class:`KitResult` (``.result``);
    ``shrink_deadline`` 0 means no time budget (a test may then drive its rules by hand)."""
    nodes = target.nodes
    result = KitResult(nodes=nodes, seed=target.seed, sessions=[0] * len(nodes), http_requests=[0] * len(nodes))
    base = ClusterConformanceMachine if len(nodes) > 1 else ConformanceMachine
    return type("Conformance", (base,), {
        "target": target, "result": result, "shrink_deadline": shrink_deadline,
        "prefix": prefix or f"pp{uuid.uuid4().hex[:6]}",
    })


def run_kit(target: Target, *, examples: int = 20, steps: int = 8, randomize: bool = False,
            budget: float = 45.0, shrink_budget: float = 4.0, prefix: str | None = None,
            random_seed: int | None = None) -> KitResult:
    """Run the kit; a violation comes back in ``result.violation`` with the shrunk client actions.

    The search is bounded by ``examples`` (derandomized unless ``randomize``: the same client
    actions every run) and, as a safety net, by ``budget`` seconds; shrinking a failure gets
    ``shrink_budget`` seconds from the moment it is found, then the smallest trace so far is reported.
    A random search draws from ``random_seed`` (a fresh one when None), kept in
    ``result.random_seed``: the same seed, examples and steps draw the same client actions.
    """
    if random_seed is not None:
        randomize = True
    elif randomize:
        random_seed = secrets.randbits(32)
    start = time.monotonic()
    machine = machine_for(target, shrink_deadline=start + budget, prefix=prefix)
    result = machine.result
    cfg = settings(max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
                   derandomize=not randomize, suppress_health_check=list(HealthCheck),
                   phases=[Phase.generate, Phase.shrink], report_multiple_bugs=False, print_blob=False)
    trace: list[str] = []
    seen: list[Violation] = []

    def found(v: Violation) -> None:
        seen.append(v)
        machine.shrink_deadline = min(machine.shrink_deadline, time.monotonic() + shrink_budget)

    _capture_steps(machine, trace, found)
    result.random_seed = random_seed
    test = get_state_machine_test(machine, settings=cfg)
    if random_seed is not None:
        test = hypothesis_seed(random_seed)(test)
    try:
        test()
    except Violation as v:
        v.trace = tuple(trace)
        result.violation = v
    except Flaky as exc:
        # The server's timing made a replay fail at another step (or not at all): every violation
        # was recorded with the actions that led to it; report the shortest.
        if not seen:
            raise KitError(f"a failing trace did not fail again when replayed: {exc}") from None
        result.violation = min(seen, key=lambda v: len(v.trace))
    result.seconds = time.monotonic() - start
    return result


def _capture_steps(machine: type[ConformanceMachine], trace: list[str], found: Callable[[Violation], None]) -> None:
    """Keep the client actions of the last example run (the shrunk one when a violation is raised)
    and every violation any example raised, with its own actions."""
    original = machine.__init__

    def init(self: ConformanceMachine) -> None:
        original(self)
        trace.clear()
        self.oracle.actions = trace
        self.oracle.on_violation = found

    machine.__init__ = init  # type: ignore[method-assign]


def _first_violation(exc: BaseException) -> Violation | None:
    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, Violation):
            return e
        seen.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        seen.extend(getattr(e, "exceptions", ()))
    return None


__all__ = ["ClusterConformanceMachine", "ConformanceMachine", "KitResult", "Target", "machine_for", "run_kit",
           "summary"]
