"""The context registry: one execution context per user (docs/protocol.md section 3).

One machine per user. ``create`` and ``attach`` are the two outcomes of one atomic
get-or-create: the composed system fires whichever is enabled in a single step, which is what a
per-user lock (or a database uniqueness constraint) buys. ``instances`` counts live context
objects, a ghost the invariant ``one_context_per_user`` reads; ``epoch`` names the incarnation,
bumped on every create so an expired context is never handed out again.
"""

from __future__ import annotations

from pipeproof.model.expr import Input, Param, Var
from pipeproof.model.spec import Kind, Machine, Transition, VarDecl
from pipeproof.protocol import Close, FastEnum, Property
from pipeproof.protocol import CloseReason as CR


class Ctx(FastEnum):
    ABSENT = "ABSENT"
    LIVE = "LIVE"
    EXPIRED = "EXPIRED"


epoch, conns, instances = Var("epoch"), Var("conns"), Var("instances")
max_user = Param("max_connections_per_user")
account_full = Input("account_full")

AB, LV, EX = Ctx.ABSENT, Ctx.LIVE, Ctx.EXPIRED
OCPU = Property.ONE_CONTEXT_PER_USER
ECNR = Property.EXPIRED_CONTEXT_NEVER_REUSED
LIM = Property.CONNECTION_LIMITS_RESPECTED

_CREATE = (("epoch", epoch + 1), ("conns", 1), ("instances", instances + 1))

TRANSITIONS: tuple[Transition, ...] = (
    Transition("create", AB, LV, guard=~account_full, updates=_CREATE,
               doc="get-or-create found none: a new context, epoch+1", invariants=(OCPU,)),
    Transition("create", EX, LV, guard=~account_full, updates=_CREATE,
               doc="the old context expired: a new one with a new epoch", invariants=(OCPU, ECNR)),
    Transition("attach", LV, LV, guard=(conns < max_user) & ~account_full, updates=(("conns", conns + 1),),
               doc="get-or-create found the live context", invariants=(OCPU, LIM)),
    Transition("reject_limit", LV, LV, guard=(conns >= max_user) | account_full, kind=Kind.ERROR,
               emits=Close(CR.CONNECTION_LIMIT), invariants=(LIM,)),
    Transition("reject_limit", AB, AB, guard=account_full, kind=Kind.ERROR, emits=Close(CR.CONNECTION_LIMIT),
               invariants=(LIM,)),
    Transition("reject_limit", EX, EX, guard=account_full, kind=Kind.ERROR, emits=Close(CR.CONNECTION_LIMIT),
               invariants=(LIM,)),
    Transition("detach", LV, LV, guard=conns > 0, updates=(("conns", conns - 1),), kind=Kind.HOUSEKEEPING,
               doc="a READY or DRAINING socket closed"),
    Transition("expire", LV, EX, guard=conns.eq(0), updates=(("instances", instances - 1),),
               kind=Kind.TIMEOUT, doc="idle past context_ttl with no socket attached", invariants=(ECNR,)),
)


def context_machine(max_connections_per_user: int = 8) -> Machine:
    return Machine(
        name="context",
        states=Ctx,
        initial=AB,
        terminal=frozenset({AB, EX}),
        transitions=TRANSITIONS,
        variables=(
            VarDecl("epoch", int, 0, doc="incarnation; bumped by every create"),
            VarDecl("conns", int, 0, doc="attached sockets (READY or DRAINING)"),
            VarDecl("instances", int, 0, doc="live context objects for this user (ghost)"),
        ),
        params={"max_connections_per_user": max_connections_per_user},
        inputs={"account_full": bool},
        doc="Per user: ABSENT -> LIVE <-> (attach/detach) -> EXPIRED -> LIVE (new epoch).",
        section="3",
    )


CONTEXT = context_machine()

# Positions of the variables in a configuration, derived from the declaration.
EPOCH, CONNS, INSTANCES = (CONTEXT.slot(n) for n in ("epoch", "conns", "instances"))
