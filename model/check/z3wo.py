"""The well-ordering automaton of a run's event stream, for Z3 (docs/protocol.md section 4;
docs/proofs.md, "ghost state").

The explorer checks ``invariants.well_ordered`` on the whole stream; the Z3 encoding carries this
automaton's state per user instead (a ghost: a total function of the stream), and
tests/model/test_z3system.py checks that the two agree on every short stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import z3

from pipeproof.model.check.z3enc import Term, enum_sort
from pipeproof.model.run import AGENT_EVENTS

WO_STATES = ("EMPTY", "IN", "TOOL", "DONE", "BAD")
"""EMPTY: nothing emitted; IN: started, no tool open; TOOL: a tool is executing; DONE: a terminal
event was emitted; BAD: the stream broke section 4's ordering (``invariants.well_ordered``)."""


def wo_step(q: str, kind: str) -> str:
    """The automaton reading one more agent event; ``wo_run(kinds) == 'BAD'`` exactly when
    ``invariants.well_ordered(kinds)`` names a problem (tests/model/test_z3system.py checks it)."""
    if q in ("BAD", "DONE"):
        return "BAD"  # nothing follows a terminal event
    if q == "EMPTY":
        return {"agent_started": "IN", "agent_failed": "DONE"}.get(kind, "BAD")
    if kind == "agent_started":
        return "BAD"
    if q == "IN":
        return {"agent_thinking": "IN", "tool_executing": "TOOL", "agent_completed": "DONE",
                "agent_failed": "DONE"}.get(kind, "BAD")
    # TOOL: thinking may interleave; the tool must complete before anything terminal.
    return {"agent_thinking": "TOOL", "tool_completed": "IN"}.get(kind, "BAD")


def wo_run(kinds: Sequence[str]) -> str:
    q = "EMPTY"
    for k in kinds:
        q = wo_step(q, k)
    return q


KIND = enum_sort("Kind", AGENT_EVENTS)
WO = enum_sort("WellOrder", WO_STATES)



def wo_next(wo: Term, kind: str) -> Term:
    out = WO[wo_step("BAD", kind)]
    for q in WO_STATES:
        out = z3.If(wo == WO[q], WO[wo_step(q, kind)], out)
    return out


