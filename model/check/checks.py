"""Run every checker on the model and collect one verdict row per (machine, property, method).

This is what ``pipeproof check`` prints (docs/checking.md). Verdicts: ``holds`` (explored or
sampled without a violation), ``proved`` (Z3, unbounded), ``violated`` (with a trace),
``unknown`` (a checker ran out of budget: never reported as holding).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeproof.model.check.explorer import ExploreResult, explore
from pipeproof.model.check.hypothesis_check import run_machine, run_system
from pipeproof.model.connection import CONNECTION, Conn
from pipeproof.model.invariants import INVARIANTS
from pipeproof.model.scenarios import DEFAULT_SCENARIOS, Scenario
from pipeproof.model.system import System, SystemModel, reference_model


@dataclass
class Row:
    machine: str
    property: str
    method: str  # explorer | hypothesis | z3
    verdict: str  # holds | proved | violated | unknown
    states_or_examples: int
    seconds: float
    trace: list[str] | None = None
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["trace"] is None:
            del out["trace"]
        if not out["detail"]:
            del out["detail"]
        out["seconds"] = round(self.seconds, 3)
        return out


@dataclass
class CheckOptions:
    scenarios: Sequence[Scenario] = DEFAULT_SCENARIOS
    explorer: bool = True
    hypothesis: bool = True
    z3: bool = True
    max_states: int = 2_000_000
    examples: int = 150
    steps: int = 40
    seed: int | None = None
    model: Callable[[Scenario], SystemModel] | None = None  # default: the reference model
    log: Callable[[str], None] = lambda _msg: None
    z3_timeout_ms: int = 20_000
    extra: dict[str, Any] = field(default_factory=dict)


def _model_for(options: CheckOptions, sc: Scenario) -> SystemModel:
    return options.model(sc) if options.model else reference_model(sc.bounds)


def explorer_rows(options: CheckOptions) -> list[Row]:
    results: list[tuple[Scenario, ExploreResult]] = []
    for sc in options.scenarios:
        r = explore(System(sc.bounds, _model_for(options, sc)), max_states=options.max_states)
        options.log(f"explorer  {sc.name:<10} {r.summary()}")
        results.append((sc, r))
        covered = options.extra.setdefault("covered", {})
        for machine, keys in r.covered.items():
            covered.setdefault(machine, set()).update(keys)
    states = sum(r.states for _, r in results)
    seconds = sum(r.seconds for _, r in results)
    rows = []
    for inv in INVARIANTS:
        found = [(sc, r.violations[inv.name]) for sc, r in results if inv.name in r.violations]
        complete = all(r.complete for _, r in results)
        if found:
            sc, cex = min(found, key=lambda x: len(x[1].steps))
            rows.append(Row(inv.machine, inv.name, "explorer", "violated", states, seconds,
                            [*cex.steps, f"=> {cex.message}"], f"scenario {sc.name}"))
        else:
            rows.append(Row(inv.machine, inv.name, "explorer", "holds" if complete else "unknown", states, seconds,
                            detail=", ".join(s.name for s in options.scenarios)))
    return rows


def hypothesis_rows(options: CheckOptions) -> list[Row]:
    rows: list[Row] = []
    found: dict[str, tuple[str, tuple[str, ...], str]] = {}
    examples = 0
    start = time.perf_counter()
    for sc in options.scenarios:
        r = run_system(System(sc.bounds, _model_for(options, sc)), max_examples=options.examples,
                       steps=options.steps, seed=options.seed)
        options.log(f"hypothesis {sc.name:<10} {r.examples} examples, {r.seconds:.2f} s"
                    + (f", {r.prop} violated" if r.violation else ""))
        examples += r.examples
        if r.violation is not None and r.prop not in found:
            found[r.prop] = (str(r.violation), r.trace, sc.name)
    seconds = time.perf_counter() - start
    for inv in INVARIANTS:
        if inv.name in found:
            msg, trace, where = found[inv.name]
            rows.append(Row(inv.machine, inv.name, "hypothesis", "violated", examples, seconds,
                            [*trace, f"=> {msg}"], f"scenario {where}"))
        else:
            rows.append(Row(inv.machine, inv.name, "hypothesis", "holds", examples, seconds))
    base = _model_for(options, options.scenarios[0])
    for machine in (base.connection, base.context, base.delivery, base.run):
        r = run_machine(machine, max_examples=options.examples, steps=options.steps, seed=options.seed)
        options.log(f"hypothesis {machine.name:<10} machine, {r.examples} examples, {r.seconds:.2f} s")
        if r.violation is not None:
            rows.append(Row(machine.name, f"machine:{r.prop}", "hypothesis", "violated", r.examples, r.seconds,
                            [*r.trace, f"=> {r.violation}"]))
        else:
            rows.append(Row(machine.name, "statemachine_matches_declaration", "hypothesis", "holds", r.examples,
                            r.seconds, detail="python-statemachine class agrees with the declaration; "
                            "machine-local step invariants hold"))
    return rows


def z3_rows(options: CheckOptions) -> list[Row]:
    """Z3 rows: induction proofs and the bounded-liveness BMC (model/check/z3check.py)."""
    from pipeproof.model.check import z3check  # imported here: z3 loads only when its rows are asked for

    return z3check.z3_rows(options)


def run_checks(options: CheckOptions | None = None) -> list[Row]:
    opts = options or CheckOptions()
    rows: list[Row] = []
    if opts.explorer:
        rows += explorer_rows(opts)
    if opts.hypothesis:
        rows += hypothesis_rows(opts)
    if opts.z3:
        rows += z3_rows(opts)
    return rows


def render_closes(covered: Mapping[str, set[str]] | None = None) -> str:
    """Every edge into CLOSED of the connection machine with the close it sends (section 1,
    "Close codes"), and whether the explorer fired it: the server's own closes are declared
    transitions, so the checkers see each of them."""
    rows = [("event", "from", "close", "explorer")]
    fired = (covered or {}).get(CONNECTION.name, set())
    for t in CONNECTION.transitions:
        if t.target is not Conn.CLOSED:
            continue
        sends = str(t.close) if t.close is not None else "(none: the peer is gone)"
        seen = "-" if covered is None else ("fired" if t.key in fired else "never")
        rows.append((t.event, t.source.name, sends, seen))
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "connection edges into CLOSED (every close the server makes)\n" + "\n".join(lines)


def render_table(rows: Sequence[Row]) -> str:
    head = ("machine", "property", "method", "verdict", "states/examples", "seconds")
    body = [(r.machine, r.property, r.method, r.verdict, str(r.states_or_examples), f"{r.seconds:.2f}")
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)
