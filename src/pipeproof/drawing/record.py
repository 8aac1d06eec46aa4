"""The verification record (``diagrams/verdicts.json``) and the model fingerprint (docs/diagrams.md).

Running every checker takes minutes (explorer, Hypothesis, Z3, the mutant matrix), far too long
for a drift check in CI. So ``pipeproof diagrams --refresh`` runs them once and stores what the
diagrams need as plain data: the verdict rows of ``model/check/checks.py`` without timings, the
explorer's transition coverage, one shortest counterexample per mutant and per failing check
(the structured steps of ``model/check/explorer.py``'s ``Counterexample.path``), the mutant matrix,
and a :func:`fingerprint` of the model they were computed from. Rendering reads the record;
``--check`` fails when the fingerprint no longer matches the model, so a changed transition
without a refresh is caught.

The fingerprint is SHA-256 over canonical JSON (sorted keys, no whitespace) of every machine's
declaration at every default scenario's bounds (states, initial, terminal, variables, parameters,
inputs, and each transition's event, source, target, rendered guard and updates and the
invariants it names), the system glue (the route function's qualified name), the invariant
names, each mutant's name, delta, property, scenario and the declarations it produces, and the
scenarios' bounds. Nothing in it depends on ``hash()`` (randomised per process), on memory
addresses or on dict iteration of unordered data. Documentation strings, colours (``Kind``) and
``emits`` are left out on purpose: they change the drawings (compared byte for byte anyway) but
not a verdict, so editing them must not demand a slow refresh.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeproof.drawing.source import FAMILY_MACHINE, Source, machines_of
from pipeproof.errors import PipeproofError
from pipeproof.model.expr import lift
from pipeproof.model.spec import Machine, Transition
from pipeproof.model.system import Bounds, Step, System, SystemModel

FORMAT = 1
RECORD_NAME = "verdicts.json"
REFRESH_HINT = "run pipeproof diagrams --refresh"
STALE_MESSAGE = f"the model changed since diagrams/{RECORD_NAME} was recorded: {REFRESH_HINT}"


class RecordError(PipeproofError):
    """The verification record is missing, unreadable or of another format."""


# -- fingerprint ----------------------------------------------------------------------------------


def transition_digest(t: Transition) -> dict[str, Any]:
    return {
        "event": t.event,
        "source": t.source.name,
        "target": t.target.name,
        "guard": t.guard.render(),
        "updates": [[n, lift(e).render()] for n, e in t.updates],
        "invariants": list(t.invariants),
    }


def machine_digest(m: Machine) -> dict[str, Any]:
    """The semantic content of a declaration as plain, ordered JSON data."""
    return {
        "name": m.name,
        "states": [s.name for s in m.states],
        "initial": m.initial.name,
        "terminal": sorted(s.name for s in m.terminal),
        "variables": [[v.name, v.type.__name__, v.initial, v.lo] for v in m.variables],
        "params": sorted([k, v] for k, v in m.params.items()),
        "inputs": sorted([k, t.__name__] for k, t in m.inputs.items()),
        "transitions": [transition_digest(t) for t in m.transitions],
    }


def model_digest(model: SystemModel) -> dict[str, Any]:
    route = model.route
    return {
        "machines": [machine_digest(m) for m in machines_of(model)],
        "route": f"{route.__module__}.{route.__qualname__}",
    }


def fingerprint_data(source: Source) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "scenarios": [
            {"name": sc.name, "bounds": asdict(sc.bounds), "model": model_digest(source.model(sc.bounds))}
            for sc in source.scenarios
        ],
        "drawing_bounds": asdict(source.bounds),
        "invariants": [[i.name, i.machine] for i in source.invariants],
        "mutants": [
            {
                "name": m.name,
                "delta": m.delta,
                "prop": m.prop,
                "scenario": m.scenario,
                "model": model_digest(source.mutant_model(m, scenario_bounds(source, m.scenario))),
            }
            for m in source.mutants
        ],
    }


def canonical_json(data: object) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(source: Source) -> str:
    """``sha256:<hex>`` of the canonical JSON of :func:`fingerprint_data`."""
    return "sha256:" + hashlib.sha256(canonical_json(fingerprint_data(source)).encode()).hexdigest()


def scenario_bounds(source: Source, name: str) -> Bounds:
    """The bounds of the scenario ``name`` (the source's scenarios first, then the mutants' extras)."""
    for sc in source.scenarios:
        if sc.name == name:
            return sc.bounds
    from pipeproof.model.mutants import scenario

    return scenario(name).bounds


# -- plain-data traces -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FiringData:
    family: str
    index: list[int]
    machine: str
    key: str
    event: str
    source: str
    target: str
    kind: str
    emits: str
    before: str
    after: str


@dataclass(frozen=True)
class StepData:
    actor: str  # client | server | clock
    action: str
    args: list[int]
    text: str  # model/system.py describe_step
    firings: list[FiringData] = field(default_factory=list)


@dataclass(frozen=True)
class TraceData:
    """A counterexample as plain data: enough for a sequence diagram and a highlighted path."""

    prop: str
    message: str
    scenario: str
    checker: str
    steps: list[StepData]

    @staticmethod
    def from_json(d: dict[str, Any]) -> TraceData:
        steps = [
            StepData(s["actor"], s["action"], list(s["args"]), s["text"], [FiringData(**f) for f in s["firings"]])
            for s in d["steps"]
        ]
        return TraceData(d["prop"], d["message"], d["scenario"], d["checker"], steps)


def trace_from_path(system: System, prop: str, message: str, scenario: str, path: Sequence[Step]) -> TraceData:
    steps = []
    for step in path:
        firings = []
        for f in step.firings:
            m = system.machine(f.family)
            firings.append(FiringData(
                family=f.family, index=list(f.index), machine=FAMILY_MACHINE[f.family], key=f.transition.key,
                event=f.transition.event, source=f.transition.source.name, target=f.transition.target.name,
                kind=f.transition.kind.value, emits=str(f.transition.emits or ""),
                before=m.describe(f.before), after=m.describe(f.after),
            ))
        steps.append(StepData(step.actor, step.action, list(step.args), system.describe_step(step), firings))
    return TraceData(prop, message, scenario, "explorer", steps)


def trace_from_lines(prop: str, message: str, scenario: str, checker: str, lines: Sequence[str]) -> TraceData:
    """A trace known only as text (a Hypothesis or Z3 row): one server-side note per line."""
    return TraceData(prop, message, scenario, checker, [StepData("server", "", [], line) for line in lines])


# -- the record ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckRow:
    """One row of ``model/check/checks.py`` ``run_checks`` without its timing."""

    machine: str
    property: str
    method: str
    verdict: str
    states_or_examples: int
    detail: str = ""
    trace: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MatrixCell:
    """One cell of the mutant matrix: did ``checker`` catch ``mutant``, with how long a trace."""

    mutant: str
    checker: str  # explorer | hypothesis | z3
    caught: bool
    trace_length: int | None
    property: str
    detail: str = ""


@dataclass(frozen=True)
class MutantEntry:
    name: str
    seed: str
    delta: str
    prop: str
    scenario: str
    counterexample: TraceData | None


@dataclass(frozen=True)
class Record:
    fingerprint: str
    checks: list[CheckRow]
    coverage: dict[str, list[str]]
    failing: list[TraceData]  # counterexamples of failing checks on the real model
    mutants: list[MutantEntry]
    matrix: list[MatrixCell]
    matrix_source: str
    checkers: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "about": "Verification record for the diagrams; written by `pipeproof diagrams --refresh`, "
                     "do not edit. Checked against the model by `pipeproof diagrams --check`.",
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "checkers": self.checkers,
            "checks": [_drop_empty(asdict(r)) for r in self.checks],
            "coverage": {k: sorted(v) for k, v in sorted(self.coverage.items())},
            "failing": [asdict(t) for t in self.failing],
            "mutants": [asdict(m) for m in self.mutants],
            "matrix": {"source": self.matrix_source, "cells": [asdict(c) for c in self.matrix]},
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Record:
        if d.get("format") != FORMAT:
            raise RecordError(f"{RECORD_NAME} has format {d.get('format')!r}, expected {FORMAT}: {REFRESH_HINT}")
        try:
            return Record(
                fingerprint=d["fingerprint"],
                checks=[CheckRow(**r) for r in d["checks"]],
                coverage={k: list(v) for k, v in d["coverage"].items()},
                failing=[TraceData.from_json(t) for t in d["failing"]],
                mutants=[
                    MutantEntry(m["name"], m["seed"], m["delta"], m["prop"], m["scenario"],
                                TraceData.from_json(m["counterexample"]) if m["counterexample"] else None)
                    for m in d["mutants"]
                ],
                matrix=[MatrixCell(**c) for c in d["matrix"]["cells"]],
                matrix_source=d["matrix"]["source"],
                checkers=list(d["checkers"]),
            )
        except (KeyError, TypeError) as exc:
            raise RecordError(f"{RECORD_NAME} is malformed ({exc!r}): {REFRESH_HINT}") from exc


def _drop_empty(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v not in ("", [], None)}


def dumps(record: Record) -> str:
    """Deterministic text: sorted keys, two-space indent, ASCII, one trailing newline."""
    return json.dumps(record.to_json(), sort_keys=True, indent=2, ensure_ascii=True) + "\n"


def load(path: Path) -> Record:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecordError(f"{path} does not exist: {REFRESH_HINT}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path} is not JSON ({exc.msg}): {REFRESH_HINT}") from None
    return Record.from_json(data)


# -- refresh: run the checkers -----------------------------------------------------------------------


@dataclass
class RefreshOptions:
    hypothesis: bool = True
    z3: bool = True
    matrix: bool = True
    log: Callable[[str], None] = lambda _msg: None


def refresh(source: Source, options: RefreshOptions | None = None) -> Record:
    """Run every checker on ``source`` and return the record (slow: minutes with the full matrix)."""
    from pipeproof.drawing.matrix import compute_matrix
    from pipeproof.model.check.checks import CheckOptions, run_checks
    from pipeproof.model.check.explorer import explore

    opts = options or RefreshOptions()
    check_opts = CheckOptions(
        scenarios=source.scenarios,
        hypothesis=opts.hypothesis,
        z3=opts.z3,
        model=lambda sc: source.model(sc.bounds),
        log=opts.log,
    )
    rows = run_checks(check_opts)
    checks = [CheckRow(r.machine, r.property, r.method, r.verdict, r.states_or_examples, r.detail, list(r.trace or []))
              for r in rows]

    # The explorer again, on our side, for what the rows do not carry: coverage and structured paths.
    coverage: dict[str, set[str]] = {}
    failing: dict[str, TraceData] = {}
    for sc in source.scenarios:
        system = System(sc.bounds, source.model(sc.bounds))
        result = explore(system, source.invariants)
        for machine, keys in result.covered.items():
            coverage.setdefault(machine, set()).update(keys)
        for prop, cex in sorted(result.violations.items()):
            trace = trace_from_path(system, prop, cex.message, sc.name, cex.path)
            if prop not in failing or len(trace.steps) < len(failing[prop].steps):
                failing[prop] = trace
    for row in rows:
        if row.verdict == "violated" and row.method != "explorer" and row.property not in failing:
            failing[row.property] = trace_from_lines(row.property, (row.trace or ["?"])[-1], row.detail,
                                                     row.method, (row.trace or [])[:-1])

    mutants = []
    for m in source.mutants:
        b = scenario_bounds(source, m.scenario)
        system = System(b, source.mutant_model(m, b))
        result = explore(system, source.invariants, stop_when=frozenset({m.prop}))
        found = result.violations.get(m.prop)
        caught = trace_from_path(system, m.prop, found.message, m.scenario, found.path) if found else None
        opts.log(f"mutant    {m.name:<26} " + (f"caught, {len(found.path)} steps" if found else "MISSED"))
        mutants.append(MutantEntry(m.name, m.seed, m.delta, m.prop, m.scenario, caught))

    matrix_source, cells = compute_matrix(source, mutants, run_full=opts.matrix, log=opts.log)
    checkers = sorted({r.method for r in checks} | {c.checker for c in cells}, key=_checker_order)
    return Record(
        fingerprint=fingerprint(source),
        checks=checks,
        coverage={k: sorted(v) for k, v in coverage.items()},
        failing=[failing[k] for k in sorted(failing)],
        mutants=mutants,
        matrix=cells,
        matrix_source=matrix_source,
        checkers=checkers,
    )


CHECKER_ORDER = ("explorer", "hypothesis", "z3")


def _checker_order(name: str) -> tuple[int, str]:
    return (CHECKER_ORDER.index(name) if name in CHECKER_ORDER else len(CHECKER_ORDER), name)
