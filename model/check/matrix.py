"""The mutant matrix: every checker against every known-broken design (docs/proofs.md, "The mutant matrix").

``pipeproof check --mutants`` prints it and the HTML report renders it. A cell is ``caught`` when
the checker produced a concrete trace from the initial state to a violation (its length is
reported), ``missed`` otherwise. What each checker does per mutant:

- explorer: exhaustive BFS of the mutant's scenario, stopping at the first violation of the
  mutant's property (shortest trace);
- hypothesis: the composed-system stateful test with a fixed seed; a miss means its random
  sampling did not reach the violating interleaving within the example budget (not a proof of
  absence: the explorer and Z3 columns are the guarantees);
- z3: the induction step over the symbolic universe yields a counterexample to induction (CTI) for
  the mutant's property, and BMC from Init on the scenario's bounds turns it into a real trace; only
  the BMC trace counts as caught;
- spin: the mutant's scenario generated as Promela (model/check/promela.py), searched by pan, and
  the trail replayed through ``System.successors`` (model/check/spin.py); ``unavailable`` when
  spin or gcc is not installed (the detail says how to install them), never ``caught``.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeproof.model.check.explorer import explore
from pipeproof.model.check.hypothesis_check import run_system
from pipeproof.model.check.spin import PanOptions, SpinUnavailable, verify
from pipeproof.model.check.z3check import BMC_DEPTH, bmc, prove, verdicts
from pipeproof.model.check.z3props import PROPERTY_BY_NAME, closure
from pipeproof.model.mutants import MUTANTS, Mutant
from pipeproof.model.system import System

CHECKERS = ("explorer", "hypothesis", "z3", "spin")
GUARANTEES = ("explorer", "z3", "spin")
"""The exhaustive or proof-backed columns: a miss in one of them fails ``check --mutants``."""
SPIN_OPTIONS = PanOptions(optimize="-O0", hash_bits=18)
"""pan for the zoo: every mutant's scenario is under 60,000 states, so an unoptimised pan (gcc -O0
compiles in a fraction of -O2's time) with a small hash table is the fastest end to end."""


@dataclass
class MatrixOptions:
    checkers: Sequence[str] = CHECKERS
    mutants: Sequence[Mutant] = MUTANTS
    examples: int = 150
    steps: int = 40
    seed: int | None = 0  # fixed, so the hypothesis column is reproducible
    bmc_depth: int = BMC_DEPTH
    z3_timeout_ms: int = 60_000
    cti_timeout_ms: int = 2_000  # per induction query; an unknown CTI is reported, BMC still decides
    log: Callable[[str], None] = lambda _msg: None
    jobs: int = 0  # worker processes: 0 one per core, 1 everything in this process


@dataclass
class MatrixCell:
    mutant: str
    checker: str  # explorer | hypothesis | z3
    verdict: str  # caught | missed | unavailable (spin only: not installed)
    trace_length: int | None
    property: str  # the property that caught it (the mutant's target when missed)
    seconds: float
    trace: list[str] = field(default_factory=list)
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        return out


@dataclass(frozen=True)
class Case:
    """What a worker needs of one mutant: its built system (a Mutant's ``apply`` is a closure,
    which does not cross a process boundary; the SystemModel it builds does)."""

    name: str
    prop: str
    scenario: str
    system: System

    @staticmethod
    def of(m: Mutant) -> Case:
        return Case(m.name, m.prop, m.scenario, m.system())


def _explorer(m: Case, opts: MatrixOptions) -> MatrixCell:
    r = explore(m.system, stop_when=frozenset({m.prop}))
    cex = r.violations.get(m.prop)
    if cex is None:
        return MatrixCell(m.name, "explorer", "missed", None, m.prop, r.seconds,
                          detail=f"{r.states} states, no violation of {m.prop}")
    return MatrixCell(m.name, "explorer", "caught", len(cex.steps), m.prop, r.seconds,
                      [*cex.steps, f"=> {cex.message}"], f"scenario {m.scenario}, {r.states} states")


def _hypothesis(m: Case, opts: MatrixOptions) -> MatrixCell:
    r = run_system(m.system, max_examples=opts.examples, steps=opts.steps, seed=opts.seed)
    if r.violation is None:
        return MatrixCell(m.name, "hypothesis", "missed", None, m.prop, r.seconds,
                          detail=f"{r.examples} examples x {opts.steps} steps (seed {opts.seed}) did not reach it")
    return MatrixCell(m.name, "hypothesis", "caught", len(r.trace), r.prop, r.seconds,
                      [*r.trace, f"=> {r.violation}"], f"seed {opts.seed}")


