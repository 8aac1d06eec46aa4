"""The invariants of model/invariants.py as Z3 formulas, and the lemmas that make them inductive
(docs/proofs.md, "lemmas"; docs/protocol.md sections 1, 3, 4, 5).

A *state* property is a formula over one system state (:data:`PROPERTIES`); a *step* property a
formula over one case of Next (which component transitions it fires, with their pre and post
configurations). Each state formula is tested against the Python predicate it mirrors on every state
the explorer reaches (tests/model/test_z3props.py), so the two statements cannot drift.

A property that is not inductive on its own is proved with *lemmas*: facts about reachable states
that the architect can read as part of the spec (``pipeproof check --explain PROPERTY``). Each
lemma names the lemmas it needs; ``Inv`` is the conjunction of all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import z3

from pipeproof.model.check.z3enc import Term
from pipeproof.model.check.z3system import Case, St, SysEnc
from pipeproof.model.check.z3wo import WO
from pipeproof.model.connection import HANDLE_EVENTS, TIMEOUT_EVENTS, Conn
from pipeproof.model.context import Ctx
from pipeproof.model.delivery import RANK, Delivery
from pipeproof.model.run import Run

Body = Callable[[SysEnc, St], Term]


def _ack_only_when_ready(e: SysEnc, st: St) -> Term:
    conn = e.encs["conn"]

    def body(s: Term) -> Term:
        c = e.cfg(st, "conn", (s,))
        return z3.Implies(c["ack_sent"], conn.states.one_of(c.state, [Conn.READY, Conn.DRAINING, Conn.CLOSED]))

    return e.u.forall("S", body, "s")


def _attached_holds_live_epoch(e: SysEnc, st: St) -> Term:
    def body(s: Term) -> Term:
        user = e.u.owner(s)
        return z3.Implies(e.attached(st, s), z3.And(
            z3.Select(st["ctx.state"], user) == e.encs["ctx"].states[Ctx.LIVE],
            z3.Select(st["epoch_seen"], s) == z3.Select(st["ctx.epoch"], user)))

    return e.u.forall("S", body, "s")


def _attached_has_slot(e: SysEnc, st: St) -> Term:
    def body(s: Term) -> Term:
        user, slot = e.u.owner(s), z3.Select(st["slot"], s)
        return z3.Implies(e.attached(st, s), z3.And(
            slot >= 0, slot < z3.Select(st["ctx.conns"], user), z3.Select(st["holder"], user, slot) == s))

    return e.u.forall("S", body, "s")


def _slot_holder_is_attached(e: SysEnc, st: St) -> Term:
    def body(user: Term) -> Term:
        def inner(k: Term) -> Term:
            h = z3.Select(st["holder"], user, k)
            return z3.Implies(z3.And(k >= 0, k < z3.Select(st["ctx.conns"], user)), z3.And(
                e.attached(st, h), e.u.owner(h) == user, z3.Select(st["slot"], h) == k))

        if e.u.symbolic:
            k = z3.Int("k!slot")
            return z3.ForAll([k], inner(k))
        return z3.And([inner(z3.IntVal(k)) for k in range(len(e.u.sessions) + 1)])

    return e.u.forall("U", body, "u")


def _one_instance(e: SysEnc, st: St) -> Term:
    def body(user: Term) -> Term:
        live = z3.Select(st["ctx.state"], user) == e.encs["ctx"].states[Ctx.LIVE]
        n = z3.Select(st["ctx.instances"], user)
        return z3.And(z3.Implies(live, n == 1), z3.Implies(z3.Not(live), n == 0))

    return e.u.forall("U", body, "u")


def _conns_within_limit(e: SysEnc, st: St) -> Term:
    cap = e.encs["ctx"].params["max_connections_per_user"]

    def body(user: Term) -> Term:
        live = z3.Select(st["ctx.state"], user) == e.encs["ctx"].states[Ctx.LIVE]
        n = z3.Select(st["ctx.conns"], user)
        return z3.And(n >= 0, n <= cap, z3.Implies(z3.Not(live), n == 0))

    return e.u.forall("U", body, "u")


def _total_within_account(e: SysEnc, st: St) -> Term:
    # Only the upper bound: "total >= 0" would need "total >= conns[u] for each u", a sum fact that
    # is not first order (the ghost is the sum by construction; model/check/z3system.py).
    return st["total"] <= e.u.max_account


_RUN_WO = {
    Run.REQUESTED: "EMPTY", Run.ACCEPTED: "EMPTY", Run.REJECTED: "EMPTY", Run.RUNNING: "IN",
    Run.TOOL_RUNNING: "TOOL", Run.COMPLETED: "DONE", Run.FAILED: "DONE",
}


def _stream_matches_run(e: SysEnc, st: St) -> Term:
    run = e.encs["run"]

    def body(user: Term) -> Term:
        state, wo, n = z3.Select(st["run.state"], user), z3.Select(st["wo"], user), z3.Select(st["len"], user)
        return z3.And(n >= 0, n <= e.u.K,
                      *[z3.Implies(state == run.states[r], wo == WO[q]) for r, q in _RUN_WO.items()])

    return e.u.forall("U", body, "u")


def _events(e: SysEnc, st: St, body: Callable[[Term, Term], Term]) -> Term:
    return e.u.forall("U", lambda user: e.u.forall(
        "Int", lambda i: z3.Implies(e.in_stream(st, user, i), body(user, i)), "i"), "u")


def _attempts_in_range(e: SysEnc, st: St) -> Term:
    ev = e.encs["event"]
    ma = ev.params["max_attempts"]

    def body(user: Term, i: Term) -> Term:
        c = e.cfg(st, "event", (user, i))
        a = c["attempt"]
        return z3.And(a >= 0, a <= ma, z3.Implies(c.state == ev.states[Delivery.PENDING], a < ma),
                      z3.Implies(c.state == ev.states[Delivery.SENT], a >= 1))

    return _events(e, st, body)


def _acked_was_delivered(e: SysEnc, st: St) -> Term:
    ev = e.encs["event"]

    def body(user: Term, i: Term) -> Term:
        c = e.cfg(st, "event", (user, i))
        return z3.Implies(ev.states.one_of(c.state, [Delivery.ACKED, Delivery.SENT]), c["delivered"])

    return _events(e, st, body)


def _clocks_in_range(e: SysEnc, st: St) -> Term:
    ev = e.encs["event"]
    at, rw = ev.params["ack_timeout"], ev.params["resume_window"]

    def body(user: Term, i: Term) -> Term:
        c = e.cfg(st, "event", (user, i))
        terminal = ev.states.one_of(c.state, [Delivery.ACKED, Delivery.ESCALATED])
        return z3.And(c["waited"] >= 0, c["waited"] <= at, c["idle"] >= 0, c["idle"] <= rw, c["age"] >= 0,
                      z3.Implies(terminal, z3.And(c["waited"] == 0, c["idle"] == 0, c["age"] == 0)))

    return _events(e, st, body)


def _age_accounts_for_time(e: SysEnc, st: St) -> Term:
    ev = e.encs["event"]
    at = ev.params["ack_timeout"]

    def body(user: Term, i: Term) -> Term:
        c = e.cfg(st, "event", (user, i))
        terminal = ev.states.one_of(c.state, [Delivery.ACKED, Delivery.ESCALATED])
        a, age = c["attempt"], c["age"]
        return z3.Implies(z3.Not(terminal), z3.And(
            z3.Implies(a == 0, z3.And(age <= c["idle"], c["waited"] == 0)),
            z3.Implies(a >= 1, age <= c["idle"] + (a - 1) * at + c["waited"])))

    return _events(e, st, body)


def _lease_holder_acts(e: SysEnc, st: St) -> Term:
    def body(user: Term) -> Term:
        lease = z3.Select(st["lease"], user)
        return z3.And(lease >= -1, lease < e.u.N, z3.Implies(
            z3.And(lease >= 0, e.node_up(st, lease)), z3.Select(st["holds"], user, lease)))

    return e.u.forall("U", body, "u")


def _some_node_up(e: SysEnc, st: St) -> Term:
    return e.u.exists_node(lambda n: e.node_up(st, n), "alive")


def _owner_is_the_lease(e: SysEnc, st: St) -> Term:
    def body(user: Term) -> Term:
        return e.u.forall_node(lambda n: z3.And(
            z3.Implies(z3.And(z3.Select(st["holds"], user, n), e.node_up(st, n)), z3.Select(st["lease"], user) == n),
            z3.Implies(z3.And(z3.Select(st["run_holds"], user, n), e.node_up(st, n)),
                       z3.Select(st["run_lease"], user) == n)), "n")

    return e.u.forall("U", body, "u")


@dataclass(frozen=True)
class Lemma:
    name: str
    doc: str
    body: Body
    needs: tuple[str, ...] = ()


LEMMAS: tuple[Lemma, ...] = (
    Lemma("ack_only_when_ready", "connection_ack has gone out only on a socket that is READY, DRAINING or "
          "CLOSED (so OPEN and INITIALISING sockets have ack_sent = false).", _ack_only_when_ready),
    Lemma("one_instance", "A user's context is LIVE exactly when one instance exists; ABSENT and EXPIRED "
          "hold none.", _one_instance),
    Lemma("conns_within_limit", "0 <= conns <= max_connections_per_user, and conns = 0 unless the context "
          "is LIVE (expire needs conns = 0; create starts at 1).", _conns_within_limit),
    Lemma("total_within_account", "The account total (the sum of every user's conns, a ghost kept by "
          "each step's delta) is at most max_connections_per_account.", _total_within_account),
    Lemma("attached_has_slot", "Every attached (READY or DRAINING) session holds a slot 0 <= k < conns of its "
          "user, and the user's holder of k is that session.", _attached_has_slot,
          ("slot_holder_is_attached", "conns_within_limit")),
    Lemma("slot_holder_is_attached", "Every slot 0 <= k < conns of a user is held by an attached session of that "
          "user whose slot is k. With attached_has_slot: conns counts the attached sessions exactly.",
          _slot_holder_is_attached, ("attached_has_slot", "conns_within_limit")),
    Lemma("attached_holds_live_epoch", "An attached session's user has a LIVE context, and the session holds "
          "that context's current epoch.", _attached_holds_live_epoch,
          ("attached_has_slot", "slot_holder_is_attached", "conns_within_limit")),
    Lemma("stream_matches_run", "The stream is consistent with the run state: REQUESTED, ACCEPTED and REJECTED "
          "runs have emitted nothing; RUNNING has started with no tool open; TOOL_RUNNING has exactly one tool "
          "open; COMPLETED and FAILED have emitted their one terminal event; 0 <= len <= events_per_user.",
          _stream_matches_run),
    Lemma("attempts_in_range", "0 <= attempt <= max_attempts; a PENDING event still has an attempt left "
          "(attempt < max_attempts); a SENT event was written (attempt >= 1).", _attempts_in_range),
    Lemma("acked_was_delivered", "A SENT or ACKED event has reached the client (delivered).", _acked_was_delivered),
    Lemma("clocks_in_range", "0 <= waited <= ack_timeout, 0 <= idle <= resume_window, age >= 0; a terminal "
          "event's clocks are stopped at 0.", _clocks_in_range),
    Lemma("age_accounts_for_time", "A live event's age is covered by the time it could legitimately spend: "
          "age <= idle when never written (and waited = 0), else age <= idle + (attempt-1)*ack_timeout + waited.",
          _age_accounts_for_time, ("clocks_in_range", "attempts_in_range")),
    Lemma("owner_is_the_lease", "A live node that acts as a context's delivery owner (or a run's holder) is the "
          "node the store's lease names: every takeover is a compare-and-set from a free lease or a dead "
          "holder, and a crash forgets the dead node's ownership.", _owner_is_the_lease),
    Lemma("lease_holder_acts", "The store's delivery lease is free or names a node (-1 <= lease < nodes), and a live "
          "node it names acts as the owner: the lease and the belief are taken together, and only a crash, which "
          "kills the node, takes the belief away.", _lease_holder_acts),
    Lemma("some_node_up", "Some node is alive: a node crashes only while another is up.", _some_node_up),
)
LEMMA_BY_NAME = {lem.name: lem for lem in LEMMAS}


# -- properties -------------------------------------------------------------------------------------
def _eae_state(e: SysEnc, st: St) -> Term:
    ev = e.encs["event"]
    horizon = ev.params["horizon"]

    def body(user: Term, i: Term) -> Term:
        c = e.cfg(st, "event", (user, i))
        terminal = ev.states.one_of(c.state, [Delivery.ACKED, Delivery.ESCALATED])
        has = e.has_session(st, user)
        # send_failed is offered only beside send on a live session (model/invariants.py, _can_progress);
        # a send or a timeout is the delivery owner's decision, time passes without one.
        decisions = z3.Or(*[ev.enabled(x, c, {"has_session": has}) for x in ("ack_timeout", "no_session_timeout")],
                          z3.And(has, ev.enabled("send", c)))
        progress = z3.Or(ev.enabled("tick", c, {"has_session": has}), z3.And(e.can_decide(st, user), decisions))
        return z3.And(z3.Implies(c.state == ev.states[Delivery.ACKED], c["delivered"]),
                      z3.Implies(z3.Not(terminal), z3.And(c["age"] <= horizon, progress)))

    return _events(e, st, body)


def _attempts_bounded_state(e: SysEnc, st: St) -> Term:
    ma = e.encs["event"].params["max_attempts"]
    return _events(e, st, lambda user, i: z3.Select(st["event.attempt"], user, i) <= ma)


def _one_context_state(e: SysEnc, st: St) -> Term:
    ctx = e.encs["ctx"]

    def per_user(user: Term) -> Term:
        n = z3.Select(st["ctx.instances"], user)
        return z3.And(n <= 1, (z3.Select(st["ctx.state"], user) == ctx.states[Ctx.LIVE]) == (n == 1))

    def per_session(s: Term) -> Term:
        return z3.Implies(e.attached(st, s), z3.Select(st["epoch_seen"], s) == z3.Select(st["ctx.epoch"], e.u.owner(s)))

    return z3.And(e.u.forall("U", per_user, "u"), e.u.forall("S", per_session, "s"))


def _limits_state(e: SysEnc, st: St) -> Term:
    cap = e.encs["ctx"].params["max_connections_per_user"]
    within = e.u.forall("U", lambda user: z3.Select(st["ctx.conns"], user) <= cap, "u")
    if e.u.symbolic:
        # Counting is not first order: "conns = number of attached sessions" is the slot bijection.
        count = z3.And(_attached_has_slot(e, st), _slot_holder_is_attached(e, st))
        total = st["total"] <= e.u.max_account
    else:
        count = z3.And([z3.Select(st["ctx.conns"], user) == z3.Sum(
            [z3.If(z3.And(e.attached(st, s), e.u.owner(s) == user), 1, 0) for s in e.u.sessions])
            for user in e.u.users])
        total = z3.Sum([z3.Select(st["ctx.conns"], user) for user in e.u.users]) <= e.u.max_account
    return z3.And(within, count, total)


def _well_ordered_state(e: SysEnc, st: St) -> Term:
    return e.u.forall("U", lambda user: z3.Select(st["wo"], user) != WO["BAD"], "u")


def _one_live_owner_state(e: SysEnc, st: St) -> Term:
    def body(user: Term) -> Term:
        def two(field: str) -> Term:
            return e.u.forall_node(lambda a: e.u.forall_node(lambda b: z3.Implies(
                z3.And(z3.Select(st[field], user, a), e.node_up(st, a), z3.Select(st[field], user, b),
                       e.node_up(st, b)), a == b), "b"), "a")

        return z3.And(two("holds"), two("run_holds"))

    return e.u.forall("U", body, "u")


StepBody = Callable[[SysEnc, Case], Term]


def _handle_only_when_ready(e: SysEnc, c: Case) -> Term:
    conn = e.encs["conn"]
    return z3.And([z3.And(f.pre.state == conn.states[Conn.READY], f.pre["ack_sent"])
                   for f in c.firings if f.family == "conn" and f.transition.event in HANDLE_EVENTS
                   and f.pre is not None])


def _ack_from_ready(e: SysEnc, c: Case) -> Term:
    conn = e.encs["conn"]
    return z3.And([f.pre.state == conn.states[Conn.READY] for f in c.firings
                   if f.family == "conn" and f.transition.event == "send_ack" and f.pre is not None])


def _terminal(e: SysEnc, state: object) -> bool:
    return state in e.encs["event"].machine.terminal


def _never_resent(e: SysEnc, c: Case) -> Term:
    ev = e.encs["event"]
    out = []
    for f in c.firings:
        if f.family == "event" and f.transition.event == "send":
            if f.pre is None:
                out.append(z3.BoolVal(not _terminal(e, f.transition.source)))
            else:
                out.append(z3.Not(ev.states.one_of(f.pre.state, sorted(ev.machine.terminal, key=str))))
    return z3.And(out)


def _monotonic(e: SysEnc, c: Case) -> Term:
    # Every event firing's source and target are fixed by its transition, so this is decided
    # statically; it still only counts when the case is enabled from an Inv state.
    ok = True
    for f in c.firings:
        if f.family != "event":
            continue
        src, dst = f.transition.source, f.transition.target
        if RANK[dst] < RANK[src] or (_terminal(e, src) and dst is not src):  # type: ignore[index]
            ok = False
    return z3.BoolVal(ok)


def _new_epoch(e: SysEnc, c: Case) -> Term:
    out = []
    for f in c.firings:
        if f.family != "ctx" or f.transition.event not in ("create", "attach") or f.pre is None or f.post is None:
            continue
        if f.transition.source is Ctx.LIVE and f.transition.event == "attach":
            continue
        out.append(f.post["epoch"] > f.pre["epoch"])
    return z3.And(out)


def _own_stream_only(e: SysEnc, c: Case) -> Term:
    out: list[Term] = []
    for f in c.firings:
        if f.family != "event" or not f.index:
            continue
        out.extend(e.u.owner(s) == f.index[0] for s in c.sessions)
    return z3.And(out)


def _cancel_wins(e: SysEnc, c: Case) -> Term:
    return z3.And([z3.Not(f.pre["cancel_requested"]) for f in c.firings
                   if f.family == "run" and f.transition.event == "agent_started" and f.pre is not None])


def _timeouts_close(e: SysEnc, c: Case) -> Term:
    # Static per case: the declared edge either ends in CLOSED with a close or it does not.
    return z3.And([z3.BoolVal(f.transition.target is Conn.CLOSED and f.transition.close is not None)
                   for f in c.firings if f.family == "conn" and f.transition.event in TIMEOUT_EVENTS])


def _no_false_no_session(e: SysEnc, c: Case) -> Term:
    out = []
    pre = c.pre
    for f in c.firings:
        if f.family == "event" and f.transition.event == "no_session_timeout" and f.transition.target \
                is Delivery.ESCALATED and pre is not None:
            out.append(z3.Not(e.u.exists("S", lambda s, user=f.index[0], pre=pre: z3.And(
                e.u.owner(s) == user, e.live_session(pre, s), e.session_node_up(pre, s)), "rs")))
    return z3.And(out)


def _relay_within_poll_bound(e: SysEnc, c: Case) -> Term:
    if c.action != "tick" or c.pre is None or not e.multi:
        return z3.BoolVal(True)
    pre = c.pre
    return e.u.forall("U", lambda user: e.u.forall_node(lambda n: z3.Not(
        z3.And(z3.Select(pre["behind"], user, n), e.node_up(pre, n))), "rn"), "ru")


@dataclass(frozen=True)
class ZProperty:
    name: str
    state: Body | None
    step: StepBody | None
    lemmas: tuple[str, ...]
    why: str  # how the proof goes, for --explain


PROPERTIES: tuple[ZProperty, ...] = (
    ZProperty("no_message_before_ready", None, _handle_only_when_ready, (),
              "handle_frame and handle_invalid are declared only from READY with guard ack_sent: every case of "
              "Next that fires one "
              "starts from READY with the ack sent. Inductive without lemmas."),
    ZProperty("ready_before_ack", _ack_only_when_ready, _ack_from_ready, ("ack_only_when_ready",),
              "send_ack is declared only from READY; the state part (ack_sent only in READY/DRAINING/CLOSED) "
              "is inductive on its own: nothing re-enters OPEN or INITIALISING."),
    ZProperty("every_event_acked_or_escalated", _eae_state, None,
              ("acked_was_delivered", "attempts_in_range", "clocks_in_range", "age_accounts_for_time",
               "lease_holder_acts", "some_node_up"),
              "Safety part by induction: ACKED => delivered (only a SENT or late-acked delivered event takes ack); "
              "a live event can always move (PENDING: send with a live session, else tick or no_session_timeout; "
              "SENT: tick or ack_timeout; send_failed counts only beside send); "
              "age <= idle + (attempt-1)*ack_timeout + waited <= resume_window + max_attempts*ack_timeout = "
              "horizon. Liveness part (every event terminal within the horizon) by BMC on each scenario."),
    ZProperty("acked_never_resent", None, _never_resent, (),
              "send is declared only from PENDING; no lemma needed."),
    ZProperty("monotonic_event_state", None, _monotonic, (),
              "No declared delivery transition leaves ACKED or ESCALATED or goes down in rank; cumulative acks and "
              "ticks skip terminal events."),
    ZProperty("attempts_bounded", _attempts_bounded_state, None, ("attempts_in_range",),
              "attempt <= max_attempts is not inductive alone (send_failed's escalation has no upper guard): "
              "strengthened with 'PENDING => attempt < max_attempts'."),
    ZProperty("one_context_per_user", _one_context_state, None,
              ("one_instance", "attached_holds_live_epoch", "attached_has_slot", "slot_holder_is_attached",
               "conns_within_limit"),
              "create fires only from ABSENT/EXPIRED (instances 0 -> 1). Epoch agreement needs 'no session is "
              "attached to a non-LIVE context', which needs expire's guard conns = 0 to mean 'no attached "
              "session': the slot bijection makes conns the exact count."),
    ZProperty("expired_context_never_reused", None, _new_epoch, (),
              "Every declared create bumps the epoch; attach is declared only from LIVE."),
    ZProperty("connection_limits_respected", _limits_state, None,
              ("conns_within_limit", "total_within_account", "attached_has_slot", "slot_holder_is_attached",
               "attached_holds_live_epoch"),
              "attach is guarded by conns < max_connections_per_user and !account_full; the account total is a "
              "ghost kept by each step's delta; 'the count matches the sockets' is the slot bijection."),
    ZProperty("no_cross_user_read", None, _own_stream_only, (),
              "Every send and ack case is guarded by route(session, user), which is owner(session) = user."),
    ZProperty("run_events_well_ordered", _well_ordered_state, None, ("stream_matches_run",),
              "The ordering over an unbounded stream is an automaton (EMPTY, IN, TOOL, DONE, BAD) read by every "
              "append; it never reaches BAD because its state is a function of the run's state (lemma), and "
              "each emitting run transition moves both consistently."),
    ZProperty("cancel_before_start_wins", None, _cancel_wins, (),
              "agent_started is declared with guard !cancel_requested."),
    ZProperty("timeouts_close_the_socket", None, _timeouts_close, (),
              "init_timeout and heartbeat_timeout are declared only into CLOSED, each with its close: every "
              "case of Next that fires one satisfies it. Inductive without lemmas."),
    ZProperty("one_live_owner", _one_live_owner_state, None, ("owner_is_the_lease",),
              "Two live owners would both be the node the store's lease names, so they are one node: every way "
              "to become owner (an append, an adoption) is a compare-and-set that needs the lease free or its "
              "holder dead, and a crash clears the dead node's ownership."),
    ZProperty("no_session_only_when_none_ready", None, _no_false_no_session, (),
              "The escalation case re-reads the sessions table: its has_session input is stated exactly (a READY, "
              "acked session of the user on a live node), and no_session_timeout is guarded by !has_session. "
              "Inductive without lemmas."),
    ZProperty("relay_within_poll_bound", None, _relay_within_poll_bound, (),
              "The tick is guarded by 'no relay is behind' (the poll is due before time passes). Inductive "
              "without lemmas."),
)
PROPERTY_BY_NAME = {p.name: p for p in PROPERTIES}


def invariant(e: SysEnc, st: St, names: tuple[str, ...] | None = None) -> Term:
    """Inv: the conjunction of the lemmas (all, or ``names``)."""
    chosen = LEMMAS if names is None else tuple(LEMMA_BY_NAME[n] for n in names)
    return z3.And([lem.body(e, st) for lem in chosen])


def closure(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` and every lemma they (transitively) need, in declaration order."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(LEMMA_BY_NAME[n].needs)
    return tuple(lem.name for lem in LEMMAS if lem.name in seen)
