"""The properties pipeproof checks, each a named, documented predicate (docs/model.md, "invariants").

Two shapes:
- a *state* invariant looks at one global state;
- a *step* invariant looks at one step (the component transitions it fired, with their before
  and after configurations). "Nothing is handled before READY" is naturally a statement about
  steps: no ``handle_frame`` ever fires from a state other than READY.
Each predicate returns the list of violations it found (empty: it holds), each a sentence that
names the component and what is wrong, so a counterexample reads on its own.

``every_event_acked_or_escalated`` is a liveness property checked in its bounded form: an ACKED
event was really received; no live event is stuck (some delivery transition is enabled for it);
no live event is older than ``max_attempts * ack_timeout + resume_window`` ticks of model time;
and, for the explorer, every event is terminal in a quiescent state (no action enabled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeproof.model.connection import ACK_SENT, ATTACHED, HANDLE_EVENTS, TIMEOUT_EVENTS, Conn
from pipeproof.model.context import CONNS, EPOCH, Ctx
from pipeproof.model.delivery import ATTEMPT, RANK, Delivery
from pipeproof.model.run import CANCEL_REQUESTED, TERMINAL_EVENTS
from pipeproof.model.system import State, Step, System
from pipeproof.protocol import Property


@dataclass(frozen=True)
class Invariant:
    name: str
    machine: str  # the machine it is about, for the check table ("system" if several)
    doc: str
    state_check: Callable[[System, State], list[str]] | None = None
    step_check: Callable[[System, Step, State], list[str]] | None = None


def _no_message_before_ready_step(system: System, step: Step, before: State) -> list[str]:
    return [
        f"session s{f.index[0]} handled a frame in {f.before[0].name} (ack_sent={f.before[1][ACK_SENT]})"
        for f in step.firings
        if f.family == "conn" and f.transition.event in HANDLE_EVENTS
        and not (f.before[0] is Conn.READY and f.before[1][ACK_SENT])
    ]


def _ready_before_ack_state(system: System, state: State) -> list[str]:
    return [
        f"session s{s} sent connection_ack while {cfg[0].name}"
        for s, cfg in enumerate(state.conns)
        if cfg[1][ACK_SENT] and cfg[0] not in (Conn.READY, Conn.DRAINING, Conn.CLOSED)
    ]


def _ready_before_ack_step(system: System, step: Step, before: State) -> list[str]:
    return [
        f"session s{f.index[0]} sent connection_ack from {f.before[0].name}, before READY"
        for f in step.firings
        if f.family == "conn" and f.transition.event == "send_ack" and f.before[0] is not Conn.READY
    ]


def _events(system: System, state: State) -> list[tuple[int, int, tuple]]:  # type: ignore[type-arg]
    return [(u, i + 1, cfg) for u, stream in enumerate(state.events) for i, cfg in enumerate(stream)]


def _every_event_acked_or_escalated_state(system: System, state: State) -> list[str]:
    d = system.model.delivery
    horizon = int(d.params["horizon"])
    out: list[str] = []
    for u, seq, cfg in _events(system, state):
        st, (_attempt, _w, _i, age, delivered) = cfg
        if st is Delivery.ACKED and not delivered:
            out.append(f"event u{u}#{seq} is ACKED but was never delivered (a send failure was swallowed)")
        if st in d.terminal:
            continue
        if age > horizon:
            out.append(f"event u{u}#{seq} still {st.name} after {age} ticks (horizon {horizon})")
        if not _can_progress(system, state, u, cfg):
            why = "" if system.can_decide(state, u) else " (no live node owns its delivery and none can adopt it)"
            out.append(f"event u{u}#{seq} is stuck in {d.describe(cfg)}: no send, timeout or tick can move it{why}")
    return out


def _can_progress(system: System, state: State, u: int, cfg: tuple) -> bool:  # type: ignore[type-arg]
    """Some step the *system* offers moves the event. ``send_failed`` is no progress of its own:
    the system offers it only beside ``send`` on a live session (a write that may fail), so
    counting its guard alone would excuse an event that nothing can ever touch. A send or a
    timeout is the delivery owner's decision (docs/model.md, "nodes"): it counts only while a
    live node owns the context or one can adopt it now; time passes without an owner."""
    d = system.model.delivery
    has = system.has_session(state, u)
    if d.enabled(cfg, "tick", {"has_session": has}):
        return True
    if not system.can_decide(state, u):
        return False
    for event in ("ack_timeout", "no_session_timeout"):
        if d.enabled(cfg, event, {"has_session": has}):
            return True
    return has and bool(d.enabled(cfg, "send"))


def quiescent_violations(system: System, state: State) -> list[str]:
    """At quiescence (no action enabled) every event must be ACKED or ESCALATED."""
    return [
        f"quiescent with event u{u}#{seq} in {cfg[0].name}"
        for u, seq, cfg in _events(system, state)
        if cfg[0] not in system.model.delivery.terminal
    ]


def _acked_never_resent_step(system: System, step: Step, before: State) -> list[str]:
    return [
        f"event u{f.index[0]}#{f.index[1]} was sent again while {f.before[0].name}"
        for f in step.firings
        if f.family == "event" and f.transition.event == "send" and f.before[0] in system.model.delivery.terminal
    ]


def _monotonic_event_state_step(system: System, step: Step, before: State) -> list[str]:
    out = []
    for f in step.firings:
        if f.family != "event":
            continue
        src, dst = Delivery(f.before[0].value), Delivery(f.after[0].value)
        if RANK[dst] < RANK[src] or (src in system.model.delivery.terminal and dst is not src):
            out.append(f"event u{f.index[0]}#{f.index[1]} moved backwards {src.name} -> {dst.name}")
    return out


def _attempts_bounded_state(system: System, state: State) -> list[str]:
    cap = int(system.model.delivery.params["max_attempts"])
    return [
        f"event u{u}#{seq} has attempt {cfg[1][ATTEMPT]} > max_attempts {cap}"
        for u, seq, cfg in _events(system, state)
        if cfg[1][ATTEMPT] > cap
    ]


def _one_context_per_user_state(system: System, state: State) -> list[str]:
    out = []
    for u, ctx in enumerate(state.ctxs):
        st, (epoch, _conns, instances) = ctx
        if instances > 1:
            out.append(f"user u{u} has {instances} live contexts")
        if (st is Ctx.LIVE) != (instances == 1):
            out.append(f"user u{u}: context {st.name} with {instances} live instances")
        for s in system.sessions_of(u):
            if state.conns[s][0] in ATTACHED and state.epoch_seen[s] != epoch:
                out.append(f"session s{s} holds context epoch {state.epoch_seen[s]} but user u{u}'s is {epoch}")
    return out


def _expired_context_never_reused_step(system: System, step: Step, before: State) -> list[str]:
    out = []
    for f in step.firings:
        if f.family != "ctx" or f.transition.event not in ("create", "attach"):
            continue
        if f.before[0] is Ctx.LIVE and f.transition.event == "attach":
            continue
        if f.after[1][EPOCH] <= f.before[1][EPOCH]:
            out.append(f"user u{f.index[0]}: context handed out from {f.before[0].name} without a new epoch")
    return out


def _connection_limits_state(system: System, state: State) -> list[str]:
    b = system.bounds
    out = []
    total = 0
    for u, ctx in enumerate(state.ctxs):
        conns = ctx[1][CONNS]
        total += conns
        attached = sum(1 for s in system.sessions_of(u) if state.conns[s][0] in ATTACHED)
        if conns > b.max_connections_per_user:
            out.append(f"user u{u} has {conns} connections > {b.max_connections_per_user}")
        if conns != attached:
            out.append(f"user u{u}: registry counts {conns} connections, {attached} sockets are attached")
    if total > b.max_connections_per_account:
        out.append(f"account has {total} connections > {b.max_connections_per_account}")
    return out


def _no_cross_user_read_step(system: System, step: Step, before: State) -> list[str]:
    out = []
    sessions = [f.index[0] for f in step.firings if f.family == "conn"]
    if step.action == "client_ack":
        sessions.append(step.args[0])
    for f in step.firings:
        if f.family != "event" or f.transition.event == "append":
            continue
        for s in sessions:
            if system.owner(s) != f.index[0]:
                out.append(
                    f"session s{s} of user u{system.owner(s)} touched event u{f.index[0]}#{f.index[1]}"
                    f" ({f.transition.event})"
                )
    return out


def well_ordered(kinds: tuple[str, ...]) -> str:
    """Why a run's event sequence breaks section 4's ordering, or '' when it is well ordered."""
    if not kinds:
        return ""
    if kinds[0] != "agent_started" and kinds != ("agent_failed",):
        return f"first event is {kinds[0]}, not agent_started"
    open_tool = False
    for i, k in enumerate(kinds):
        if i > 0 and kinds[i - 1] in TERMINAL_EVENTS:
            return f"{k} after terminal {kinds[i - 1]}"
        if k == "agent_started" and i > 0:
            return "agent_started twice"
        if k == "tool_executing":
            if open_tool:
                return "tool_executing while a tool is open"
            open_tool = True
        elif k == "tool_completed":
            if not open_tool:
                return "tool_completed without tool_executing"
            open_tool = False
        elif k in TERMINAL_EVENTS and open_tool:
            return f"{k} while a tool is still executing"
    return ""


def _run_events_well_ordered_state(system: System, state: State) -> list[str]:
    out = []
    for u, kinds in enumerate(state.kinds):
        why = well_ordered(kinds)
        if why:
            out.append(f"user u{u}'s run stream {list(kinds)}: {why}")
    return out


def _cancel_before_start_wins_step(system: System, step: Step, before: State) -> list[str]:
    return [
        f"user u{f.index[0]}'s run started although a cancel had arrived"
        for f in step.firings
        if f.family == "run" and f.transition.event == "agent_started" and f.before[1][CANCEL_REQUESTED]
    ]


def _timeouts_close_the_socket_step(system: System, step: Step, before: State) -> list[str]:
    return [
        f"session s{f.index[0]}: {f.transition.event} fired in {f.before[0].name} and left it {f.after[0].name}"
        + ("" if f.transition.close is None else f" ({f.transition.close})")
        + ": the timeout was swallowed"
        for f in step.firings
        if f.family == "conn" and f.transition.event in TIMEOUT_EVENTS
        and (f.after[0] is not Conn.CLOSED or f.transition.close is None)
    ]


def _one_live_owner_state(system: System, state: State) -> list[str]:
    out = []
    for what, masks in (("delivery", state.holds), ("run", state.run_holds)):
        for u, mask in enumerate(masks):
            live = [n for n, up in enumerate(state.up) if up and mask >> n & 1]
            if len(live) > 1:
                out.append(f"user u{u}'s {what} is owned by {len(live)} live nodes "
                           + ", ".join(f"n{n}" for n in live) + f" (the store's lease names n{_lease(state, what, u)})")
    return out


def _lease(state: State, what: str, u: int) -> int:
    return state.lease[u] if what == "delivery" else state.run_lease[u]


def _no_session_only_when_none_ready_step(system: System, step: Step, before: State) -> list[str]:
    out = []
    for f in step.firings:
        if f.family != "event" or f.transition.event != "no_session_timeout" or f.after[0] is not Delivery.ESCALATED:
            continue
        if before is None:  # a machine alone (the per-machine Hypothesis test): no sessions to read
            continue
        u = f.index[0]
        ready = [s for s in system.sessions_of(u) if system.live_session(before, s)
                 and (system.bounds.nodes == 1 or before.up[system.node_of(s)])]
        if ready:
            out.append(f"event u{u}#{f.index[1]} escalated no_session while session s{ready[0]} of user u{u} is "
                       f"READY on live node n{system.node_of(ready[0])}")
    return out


def _relay_within_poll_bound_step(system: System, step: Step, before: State) -> list[str]:
    if step.action != "tick" or before is None:  # None: a machine alone, no relays
        return []
    n = system.bounds.nodes
    return [f"model time passed while relay n{k % n} had not read user u{k // n}'s SENT records"
            " (its write to the user's session is overdue: past the poll bound)"
            for k, lag in enumerate(before.behind) if lag and before.up[k % n]]


INVARIANTS: tuple[Invariant, ...] = (
    Invariant(Property.NO_MESSAGE_BEFORE_READY, "connection",
              "No client frame is handled unless its socket is READY and connection_ack has gone out.",
              step_check=_no_message_before_ready_step),
    Invariant(Property.READY_BEFORE_ACK, "connection",
              "connection_ack is sent only from READY: READY is set before the ack, never after.",
              state_check=_ready_before_ack_state, step_check=_ready_before_ack_step),
    Invariant(Property.EVERY_EVENT_ACKED_OR_ESCALATED, "delivery",
              "Every event ends ACKED (after it was really delivered) or ESCALATED, within "
              "max_attempts x ack_timeout + resume_window of model time; none is ever stuck.",
              state_check=_every_event_acked_or_escalated_state),
    Invariant(Property.ACKED_NEVER_RESENT, "delivery", "An ACKED (or ESCALATED) event is never sent again.",
              step_check=_acked_never_resent_step),
    Invariant(Property.MONOTONIC_EVENT_STATE, "delivery",
              "An event only moves forward: PENDING/SENT, then ACKED or ESCALATED, never back.",
              step_check=_monotonic_event_state_step),
    Invariant(Property.ATTEMPTS_BOUNDED, "delivery", "No event is written more than max_attempts times.",
              state_check=_attempts_bounded_state),
    Invariant(Property.ONE_CONTEXT_PER_USER, "context",
              "At most one live context per user, and every attached socket holds that context's epoch.",
              state_check=_one_context_per_user_state),
    Invariant(Property.EXPIRED_CONTEXT_NEVER_REUSED, "context",
              "A context is handed out only while LIVE or by a create that starts a new epoch.",
              step_check=_expired_context_never_reused_step),
    Invariant(Property.CONNECTION_LIMITS_RESPECTED, "context",
              "Per-user and per-account connection limits hold and the registry's count matches the sockets.",
              state_check=_connection_limits_state),
    Invariant(Property.NO_CROSS_USER_READ, "system",
              "A session only reads or acks events of its own user's stream.",
              step_check=_no_cross_user_read_step),
    Invariant(Property.RUN_EVENTS_WELL_ORDERED, "run",
              "agent_started first; tool_executing/tool_completed paired; exactly one terminal; nothing after it.",
              state_check=_run_events_well_ordered_state),
    Invariant(Property.CANCEL_BEFORE_START_WINS, "run",
              "A run.cancel that arrives before the run starts prevents agent_started.",
              step_check=_cancel_before_start_wins_step),
    Invariant(Property.TIMEOUTS_CLOSE_THE_SOCKET, "connection",
              "A connection timeout (init, heartbeat) is never swallowed: it closes the socket with its "
              "documented close code.",
              step_check=_timeouts_close_the_socket_step),
    Invariant(Property.ONE_LIVE_OWNER, "system",
              "At most one live node acts as a context's delivery owner, and at most one as a run's holder.",
              state_check=_one_live_owner_state),
    Invariant(Property.NO_SESSION_ONLY_WHEN_NONE_READY, "delivery",
              "No event is escalated no_session while its user holds a READY session on any live node.",
              step_check=_no_session_only_when_none_ready_step),
    Invariant(Property.RELAY_WITHIN_POLL_BOUND, "system",
              "A relay writes the owner's SENT attempts to its sessions within the poll bound: model time "
              "never passes while a live relay has not read them.",
              step_check=_relay_within_poll_bound_step),
)

BY_NAME: dict[str, Invariant] = {i.name: i for i in INVARIANTS}
