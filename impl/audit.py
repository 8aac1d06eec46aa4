"""The JSONL audit log: one line per state transition of every machine instance (DESIGN.md,
"trace-check"; PROTOCOL sections 1, 3, 5).

Line format (``pipeproof trace-check`` validates it against the model, so it is kept exactly)::

    {"ts": <unix float>, "machine": "connection"|"context"|"delivery"|"run",
     "id": "<session_id | context_id | context_id:seq | run_id>", "user": "<user or null>",
     "context_id": "<or null>", "event": "<model event>", "from": "<state>", "to": "<state>",
     "vars": {<the machine's variables after the transition>}, "detail": {<optional>}}

``detail`` carries what the model does not (close code and reason, the limit scope, the store
epoch...) and, under ``"inputs"``, the model inputs the event was fired with.

:class:`AuditWriter` is the only place that writes the log. :class:`TracedMachine` is the only way
the server fires a model event: it calls :meth:`pipeproof.model.spec.Runner.fire` and hands the
returned transition to the writer, so the log cannot miss a transition the server made.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Literal

from pipeproof.errors import IllegalTransition
from pipeproof.model.expr import Value
from pipeproof.model.spec import Machine, Runner, Transition

log = logging.getLogger("pipeproof.audit")

MachineName = Literal["connection", "context", "delivery", "run"]

TransitionListener = Callable[["TracedMachine", Transition], None]
"""Called after every successful fire (metrics gauges); must not raise."""


class AuditWriter:
    """Writes audit lines to a file (appended, flushed per line), stdout, or nowhere (``"off"``).

    Thread-safe: one lock serialises lines so concurrent writers never interleave bytes. A failed
    write raises ``OSError`` to the caller (the transition it records has happened; losing the
    record silently would defeat trace-check).
    """

    def __init__(self, target: Literal["stdout", "off"] | Path) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._stream: IO[str] | None
        self._owned = False
        if target == "off":
            self._stream = None
        elif target == "stdout":
            self._stream = sys.stdout
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._stream = target.open("a", encoding="utf-8")
            self._owned = True

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def record(
        self,
        machine: str,
        instance_id: str,
        transition: Transition,
        values: Mapping[str, Value],
        *,
        user: str | None,
        context_id: str | None,
        detail: Mapping[str, Any] | None = None,
        ts: float | None = None,
    ) -> dict[str, Any]:
        """Write one line for ``transition`` and return the record (tests read it back)."""
        line: dict[str, Any] = {
            "ts": time.time() if ts is None else ts,
            "machine": machine,
            "id": instance_id,
            "user": user,
            "context_id": context_id,
            "event": transition.event,
            "from": transition.source.name,
            "to": transition.target.name,
            "vars": dict(values),
            "detail": dict(detail) if detail else {},
        }
        if self._stream is not None:
            text = json.dumps(line, separators=(",", ":"), default=str)
            with self._lock:
                self._stream.write(text + "\n")
                self._stream.flush()
        return line

    def close(self) -> None:
        with self._lock:
            if self._owned and self._stream is not None:
                self._stream.close()
            self._stream = None


class TracedMachine:
    """One live machine instance (a socket, a context...) whose every transition is audited.

    ``fire`` raises :class:`~pipeproof.errors.IllegalTransition` exactly like ``Runner.fire``;
    nothing is written for a refused event (it did not happen), and the caller decides the
    documented close code.
    """

    def __init__(
        self,
        machine: Machine,
        name: MachineName,
        instance_id: str,
        audit: AuditWriter,
        *,
        user: str | None = None,
        context_id: str | None = None,
        listener: TransitionListener | None = None,
        runner: Runner | None = None,
    ) -> None:
        self.machine = machine
        self.name = name
        self.instance_id = instance_id
        # ``runner``: a Runner restored at a stored configuration, else a fresh one. The
        # declaration engine fires the machine's compiled transitions (~50x cheaper per transition
        # than python-statemachine, which costs ~0.5 ms per instance and fire) and refuses exactly
        # what the declaration refuses, so the audit log is the same line for line.
        self.runner = runner if runner is not None else Runner(machine, engine="declaration")
        self.audit = audit
        self.user = user
        self.context_id = context_id
        self._listener = listener

    @property
    def state(self) -> Any:
        return self.runner.state

    @property
    def values(self) -> Mapping[str, Value]:
        return self.runner.values

    def can(self, event: str, **inputs: Value) -> bool:
        return self.runner.can(event, **inputs)

    def fire(self, event: str, detail: Mapping[str, Any] | None = None, **inputs: Value) -> Transition:
        """Fire ``event`` through the Runner and record the transition (or raise)."""
        transition = self.runner.fire(event, **inputs)
        full = dict(detail or {})
        if inputs:
            # The model's inputs (e.g. account_full) are part of the step: trace-check replays them.
            full["inputs"] = dict(inputs)
        self.audit.record(
            self.name,
            self.instance_id,
            transition,
            self.runner.values,
            user=self.user,
            context_id=self.context_id,
            detail=full,
        )
        if self._listener is not None:
            self._listener(self, transition)
        return transition

    def is_terminal(self) -> bool:
        return self.runner.state in self.machine.terminal


__all__ = ["AuditWriter", "IllegalTransition", "MachineName", "TracedMachine", "TransitionListener"]