def _z3(m: Case, opts: MatrixOptions) -> MatrixCell:
    start = time.perf_counter()
    system = m.system
    # 1. Induction on the symbolic mutant: which obligation breaks (the CTI).
    prop = PROPERTY_BY_NAME[m.prop]
    run = prove(system.model, timeout_ms=opts.cti_timeout_ms, props=(prop,), lemmas=closure(prop.lemmas),
                first_failure=True)
    proof = verdicts(run, (prop,))[0]
    # What the induction said, honestly: a CTI, or why there is none (a timeout, or a proof,
    # which on a mutant whose BMC trace is real would mean a weakened encoding: flagged loudly).
    cti = proof.cti or f"induction {proof.verdict}: {proof.detail}"
    # 2. BMC from Init: only a concrete trace counts as caught.
    r = bmc(system, [m.prop], depth=opts.bmc_depth, timeout_ms=opts.z3_timeout_ms, liveness=False)
    seconds = time.perf_counter() - start
    if r.result != "violated":
        return MatrixCell(m.name, "z3", "missed", None, m.prop, seconds,
                          detail=f"BMC to depth {r.depth}: {r.result}; CTI: {cti}")
    return MatrixCell(m.name, "z3", "caught", len(r.steps), r.prop, seconds, [*r.trace, f"=> {r.message}"],
                      f"BMC depth {r.depth}; CTI: {cti}")


def _spin(m: Case, opts: MatrixOptions) -> MatrixCell:
    start = time.perf_counter()
    try:
        r = verify(m.system, SPIN_OPTIONS)
    except SpinUnavailable as exc:
        return MatrixCell(m.name, "spin", "unavailable", None, m.prop, time.perf_counter() - start, detail=str(exc))
    cex = r.violations.get(m.prop)
    if cex is None:
        return MatrixCell(m.name, "spin", "missed", None, m.prop, r.seconds,
                          detail=f"{r.states} states, no violation of {m.prop}"
                          + ("" if r.complete else f" (incomplete: {r.reason})"))
    return MatrixCell(m.name, "spin", "caught", len(cex.steps), m.prop, r.seconds,
                      [*cex.steps, f"=> {cex.message}"],
                      f"scenario {m.scenario}, {r.states} states; trail replayed through the explorer")


RUNNERS: dict[str, Callable[[Case, MatrixOptions], MatrixCell]] = {
    "explorer": _explorer, "hypothesis": _hypothesis, "z3": _z3, "spin": _spin,
}


def _cell(checker: str, case: Case, opts: MatrixOptions) -> MatrixCell:
    return RUNNERS[checker](case, opts)


def _no_log(_msg: str) -> None:
    return


def mutant_matrix(options: MatrixOptions | None = None) -> list[MatrixCell]:
    """One cell per (mutant, checker), mutants in zoo order; the cells run on every core
    (``MatrixOptions.jobs``), the slowest first so the last one to finish is a short one."""
    opts = options or MatrixOptions()
    cases = [Case.of(m) for m in opts.mutants]
    work = [(c, checker) for c in cases for checker in opts.checkers]
    jobs = max(1, min(opts.jobs or os.cpu_count() or 1, len(work)))

    def logged(cell: MatrixCell) -> MatrixCell:
        opts.log(f"{cell.mutant:<26} {cell.checker:<10} {cell.verdict:<6} "
                 f"{'' if cell.trace_length is None else cell.trace_length:>3} {cell.seconds:.2f} s")
        return cell

    if jobs == 1:
        done = {(c.name, checker): logged(_cell(checker, c, opts)) for c, checker in work}
    else:
        # Z3 cells are the long ones (BMC grows with the trace length), then SPIN's compiles:
        # start them first so the last cells to finish are short ones.
        work.sort(key=lambda w: ("z3", "spin", "hypothesis", "explorer").index(w[1]))
        worker_opts = replace(opts, log=_no_log, mutants=())
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context(method)) as pool:
            futures = {pool.submit(_cell, checker, c, worker_opts): (c.name, checker) for c, checker in work}
            done = {futures[f]: logged(f.result()) for f in as_completed(futures)}
    return [done[(c.name, checker)] for c in cases for checker in opts.checkers]


def render_matrix(cells: Sequence[MatrixCell]) -> str:
    """mutant x checker -> ``caught (N steps)`` or ``missed``."""
    checkers = [c for c in CHECKERS if any(x.checker == c for x in cells)]
    mutants = list(dict.fromkeys(x.mutant for x in cells))
    by = {(x.mutant, x.checker): x for x in cells}
    head = ["mutant", *checkers, "property"]
    rows = []
    for m in mutants:
        row = [m]
        for c in checkers:
            cell = by.get((m, c))
            row.append("-" if cell is None else
                       f"caught ({cell.trace_length} steps)" if cell.verdict == "caught" else cell.verdict)
        row.append(next(x.property for x in cells if x.mutant == m))
        rows.append(row)
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
