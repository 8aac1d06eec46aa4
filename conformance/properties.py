"""The properties the kit reports on, one row each (docs/conformance.md, "Properties").

The model's invariants (model/invariants.py) keep their names; the kit adds the wire-level rules
of the protocol that no single machine states: the close-code table, specific auth errors, no
1011, the declared timeouts honoured, isolation over HTTP. Every :class:`Violation` names one of
these, so a summary per property can be printed and written as JUnit test cases.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeproof.model.invariants import INVARIANTS


@dataclass(frozen=True)
class Property:
    name: str
    section: str  # PROTOCOL section
    doc: str
    source: str  # "model" (an invariant of model/invariants.py) or "wire" (a protocol rule)


_MODEL_SECTIONS = {"connection": "1", "context": "3", "delivery": "5", "run": "4", "system": "3"}

_WIRE: tuple[Property, ...] = (
    Property("model_transition", "1-5",
             "Every observation is a transition some machine allows from its current state.", "wire"),
    Property("close_codes_documented", "close codes",
             "Every close is a row of the close-code table, with the code the model's transition emits.", "wire"),
    Property("no_1011", "1", "Close code 1011 is never used.", "wire"),
    Property("auth_errors_specific", "2",
             "Each bad token is refused with its own code (the section-2 code as the close reason), never acked.",
             "wire"),
    Property("timeouts_honoured", "1, 5",
             "init_timeout and ack_timeout fire no earlier than declared and within the tolerance.", "wire"),
    Property("frames_valid", "Transport", "Every server frame is JSON with a type and matches its schema.", "wire"),
    Property("seq_gap_free", "5",
             "A context's seqs are 1, 2, 3, ... with no gap: GET /v1/events lists every one in order.", "wire"),
    Property("replies_answer_requests", "1, 4",
             "Each handled frame gets the reply the protocol names (run.accepted/error with the request_id, "
             "error invalid_message), in arrival order.", "wire"),
)

PROPERTIES: dict[str, Property] = {
    **{i.name: Property(i.name, _MODEL_SECTIONS.get(i.machine, "?"), i.doc, "model") for i in INVARIANTS},
    **{p.name: p for p in _WIRE},
}
"""Every property by name: the model's invariants, then the wire rules."""


__all__ = ["PROPERTIES", "Property"]
