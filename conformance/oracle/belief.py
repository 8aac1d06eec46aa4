"""Beliefs: the set of configurations a machine instance may be in (docs/conformance.md).

Every instance the kit tracks is a belief closed under its hidden events; an observation no
configuration explains is a violation.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pipeproof.model.spec import Config, Machine
from pipeproof.protocol import AuthCode, CloseReason

AUTH_REASONS: frozenset[str] = frozenset(AuthCode)
# The server's closes for overload or a failing dependency: allowed only when the run tolerates them.
_OVERLOAD_EVENTS = frozenset({"unavailable", "slow_consumer"})
_INIT_TIMEOUT, _HEARTBEAT, _LIMIT = (r.describe() for r in (
    CloseReason.INIT_TIMEOUT, CloseReason.HEARTBEAT_TIMEOUT, CloseReason.CONNECTION_LIMIT))
_CLOSE_BOUND = 20_000  # belief elements; far above what the kit's bounded actions produce



def _allowed(machine: Machine, configs: Iterable[Config], inputs: Iterable[Mapping[str, Any]] = ({},)) -> list[str]:
    """The events enabled from any of ``configs``, with what each emits (for violation reports)."""
    out: dict[str, None] = {}
    ins = list(inputs)
    for c in configs:
        for i in ins:
            for t, _ in machine.fire_all(c, None, i):
                out.setdefault(f"{t.event} from {c[0].name} -> {t.target.name}" + (f" [{t.emits}]" if t.emits else ""))
    return sorted(out)[:16]


class Belief:
    """The configurations a machine instance may be in (see module docstring)."""

    def __init__(
        self, machine: Machine, hidden: Iterable[str] = (), inputs: Iterable[Mapping[str, Any]] = ({},)
    ) -> None:
        self.machine = machine
        self.configs: set[Config] = {machine.initial_config()}
        self.hidden = set(hidden)
        self.inputs = [dict(i) for i in inputs]

    def closure(self) -> set[Config]:
        seen = set(self.configs)
        todo = list(seen)
        while todo and len(seen) < _CLOSE_BOUND:
            c = todo.pop()
            for event in self.hidden:
                for i in self.inputs:
                    for _, after in self.machine.fire_all(c, event, i):
                        if after not in seen:
                            seen.add(after)
                            todo.append(after)
        return seen

    def fire(self, event: str, require: Callable[[Config], bool] | None = None) -> set[Config]:
        """Fire an observed ``event`` from the closure; returns the new belief (empty: not allowed)."""
        out: set[Config] = set()
        for c in self.closure():
            for i in self.inputs:
                for _, after in self.machine.fire_all(c, event, i):
                    if require is None or require(after):
                        out.add(after)
        return out

    def allowed(self) -> list[str]:
        return _allowed(self.machine, self.closure(), self.inputs)

    def states(self) -> str:
        return ", ".join(sorted({self.machine.describe(c) for c in self.configs}))[:300]



def state_names(states: Iterable[enum.Enum]) -> str:
    return ", ".join(sorted(s.name for s in states))
