"""The black-box conformance kit (docs/conformance.md; PROTOCOL sections 1-6).

Two ways to hold a server to the model that was proven:

* live (:mod:`pipeproof.conformance.kit`): a Hypothesis state machine whose rules are client
  actions over real WebSockets and HTTP; after every step the observations must be a behaviour
  the model's machines allow from their current state (:mod:`pipeproof.conformance.oracle`);
* from its logs (:mod:`pipeproof.conformance.tracecheck`): a JSONL audit log replayed through the
  machines, plus the cross-machine invariants a log can show.

Both report violations as :class:`~pipeproof.conformance.errors.Violation`, named by the property
they break (:mod:`pipeproof.conformance.properties`).
"""

from __future__ import annotations

from .errors import KitError, TraceUnreadable, Violation
from .properties import PROPERTIES, Property

__all__ = ["PROPERTIES", "KitError", "Property", "TraceUnreadable", "Violation"]
