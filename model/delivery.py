"""Event delivery: every event ends ACKED or ESCALATED (docs/protocol.md section 5).

One machine per event of a context's durable stream. Model time is discrete: the composed
system's ``tick`` advances every live event's clocks at once. Deadlines are urgent: ``tick`` is
only enabled while no deadline is due (``waited < ack_timeout`` in SENT; in PENDING, only while
no live session could take the event and the no-session budget is not spent), which encodes "the
server acts at the deadline" without a global scheduler. ``idle`` is a per-event budget of time
spent with no live session (``resume_window``); ``age`` saturates one past the liveness horizon
``max_attempts * ack_timeout + resume_window`` so a violation is visible and the space finite.
"""

from __future__ import annotations

from pipeproof.model.expr import TRUE, Input, Param, Var, capped_inc
from pipeproof.model.spec import Kind, Machine, Transition, VarDecl
from pipeproof.protocol import DeliveryState, Escalate, EscalationReason, FrameType, Property, Send

Delivery = DeliveryState
"""The machine's states are the protocol's delivery states (section 5): one enum for the model,
the store's CHECK constraint and the server."""

Reason = EscalationReason
"""Escalation reasons (section 5); each escalating transition emits one (``Escalate``)."""


RANK: dict[Delivery, int] = {Delivery.PENDING: 0, Delivery.SENT: 0, Delivery.ACKED: 1, Delivery.ESCALATED: 1}
"""Progress order for ``monotonic_event_state``: PENDING and SENT alternate on retries, terminal
states are above both and never left."""

attempt, waited, idle, age, delivered = (Var(n) for n in ("attempt", "waited", "idle", "age", "delivered"))
max_attempts, ack_timeout, resume_window, horizon = (
    Param(n) for n in ("max_attempts", "ack_timeout", "resume_window", "horizon")
)
has_session = Input("has_session")

P, S, A, E = Delivery.PENDING, Delivery.SENT, Delivery.ACKED, Delivery.ESCALATED
EAE = Property.EVERY_EVENT_ACKED_OR_ESCALATED
ANR = Property.ACKED_NEVER_RESENT
MES = Property.MONOTONIC_EVENT_STATE
AB = Property.ATTEMPTS_BOUNDED

# A terminal event keeps no timers: clearing them merges states that differ only in dead clocks.
_STOP_CLOCKS = (("waited", 0), ("idle", 0), ("age", 0))

TRANSITIONS: tuple[Transition, ...] = (
    Transition(
        "send", P, S, guard=attempt < max_attempts,
        updates=(("attempt", attempt + 1), ("waited", 0), ("delivered", TRUE)),
        emits=Send(FrameType.EVENT), doc="written to a READY session of the owner; attempt counts writes",
        invariants=(ANR, AB),
    ),
    Transition(
        "send_failed", P, P, guard=attempt + 1 < max_attempts, updates=(("attempt", attempt + 1),),
        kind=Kind.ERROR, doc="the write raised: counted, kept PENDING for the next session",
        invariants=(EAE, AB),
    ),
    Transition(
        "send_failed", P, E, guard=attempt + 1 >= max_attempts,
        updates=(("attempt", attempt + 1), *_STOP_CLOCKS),
        kind=Kind.ESCALATION, emits=Escalate(Reason.SEND_FAILED), invariants=(EAE, AB),
    ),
    Transition("ack", P, A, guard=delivered, updates=_STOP_CLOCKS,
               doc="a late ack for an earlier attempt still counts",
               invariants=(EAE, MES)),
    Transition("ack", S, A, guard=delivered, updates=_STOP_CLOCKS,
               doc="cumulative ack from any session of the user",
               invariants=(EAE, MES)),
    Transition(
        "ack_timeout", S, P, guard=(waited >= ack_timeout) & (attempt < max_attempts),
        kind=Kind.TIMEOUT, doc="no ack within ack_timeout: resend with attempt+1", invariants=(AB,),
    ),
    Transition(
        "ack_timeout", S, E, guard=(waited >= ack_timeout) & (attempt >= max_attempts),
        updates=_STOP_CLOCKS, kind=Kind.ESCALATION,
        emits=Escalate(Reason.MAX_ATTEMPTS), invariants=(EAE,),
    ),
    Transition(
        "no_session_timeout", P, E, guard=(idle >= resume_window) & ~has_session,
        updates=_STOP_CLOCKS, kind=Kind.ESCALATION,
        emits=Escalate(Reason.NO_SESSION), invariants=(EAE,),
    ),
    Transition(
        "tick", P, P, guard=~has_session & (idle < resume_window),
        updates=(("idle", idle + 1), ("age", capped_inc("age", horizon + 1))),
        kind=Kind.HOUSEKEEPING, doc="time passes with no live session to take the event",
    ),
    Transition(
        "tick", S, S, guard=waited < ack_timeout,
        updates=(("waited", waited + 1), ("age", capped_inc("age", horizon + 1))),
        kind=Kind.HOUSEKEEPING, doc="time passes while the ack is awaited",
    ),
)


def delivery_machine(max_attempts: int = 2, ack_timeout: int = 1, resume_window: int = 1) -> Machine:
    """The delivery machine at the given bounds; ``horizon`` is derived, never set by hand."""
    return Machine(
        name="delivery",
        states=Delivery,
        initial=P,
        terminal=frozenset({A, E}),
        transitions=TRANSITIONS,
        variables=(
            VarDecl("attempt", int, 0, doc="writes so far (sends and failed sends)"),
            VarDecl("waited", int, 0, doc="ticks since the last send"),
            VarDecl("idle", int, 0, doc="ticks spent PENDING with no live session (budget)"),
            VarDecl("age", int, 0, doc="ticks since the event was appended (saturating)"),
            VarDecl("delivered", bool, False, doc="the client has received the frame at least once"),
        ),
        params={
            "max_attempts": max_attempts,
            "ack_timeout": ack_timeout,
            "resume_window": resume_window,
            "horizon": max_attempts * ack_timeout + resume_window,
        },
        inputs={"has_session": bool},
        doc="Per event: PENDING -> SENT -> (ACKED | ESCALATED), with retries back to PENDING.",
        section="5",
    )


DELIVERY = delivery_machine()

# Positions of the variables in a configuration, derived from the declaration.
ATTEMPT, WAITED, IDLE, AGE, DELIVERED = (
    DELIVERY.slot(n) for n in ("attempt", "waited", "idle", "age", "delivered"))
