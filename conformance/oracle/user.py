"""One user in lockstep with the context, delivery and run machines (docs/protocol.md sections 3, 4, 5)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeproof.model.context import CONNS
from pipeproof.model.delivery import ATTEMPT, Delivery
from pipeproof.model.invariants import well_ordered
from pipeproof.model.spec import Config
from pipeproof.protocol import Escalate

from .belief import _LIMIT, Belief, _allowed

if TYPE_CHECKING:
    from . import Oracle
    from .connection import Sent, SockView

# -- users, contexts, streams, runs ------------------------------------------------------------------


@dataclass
class EventView:
    seq: int
    belief: Belief
    event_id: str | None = None
    first_seen: float = field(default_factory=time.monotonic)
    attempt_seen: int = 0
    attempt_t: float = 0.0
    attempt_live: bool = False  # the last attempt was seen on a socket that stayed open
    acked: bool = False
    reason: str | None = None
    read_terminal: str | None = None  # the terminal state GET /v1/events showed (never left again)

    def terminal(self) -> bool:
        return all(c[0] in (Delivery.ACKED, Delivery.ESCALATED) for c in self.belief.configs)


@dataclass
class RunView:
    request_id: str
    belief: Belief
    run_id: str | None = None
    kinds: list[str] = field(default_factory=list)
    cancelled: bool = False
    cancel_won: bool = False  # it ended agent_failed without agent_started after the kit's cancel
    open_call: str | None = None  # the tool_call_id of its tool_executing not yet completed


class UserView:
    """One user: their context (context machine), their stream (one delivery belief per seq) and runs."""

    def __init__(self, kit: Oracle, name: str) -> None:
        self.kit = kit
        self.name = name
        self.ctx = kit.ctx_machine.initial_config()
        self.context_id: str | None = None
        self.epoch = 0
        self.sockets: list[SockView] = []
        self.events: dict[int, EventView] = {}
        self.kinds: dict[int, tuple[str, str]] = {}  # seq -> (run_id, kind)
        self.applied = 0  # seqs 1..applied were fired on their runs
        self.runs: dict[str, RunView] = {}  # run_id -> view
        self.requests: dict[str, RunView] = {}  # request_id -> view
        self.ack_perm = 0  # the highest seq any client of this user acked (ack or resume)
        self.blind = False  # a socket was dropped: sends the client never read are possible
        self.recent_drops: list[float] = []
        self.proven = 0  # the highest seq whose ack a barrier proved handled
        self.codes: dict[int, Any] = {}  # seq -> the code of an agent_failed event
        self.calls: dict[int, str] = {}  # seq -> the tool_call_id of a tool event
        self.last_init = 0.0  # when the init of the user's last acked socket was sent (an upper bound on idle)

    def live_sockets(self) -> list[SockView]:
        return [s for s in self.sockets if s.live]

    def delivered_prefix(self) -> int:
        n = 0
        while n + 1 in self.events and self.events[n + 1].attempt_seen > 0:
            n += 1
        return n

    # -- context (section 3) -----------------------------------------------------------------------
    def _fire_ctx(self, event: str, prop: str, what: str) -> None:
        fired = self.kit.ctx_machine.fire_all(self.ctx, event, {"account_full": False})
        if not fired:
            raise self.kit.violation(prop, f"user {self.name}: {what}",
                                     _allowed(self.kit.ctx_machine, [self.ctx], [{"account_full": False}]))
        self.ctx = fired[0][1]

    def on_ack(self, sock: SockView, f: Mapping[str, Any]) -> None:
        self.kit.count("one_context_per_user")
        cid, epoch = str(f["context_id"]), f["epoch"]
        if self.context_id is None:
            self._fire_ctx("create", "one_context_per_user", f"context {cid} created")
        elif cid == self.context_id:
            if epoch != self.epoch:
                raise self.kit.violation("expired_context_never_reused",
                                         f"user {self.name}: context {cid} handed out with epoch {epoch}, "
                                         f"earlier {self.epoch}", ["the same epoch for the same context"])
            self._fire_ctx("attach", "connection_limits_respected", f"another socket attached to {cid}")
        else:
            self._expired(sock, cid, epoch)
            self._fire_ctx("create", "one_context_per_user",
                           f"a second context {cid} (epoch {epoch}) while context {self.context_id} "
                           f"(epoch {self.epoch}) is live with {self.ctx[1][CONNS]} socket(s)")
            self.kit.count("expired_context_never_reused")
            if not isinstance(epoch, int) or epoch <= self.epoch:
                raise self.kit.violation("expired_context_never_reused",
                                         f"user {self.name}: new context with epoch {epoch} <= {self.epoch}",
                                         [f"epoch {self.epoch + 1}"])
            self._new_stream()
        self.context_id, self.epoch = cid, int(epoch)
        self.last_init = sock.sock.opened
        self.kit.count("model_transition")

    def _expired(self, sock: SockView, cid: str, epoch: Any) -> None:
        """A new context for a user whose context was live: allowed only after it expired (section 3),
        i.e. with no socket attached and idle for context_ttl; fire ``expire`` then."""
        tm = self.kit.timing
        fired = self.kit.ctx_machine.fire_all(self.ctx, "expire", {"account_full": False})
        if not fired:
            return  # create below reports it (one context per user)
        self.kit.count("expired_context_never_reused")
        self.kit.count("timeouts_honoured")
        # The old context was last used no earlier than last_init and the new one was created before
        # now: the idle time the server saw is at most the difference.
        idle = time.monotonic() - self.last_init
        if idle < tm.early(tm.context_ttl):
            raise self.kit.violation("timeouts_honoured",
                                     f"user {self.name}: new context {cid} (epoch {epoch}) at most {idle:.2f}s "
                                     f"after context {self.context_id} was last used; context_ttl is "
                                     f"{tm.context_ttl}s", [f"context {self.context_id} (epoch {self.epoch})"])
        self.ctx = fired[0][1]

    def _new_stream(self) -> None:
        """A new context has a new event stream (section 5): forget the expired one's."""
        self.events.clear()
        self.kinds.clear()
        self.codes.clear()
        self.calls.clear()
        self.applied = 0
        self.runs.clear()
        self.requests.clear()
        self.ack_perm = 0
        self.proven = 0
        self.blind = False

    def detach(self, sock: SockView) -> None:
        self._fire_ctx("detach", "connection_limits_respected", f"socket {sock.label} detached")
        if sock.sock.dropped:
            self.blind = True
            self.recent_drops.append(time.monotonic())

    def on_limit(self, sock: SockView) -> None:
        self.kit.count("connection_limits_respected")
        if self.kit.ctx_machine.fire_all(self.ctx, "reject_limit", {"account_full": False}):
            return
        # The server counts a dropped socket until it has processed the drop (docs/conformance.md).
        window = self.kit.timing.late(self.kit.timing.reply_timeout)
        pending = sum(1 for t in self.recent_drops if time.monotonic() - t < window)
        if self.ctx[1][CONNS] + pending >= self.kit.timing.max_connections_per_user:
            return
        raise self.kit.violation("connection_limits_respected",
                                 f"user {self.name}: close {_LIMIT} with {self.ctx[1][CONNS]} socket(s) "
                                 f"attached, limit {self.kit.timing.max_connections_per_user}",
                                 _allowed(self.kit.ctx_machine, [self.ctx], [{"account_full": False}]))

    # -- delivery (section 5) ----------------------------------------------------------------------
    def event_view(self, seq: int) -> EventView:
        ev = self.events.get(seq)
        if ev is None:
            ev = EventView(seq, Belief(self.kit.del_machine, (), ({"has_session": True}, {"has_session": False})))
            self.events[seq] = ev
        hidden = {"tick", "ack_timeout", "send_failed", "no_session_timeout"}
        if self.blind:
            hidden.add("send")
        ev.belief.hidden = hidden
        return ev

    def on_event(self, sock: SockView, f: Mapping[str, Any], t: float) -> None:
        seq, attempt, run_id, kind = int(f["seq"]), int(f["attempt"]), str(f["run_id"]), str(f["event"])
        where = f"{sock.where()}: event seq {seq} attempt {attempt} ({kind}, run {run_id[:12]})"
        self.kit.count("no_cross_user_read")
        owner = self.kit.run_owner.get(run_id)
        if owner is not None and owner is not self:
            raise self.kit.violation("no_cross_user_read", f"{where} belongs to user {owner.name}",
                                     [f"events of user {self.name}'s own runs only"])
        self.kit.count("acked_never_resent")
        self.kit.count("monotonic_event_state")
        if seq <= sock.floor:
            raise self.kit.violation("acked_never_resent",
                                     f"{where}: seq {seq} was acked (a resume or an ack a barrier proved handled)",
                                     ["no event with seq <= " + str(sock.floor)])
        known = self.kinds.get(seq)
        if known is not None and known != (run_id, kind):
            raise self.kit.violation("monotonic_event_state", f"{where}: seq {seq} was {known} before",
                                     ["the same event for the same seq"])
        self.kinds[seq] = (run_id, kind)
        self._note_code(seq, kind, f.get("data"))
        ev = self.event_view(seq)
        if ev.event_id is not None and ev.event_id != f["event_id"]:
            raise self.kit.violation("frames_valid", f"{where}: event_id changed from {ev.event_id}",
                                     ["event_id stable across resends"])
        ev.event_id = str(f["event_id"])
        sock.delivered.add(seq)
        if ev.acked:
            return  # a copy written before the ack was handled; this socket has not passed a barrier since
        b = ev.belief
        closure = b.closure()
        last_here = sock.attempts.get(seq, 0)
        if attempt < last_here:
            raise self.kit.violation("monotonic_event_state", f"{where} after attempt {last_here} on this socket",
                                     ["attempts of one event increase on a socket"])
        sock.attempts[seq] = attempt
        if attempt <= ev.attempt_seen:
            # Fan-out of an attempt already written, or an older attempt read late from another
            # socket (the order across sockets is not observable): no transition.
            return
        self.kit.count("attempts_bounded")
        after = b.fire("send", lambda c: c[1][ATTEMPT] == attempt)
        if not after:
            prop = ("acked_never_resent" if all(c[0] in (Delivery.ACKED, Delivery.ESCALATED) for c in closure)
                    else "attempts_bounded" if attempt > self.kit.timing.max_attempts else "model_transition")
            raise self.kit.violation(prop, f"{where}: the model allows no send reaching attempt {attempt} "
                                     f"from {b.states()}", b.allowed())
        self._resend_timing(ev, attempt, t, where)
        b.configs = after
        ev.attempt_seen, ev.attempt_t, ev.attempt_live = attempt, t, True

    def _resend_timing(self, ev: EventView, attempt: int, t: float, where: str) -> None:
        if ev.attempt_seen and attempt == ev.attempt_seen + 1 and ev.attempt_live:
            self.kit.count("timeouts_honoured")
            early, _ = self.kit.timing.resend_window(ev.attempt_seen)
            if t - ev.attempt_t < early:
                raise self.kit.violation("timeouts_honoured",
                                         f"{where}: resent {t - ev.attempt_t:.3f}s after attempt {ev.attempt_seen}",
                                         [f"not before {early:.3f}s (ack_timeout {self.kit.timing.ack_timeout}s)"])

    def on_ack_proven(self, sock: SockView, through: int, certain: int | None = None) -> None:
        """A barrier reply came back after ``ack through``: every event this client had received
        (contiguously) when it sent the ack, up to ``through``, must be ACKED now unless it had
        escalated first. ``certain`` is that received prefix at send time; events received after
        the ack left but before the barrier came back raced it: the server acks only what it had
        delivered (the model's ``ack`` guard), so for those both outcomes are allowed."""
        n = 0
        while n + 1 <= through and n + 1 in self.events and self.events[n + 1].attempt_seen > 0:
            n += 1
        sure = n if certain is None else min(n, certain)
        for seq in range(1, n + 1):
            ev = self.event_view(seq)
            if ev.acked:
                continue
            out: set[Config] = set()
            for c in ev.belief.closure():
                if c[0] is Delivery.ESCALATED:
                    out.add(c)
                if seq > sure:
                    out.add(c)  # raced the ack: may still be unacked
                for _, a in ev.belief.machine.fire_all(c, "ack"):
                    out.add(a)
            if not out:
                raise self.kit.violation("every_event_acked_or_escalated",
                                         f"user {self.name}: ack through {through} cannot ack seq {seq} "
                                         f"from {ev.belief.states()}", ev.belief.allowed())
            ev.belief.configs = out
            # A raced event is not known to be acked: a later delivery of it is allowed.
            ev.acked = seq <= sure and any(c[0] is Delivery.ACKED for c in out)
        sock.floor = max(sock.floor, sure)
        self.proven = max(self.proven, sure)

    def on_listing(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Section 5: seqs are allocated 1, 2, 3, ... per context, so ``GET /v1/events?after=0``
        lists every seq from 1, in order. One that skips a number is a gap, reported as one (not
        as the run or delivery rule that the missing event later seems to break)."""
        self.kit.count("seq_gap_free")
        for expected, rec in enumerate(records, start=1):
            seq = rec.get("seq")
            if seq != expected:
                raise self.kit.violation(
                    "seq_gap_free",
                    f"GET /v1/events?after=0 as {self.name}: seq {seq} where seq {expected} belongs "
                    f"(listed: {[r.get('seq') for r in records][:12]})",
                    [f"seq {expected}"])

    def on_http_event(self, rec: Mapping[str, Any], now: float) -> None:
        seq, state = int(rec["seq"]), str(rec.get("state", "")).lower()
        run_id, kind = str(rec.get("run_id")), str(rec.get("event"))
        self.kit.count("no_cross_user_read")
        owner = self.kit.run_owner.get(run_id)
        if owner is not None and owner is not self:
            raise self.kit.violation("no_cross_user_read",
                                     f"GET /v1/events of user {self.name} shows seq {seq} of user {owner.name}'s run",
                                     ["the caller's own stream only"])
        known = self.kinds.get(seq)
        if known is not None and known != (run_id, kind):
            raise self.kit.violation("monotonic_event_state", f"user {self.name}: GET /v1/events seq {seq} is "
                                     f"{(run_id, kind)}, the socket said {known}", ["one event per seq"])
        self.kinds[seq] = (run_id, kind)
        self._note_code(seq, kind, rec.get("data"))
        ev = self.event_view(seq)
        b = ev.belief
        attempt = rec.get("attempt")
        closure = b.closure()
        want = {"pending": Delivery.PENDING, "sent": Delivery.SENT, "acked": Delivery.ACKED,
                "escalated": Delivery.ESCALATED}.get(state)
        where = f"user {self.name}: GET /v1/events says seq {seq} is {state}"
        if want is None:
            raise self.kit.violation("frames_valid", f"{where}: not a delivery state", ["pending/sent/acked/escalated"])
        self.kit.count("monotonic_event_state")
        if ev.read_terminal is not None and state != ev.read_terminal:
            raise self.kit.violation("monotonic_event_state", f"{where}; an earlier read showed it {ev.read_terminal}",
                                     [f"{ev.read_terminal} (ACKED and ESCALATED are never left)"])
        if want in (Delivery.ACKED, Delivery.ESCALATED):
            ev.read_terminal = state
        self.kit.count("every_event_acked_or_escalated")
        if want is Delivery.ACKED:
            if seq > self.ack_perm:
                raise self.kit.violation("every_event_acked_or_escalated",
                                         f"{where}, but no client acked it (highest ack {self.ack_perm})",
                                         ["PENDING/SENT until a client acks, or ESCALATED"])
            out = {c for c in closure if c[0] is Delivery.ACKED}
            for c in closure:
                out |= {a for _, a in b.machine.fire_all(c, "ack")}
            ev.acked = True
        elif want is Delivery.ESCALATED:
            reason = rec.get("reason")
            if ev.reason is not None and reason != ev.reason:
                raise self.kit.violation("monotonic_event_state", f"{where} with reason {reason}, earlier {ev.reason}",
                                         ["an escalated event keeps its first reason"])
            # Already ESCALATED: with the reason read before, or reached by hidden steps the client
            # did not see (e.g. max_attempts before an ack was handled), whose reason it learns now.
            out = {c for c in closure if c[0] is Delivery.ESCALATED}
            for c in closure:
                for i in b.inputs:
                    for tr, a in b.machine.fire_all(c, None, i):
                        if a[0] is Delivery.ESCALATED and isinstance(tr.emits, Escalate) \
                                and tr.emits.reason == reason:
                            out.add(a)
            ev.reason = str(reason)
        else:
            # The store may lag the socket (a server marks SENT after queueing the frame), so a
            # PENDING/SENT read is only checked for liveness; terminal reads cannot be stale.
            if any(c[0] in (Delivery.ACKED, Delivery.ESCALATED) for c in b.configs) and ev.acked is False \
                    and ev.reason is not None:
                raise self.kit.violation("monotonic_event_state", f"{where} after it was escalated",
                                         ["ESCALATED is never left"])
            self._liveness(ev, state, attempt, now, where)
            return
        if not out:
            raise self.kit.violation("every_event_acked_or_escalated",
                                     f"{where} (attempt {attempt}); the model has it in "
                                     f"{b.states()}", b.allowed())
        b.configs = out

    def _liveness(self, ev: EventView, state: str, attempt: Any, now: float, where: str) -> None:
        tm = self.kit.timing
        self.kit.count("timeouts_honoured")
        if now - ev.first_seen > tm.delivery_horizon():
            raise self.kit.violation("every_event_acked_or_escalated",
                                     f"{where} {now - ev.first_seen:.2f}s after the client first saw it",
                                     [f"ACKED or ESCALATED within {tm.delivery_horizon():.2f}s "
                                      f"(max_attempts x ack wait + resume_window, x tolerance)"])
        if state == "sent" and attempt == ev.attempt_seen and ev.attempt_live:
            _, late = tm.resend_window(int(attempt))
            if now - ev.attempt_t > late + tm.late(tm.reply_timeout):
                raise self.kit.violation("timeouts_honoured",
                                         f"{where} with attempt {attempt}, {now - ev.attempt_t:.2f}s after it was "
                                         f"written and no ack", [f"resend or escalate within {late:.2f}s"])

    # -- runs (section 4) --------------------------------------------------------------------------
    def on_reply(self, sock: SockView, item: Sent, f: Mapping[str, Any]) -> None:
        if item.kind not in ("start", "probe") or item.request_id is None:
            return
        view = self.requests.get(item.request_id)
        if view is None:
            return
        if f.get("type") == "run.accepted":
            run_id = str(f.get("run_id"))
            if view.run_id is not None:
                self.kit.count("replies_answer_requests")
                if view.run_id != run_id:
                    raise self.kit.violation("replies_answer_requests",
                                             f"user {self.name}: request_id {item.request_id} accepted as run "
                                             f"{run_id}, earlier as {view.run_id}", ["the same run_id (idempotent)"])
                return
            self._fire_run(view, "validate_ok", "run.accepted")
            view.run_id = run_id
            self.runs[run_id] = view
            self.kit.run_owner[run_id] = self
        elif view.run_id is None and view.belief.configs == {view.belief.machine.initial_config()}:
            self._fire_run(view, "validate_fail", f"error {f.get('code')}")
        self.apply_runs()

    def _note_code(self, seq: int, kind: str, data: Any) -> None:
        if kind == "agent_failed" and isinstance(data, Mapping) and "code" in data:
            self.codes[seq] = data["code"]
        if kind in ("tool_executing", "tool_completed") and isinstance(data, Mapping) and "tool_call_id" in data:
            self.calls[seq] = str(data["tool_call_id"])

    def _tool_pairing(self, view: RunView, seq: int, kind: str) -> None:
        """Section 4: each tool_completed closes the run's open tool call, naming its tool_call_id."""
        if kind == "tool_executing":
            view.open_call = self.calls.get(seq)
            return
        if kind != "tool_completed":
            return
        self.kit.count("run_events_well_ordered")
        opened, closed = view.open_call, self.calls.get(seq)
        view.open_call = None
        if opened is not None and closed is not None and closed != opened:
            raise self.kit.violation("run_events_well_ordered",
                                     f"user {self.name}: run {view.run_id}: seq {seq} tool_completed with "
                                     f"tool_call_id {closed!r}, the open call is {opened!r}",
                                     [f"tool_completed with tool_call_id {opened!r}"])

    def _cancel_outcome(self, view: RunView, seq: int, kind: str) -> None:
        """Section 4: a cancelled run that never started ends with one agent_failed, code cancelled."""
        if not view.cancelled or "agent_started" in view.kinds[:-1]:
            return
        self.kit.count("cancel_before_start_wins")
        if kind != "agent_failed":
            return  # agent_started: the cancel came after the start (the model checks the rest)
        code = self.codes.get(seq)
        if code is not None and code != "cancelled":
            raise self.kit.violation("cancel_before_start_wins",
                                     f"user {self.name}: run {view.run_id} cancelled before it started ended "
                                     f"agent_failed with code {code!r}", ["agent_failed code cancelled"])
        view.cancel_won = True

    def _fire_run(self, view: RunView, event: str, what: str) -> None:
        after = view.belief.fire(event)
        if not after:
            prop = "cancel_before_start_wins" if event == "agent_started" else "run_events_well_ordered"
            raise self.kit.violation(prop, f"user {self.name}: run {view.run_id or view.request_id}: {what} "
                                     f"from {view.belief.states()}", view.belief.allowed())
        view.belief.configs = after

    def apply_runs(self) -> None:
        """Fire each seq's kind on its run, in seq order (resends reorder frames, seqs do not)."""
        while self.applied + 1 in self.kinds:
            run_id, kind = self.kinds[self.applied + 1]
            view = self.runs.get(run_id)
            if view is None:
                return  # its run.accepted is on a socket not read yet
            view.kinds.append(kind)
            self.kit.count("run_events_well_ordered")
            why = well_ordered(tuple(view.kinds))
            if why:
                raise self.kit.violation("run_events_well_ordered", f"user {self.name}: run {run_id}: {why} "
                                         f"(events {view.kinds})", view.belief.allowed())
            self._fire_run(view, kind, f"event seq {self.applied + 1} {kind}")
            self._tool_pairing(view, self.applied + 1, kind)
            self._cancel_outcome(view, self.applied + 1, kind)
            self.applied += 1

    def unresolved_runs(self) -> list[str]:
        """Event seqs naming runs this user never started (once every run.start was answered)."""
        if any(v.run_id is None and not _answered(v) for v in self.requests.values()):
            return []
        return [f"seq {s}: run {r}" for s, (r, _) in sorted(self.kinds.items()) if r not in self.runs]


def _answered(view: RunView) -> bool:
    return view.belief.configs != {view.belief.machine.initial_config()}
