"""What the diagrams are drawn from: the model, its invariants, its mutants and its scenarios.

A :class:`Source` is the single input of every generator in this package. The default is the
project's model (model/system.py ``reference_model``, model/invariants.py ``INVARIANTS``,
model/mutants.py ``MUTANTS``, model/scenarios.py ``DEFAULT_SCENARIOS``); tests pass a changed
copy (for example a machine with one more transition, made with ``model.mutants.add``) to show
that the drift check notices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pipeproof.model.invariants import INVARIANTS, Invariant
from pipeproof.model.mutants import MUTANTS, Mutant
from pipeproof.model.scenarios import DEFAULT_SCENARIOS, Scenario
from pipeproof.model.spec import Machine
from pipeproof.model.system import Bounds, SystemModel, reference_model

DRAWING_BOUNDS = Bounds()
"""The bounds whose parameter values the machine diagrams print (the explorer's defaults)."""

FAMILY_MACHINE: dict[str, str] = {"conn": "connection", "ctx": "context", "event": "delivery", "run": "run"}
"""System firing family (model/system.py ``Firing.family``) -> machine name."""

MACHINE_ORDER: tuple[str, ...] = ("connection", "context", "delivery", "run")
"""Machines in protocol order (sections 1, 3, 5, 4 of docs/protocol.md: how a session unfolds)."""


@dataclass(frozen=True)
class Source:
    """Everything a generator reads. ``model`` maps bounds to the composed model (a changed model
    is passed in as a function, because the machines' parameters depend on the bounds)."""

    model: Callable[[Bounds], SystemModel] = reference_model
    invariants: tuple[Invariant, ...] = INVARIANTS
    mutants: tuple[Mutant, ...] = MUTANTS
    scenarios: tuple[Scenario, ...] = DEFAULT_SCENARIOS
    bounds: Bounds = field(default=DRAWING_BOUNDS)

    def machines(self) -> tuple[Machine, ...]:
        """The four machines at the drawing bounds, in :data:`MACHINE_ORDER`."""
        return machines_of(self.model(self.bounds))

    def mutant_model(self, mutant: Mutant, bounds: Bounds | None = None) -> SystemModel:
        b = bounds or self.bounds
        return mutant.model(b, self.model(b))


def machines_of(model: SystemModel) -> tuple[Machine, ...]:
    return (model.connection, model.context, model.delivery, model.run)


DEFAULT_SOURCE = Source()
