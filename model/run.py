"""The agent run: started first, tools paired, exactly one terminal (docs/protocol.md section 4).

One machine per run. Transitions named after an agent event kind append that event to the
context's stream (see ``AGENT_EVENTS``). A cancel sets ``cancel_requested``; ``agent_started`` is
guarded on it being false, so a cancel that arrives before the run starts always wins, and the run
then ends with a single ``agent_failed`` (code ``cancelled``). ``steps`` bounds thinking and tool
calls so the machine is finite for the explorer; the server has no such bound.
"""

from __future__ import annotations

from pipeproof.model.expr import TRUE, Param, Var
from pipeproof.model.spec import Kind, Machine, Transition, VarDecl
from pipeproof.protocol import TERMINAL_KINDS, Append, EventKind, FastEnum, FrameType, Property, Send


class Run(FastEnum):
    REQUESTED = "REQUESTED"
    ACCEPTED = "ACCEPTED"
    RUNNING = "RUNNING"
    TOOL_RUNNING = "TOOL_RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"


AGENT_EVENTS: tuple[str, ...] = tuple(k.value for k in EventKind)
"""The run events that append an agent event of the same name (section 4)."""
TERMINAL_EVENTS: frozenset[str] = frozenset(k.value for k in TERMINAL_KINDS)

cancel_requested, steps = Var("cancel_requested"), Var("steps")
max_steps = Param("max_steps")

RQ, AC, RN, TR = Run.REQUESTED, Run.ACCEPTED, Run.RUNNING, Run.TOOL_RUNNING
CO, FA, RJ = Run.COMPLETED, Run.FAILED, Run.REJECTED
REWO = Property.RUN_EVENTS_WELL_ORDERED
CBSW = Property.CANCEL_BEFORE_START_WINS

_CANCEL = (("cancel_requested", TRUE),)

TRANSITIONS: tuple[Transition, ...] = (
    Transition("validate_ok", RQ, AC, emits=Send(FrameType.RUN_ACCEPTED),
               doc="prerequisites hold (context, tools, input, quota, memory)"),
    Transition("validate_fail", RQ, RJ, kind=Kind.ERROR, emits=Send(FrameType.ERROR),
               doc="a prerequisite failed: typed error, nothing starts"),
    Transition("cancel", AC, AC, guard=~cancel_requested, updates=_CANCEL, doc="cancel before start",
               invariants=(CBSW,)),
    Transition("cancel", RN, RN, guard=~cancel_requested, updates=_CANCEL),
    Transition("cancel", TR, TR, guard=~cancel_requested, updates=_CANCEL),
    Transition("agent_started", AC, RN, guard=~cancel_requested, emits=Append(EventKind.AGENT_STARTED),
               invariants=(REWO, CBSW)),
    Transition("agent_failed", AC, FA, guard=cancel_requested, kind=Kind.ERROR, emits=Append(EventKind.AGENT_FAILED),
               doc="a cancel that arrived before start ends the run: code cancelled", invariants=(CBSW, REWO)),
    Transition("agent_thinking", RN, RN, guard=steps < max_steps, updates=(("steps", steps + 1),),
               emits=Append(EventKind.AGENT_THINKING), invariants=(REWO,)),
    Transition("tool_executing", RN, TR, guard=steps < max_steps, updates=(("steps", steps + 1),),
               emits=Append(EventKind.TOOL_EXECUTING), invariants=(REWO,)),
    Transition("tool_completed", TR, RN, emits=Append(EventKind.TOOL_COMPLETED),
               doc="ok or not: a tool's failure is tool_completed ok=false", invariants=(REWO,)),
    Transition("agent_completed", RN, CO, emits=Append(EventKind.AGENT_COMPLETED), invariants=(REWO,)),
    Transition("agent_failed", RN, FA, kind=Kind.ERROR, emits=Append(EventKind.AGENT_FAILED),
               doc="crash (internal), tool_error, or an honoured cancel", invariants=(REWO,)),
)


def run_machine(max_steps: int = 2) -> Machine:
    return Machine(
        name="run",
        states=Run,
        initial=RQ,
        terminal=frozenset({CO, FA, RJ}),
        transitions=TRANSITIONS,
        variables=(
            VarDecl("cancel_requested", bool, False, doc="run.cancel was received"),
            VarDecl("steps", int, 0, doc="thinking and tool steps so far (bounded for exploration)"),
        ),
        params={"max_steps": max_steps},
        doc="Per run: REQUESTED -> ACCEPTED -> RUNNING <-> TOOL_RUNNING -> exactly one terminal.",
        section="4",
    )


RUN = run_machine()

# Positions of the variables in a configuration, derived from the declaration.
CANCEL_REQUESTED, STEPS = (RUN.slot(n) for n in ("cancel_requested", "steps"))
