"""Run every checker on the model and collect one verdict row per (machine, property, method).

This is what ``pipeproof check`` prints (docs/checking.md). Verdicts: ``holds`` (explored or
sampled without a violation), ``proved`` (Z3, unbounded), ``violated`` (with a trace),
``unknown`` (a checker ran out of budget: never reported as holding).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeproof.model.check.explorer import ExploreResult, explore
from pipeproof.model.check.hypothesis_check import HypothesisResult, run_machine, run_system
from pipeproof.model.connection import CONNECTION, Conn
from pipeproof.model.invariants import INVARIANTS
from pipeproof.model.scenarios import DEFAULT_SCENARIOS, Scenario
from pipeproof.model.spec import Machine
from pipeproof.model.system import System, SystemModel, reference_model


@dataclass
class Row:
    machine: str
    property: str
    method: str  # explorer | hypothesis | z3 | spin
    verdict: str  # holds | proved | violated | unknown
    states_or_examples: int
    seconds: float
    trace: list[str] | None = None
    detail: str = ""
    # What the checker measured beyond its headline count (``--json`` only): the explorer's
    # transitions and depth; Hypothesis's examples run, distinct states reached, run lengths.
    measured: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["trace"] is None:
            del out["trace"]
        if not out["detail"]:
            del out["detail"]
        if not out["measured"]:
            del out["measured"]
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
    jobs: int = 0  # worker processes: 0 one per core, 1 everything in this process
    extra: dict[str, Any] = field(default_factory=dict)


def _model_for(options: CheckOptions, sc: Scenario) -> SystemModel:
    return options.model(sc) if options.model else reference_model(sc.bounds)


# -- tasks: one unit of work per (checker, scenario), run in worker processes ------------------------
# Each task is a module-level function of picklable arguments (a Scenario, a SystemModel, numbers)
# returning its result and the progress lines it would have logged, so the parent can run them in
# any order on any core and still print one table in a fixed order.
Logged = tuple[Any, list[str]]


def _explore_task(sc: Scenario, model: SystemModel, max_states: int) -> Logged:
    r = explore(System(sc.bounds, model), max_states=max_states)
    return r, [f"explorer  {sc.name:<10} {r.summary()}"]


def _hypothesis_task(sc: Scenario, model: SystemModel, examples: int, steps: int, seed: int | None) -> Logged:
    r = run_system(System(sc.bounds, model), max_examples=examples, steps=steps, seed=seed)
    line = f"hypothesis {sc.name:<10} {r.examples} examples, {r.seconds:.2f} s"
    return r, [line + (f", {r.prop} violated" if r.violation else "")]


def _machine_task(machine: Machine, examples: int, steps: int, seed: int | None) -> Logged:
    r = run_machine(machine, max_examples=examples, steps=steps, seed=seed)
    return r, [f"hypothesis {machine.name:<10} machine, {r.examples} examples, {r.seconds:.2f} s"]


@dataclass(frozen=True)
class _FixedModels:
    """``CheckOptions.model`` for a worker: the models the parent built, by scenario name (the
    parent's own callable may be a lambda, which does not cross a process boundary)."""

    models: Mapping[str, SystemModel]

    def __call__(self, sc: Scenario) -> SystemModel:
        return self.models[sc.name]


def _z3_task(options: CheckOptions) -> Logged:
    from pipeproof.model.check import z3check  # imported here: z3 loads only when its rows are asked for

    lines: list[str] = []
    options.log = lines.append
    return z3check.z3_rows(options), lines


def _tasks(opts: CheckOptions) -> list[tuple[str, Callable[..., Logged], tuple[Any, ...]]]:
    models = {sc.name: _model_for(opts, sc) for sc in opts.scenarios}
    tasks: list[tuple[str, Callable[..., Logged], tuple[Any, ...]]] = []
    if opts.z3:
        z3_opts = replace(opts, model=_FixedModels(models), log=_no_log, extra=dict(opts.extra))
        tasks.append(("z3", _z3_task, (z3_opts,)))
    if opts.explorer:
        tasks += [(f"explorer:{sc.name}", _explore_task, (sc, models[sc.name], opts.max_states))
                  for sc in opts.scenarios]
    if opts.hypothesis:
        tasks += [(f"hypothesis:{sc.name}", _hypothesis_task, (sc, models[sc.name], opts.examples, opts.steps,
                                                               opts.seed)) for sc in opts.scenarios]
        base = models[opts.scenarios[0].name]
        tasks += [(f"machine:{m.name}", _machine_task, (m, opts.examples, opts.steps, opts.seed))
                  for m in (base.connection, base.context, base.delivery, base.run)]
    return tasks


def _no_log(_msg: str) -> None:
    return


def _jobs(opts: CheckOptions, n_tasks: int) -> int:
    jobs = opts.jobs or os.cpu_count() or 1
    return max(1, min(jobs, n_tasks))


def run_tasks(opts: CheckOptions) -> dict[str, Any]:
    """Run every task of ``opts``, in worker processes when more than one job is allowed; results
    by task key. Progress lines are logged as each task finishes."""
    tasks = _tasks(opts)
    jobs = _jobs(opts, len(tasks))
    results: dict[str, Any] = {}
    if jobs == 1:
        for key, fn, args in tasks:
            results[key], lines = fn(*args)
            for line in lines:
                opts.log(line)
        return results
    # fork where the platform has it: the workers inherit the imported model instead of importing
    # it again (nothing in the parent holds a thread or a socket at this point).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context(method)) as pool:
        futures = {pool.submit(fn, *args): key for key, fn, args in tasks}
        for fut in as_completed(futures):
            results[futures[fut]], lines = fut.result()
            for line in lines:
                opts.log(line)
    return results


def explorer_rows(options: CheckOptions, results: Mapping[str, Any] | None = None) -> list[Row]:
    done = results if results is not None else run_tasks(replace(options, hypothesis=False, z3=False))
    explored: list[tuple[Scenario, ExploreResult]] = [(sc, done[f"explorer:{sc.name}"]) for sc in options.scenarios]
    covered = options.extra.setdefault("covered", {})
    for _, r in explored:
        for machine, keys in r.covered.items():
            covered.setdefault(machine, set()).update(keys)
    states = sum(r.states for _, r in explored)
    seconds = sum(r.seconds for _, r in explored)
    measured = {"transitions": sum(r.transitions for _, r in explored),
                "per_scenario": {sc.name: {"states": r.states, "transitions": r.transitions, "depth": r.depth,
                                           "quiescent": r.quiescent, "complete": r.complete,
                                           "seconds": round(r.seconds, 3)} for sc, r in explored}}
    rows = []
    complete = all(r.complete for _, r in explored)
    for inv in INVARIANTS:
        found = [(sc, r.violations[inv.name]) for sc, r in explored if inv.name in r.violations]
        if found:
            sc, cex = min(found, key=lambda x: len(x[1].steps))
            rows.append(Row(inv.machine, inv.name, "explorer", "violated", states, seconds,
                            [*cex.steps, f"=> {cex.message}"], f"scenario {sc.name}", measured))
        else:
            rows.append(Row(inv.machine, inv.name, "explorer", "holds" if complete else "unknown", states, seconds,
                            detail=", ".join(s.name for s in options.scenarios), measured=measured))
    return rows


def _hypothesis_measured(r: HypothesisResult) -> dict[str, Any]:
    """What one scenario's run measured: test cases run (not the budget), distinct states it
    stood in, system steps per test case, and the deepest state it reached."""
    return {"examples": r.examples, "distinct_states": r.distinct_states,
            "mean_run_length": round(r.mean_run_length, 2), "max_run_length": r.max_run_length,
            "max_depth": r.max_walk_length, "seconds": round(r.seconds, 3)}


def hypothesis_rows(options: CheckOptions, results: Mapping[str, Any] | None = None) -> list[Row]:
    done = results if results is not None else run_tasks(replace(options, explorer=False, z3=False))
    rows: list[Row] = []
    found: dict[str, tuple[str, tuple[str, ...], str]] = {}
    runs: list[tuple[Scenario, HypothesisResult]] = [(sc, done[f"hypothesis:{sc.name}"]) for sc in options.scenarios]
    for sc, r in runs:
        if r.violation is not None and r.prop not in found:
            found[r.prop] = (str(r.violation), r.trace, sc.name)
    examples = sum(r.examples for _, r in runs)
    seconds = sum(r.seconds for _, r in runs)
    measured: dict[str, Any] = {"examples": examples,
                                "per_scenario": {sc.name: _hypothesis_measured(r) for sc, r in runs}}
    for inv in INVARIANTS:
        if inv.name in found:
            msg, trace, where = found[inv.name]
            rows.append(Row(inv.machine, inv.name, "hypothesis", "violated", examples, seconds,
                            [*trace, f"=> {msg}"], f"scenario {where}", measured))
        else:
            rows.append(Row(inv.machine, inv.name, "hypothesis", "holds", examples, seconds, measured=measured))
    base = _model_for(options, options.scenarios[0])
    for machine in (base.connection, base.context, base.delivery, base.run):
        r = done[f"machine:{machine.name}"]
        one = {"examples": r.examples, "seconds": round(r.seconds, 3)}
        if r.violation is not None:
            rows.append(Row(machine.name, f"machine:{r.prop}", "hypothesis", "violated", r.examples, r.seconds,
                            [*r.trace, f"=> {r.violation}"], measured=one))
        else:
            rows.append(Row(machine.name, "statemachine_matches_declaration", "hypothesis", "holds", r.examples,
                            r.seconds, detail="python-statemachine class agrees with the declaration; "
                            "machine-local step invariants hold", measured=one))
    return rows


def z3_rows(options: CheckOptions, results: Mapping[str, Any] | None = None) -> list[Row]:
    """Z3 rows: induction proofs and the bounded-liveness BMC (model/check/z3check.py)."""
    done = results if results is not None else run_tasks(replace(options, explorer=False, hypothesis=False))
    rows: list[Row] = done["z3"]
    return rows


def run_checks(options: CheckOptions | None = None) -> list[Row]:
    """Every checker's rows, explorer then Hypothesis then Z3; the work runs on every core
    (``CheckOptions.jobs``) and the table is the same whatever order it finished in."""
    opts = options or CheckOptions()
    done = run_tasks(opts)
    rows: list[Row] = []
    if opts.explorer:
        rows += explorer_rows(opts, done)
    if opts.hypothesis:
        rows += hypothesis_rows(opts, done)
    if opts.z3:
        rows += z3_rows(opts, done)
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
