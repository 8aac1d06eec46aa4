"""Hypothesis seed sweep: how reliably the sampled column of the mutant matrix bites, and how much
of each scenario a run reaches (docs/proofs.md, "Hypothesis").

Run: .venv/bin/python bench/hypothesis_seeds.py [--examples 150] [--steps 40] [--seeds 6] [--jobs 1]

Prints two markdown tables. Per mutant of model/mutants.py MUTANTS (whatever it holds when run),
at the mutant's scenario: how many of seeds 0..N-1 catch it with the mutant's property, the test
cases each seed ran before stopping (the replay of the failing case included), and the shrunk trace
lengths next to the explorer's shortest. Per default scenario, on the reference model: distinct
states reached against the explorer's exhaustive count, system steps per test case (mean and
maximum), walks (stretches from Init or from where a quiescent walk went back to) and the longest
path from Init, test cases run and seconds, for the derandomized run ``pipeproof check`` does, and
the distinct states as the mean over the seeds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from pipeproof.model.check.explorer import explore
from pipeproof.model.check.hypothesis_check import HypothesisResult, run_system
from pipeproof.model.mutants import MUTANTS
from pipeproof.model.scenarios import DEFAULT_SCENARIOS
from pipeproof.model.system import System

T = TypeVar("T")
R = TypeVar("R")
Job = tuple[System, int, int, int | None]


def _run(job: Job) -> HypothesisResult:
    system, examples, steps, seed = job
    return run_system(system, max_examples=examples, steps=steps, seed=seed)


def _shortest(system: System, prop: str) -> int:
    cex = explore(system, stop_when=frozenset({prop})).violations.get(prop)
    return len(cex.steps) if cex else 0


def _states(system: System) -> int:
    return explore(system).states


def _map(fn: Callable[[T], R], items: Iterable[T], jobs: int) -> list[R]:
    if jobs <= 1:
        return [fn(x) for x in items]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(fn, items))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=150, help="test cases per run (pipeproof check's default)")
    ap.add_argument("--steps", type=int, default=40, help="system steps per test case (pipeproof check's default)")
    ap.add_argument("--seeds", type=int, default=6, help="seeds 0..N-1")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (the runs are independent)")
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    start = time.perf_counter()

    jobs: list[Job] = [(m.system(), args.examples, args.steps, s) for m in MUTANTS for s in seeds]
    results = _map(_run, jobs, args.jobs)
    shortest = [_shortest(m.system(), m.prop) for m in MUTANTS]
    print(f"mutants: {args.examples} examples x {args.steps} steps, seeds {seeds[0]}-{seeds[-1]}\n")
    print("| mutant | scenario | seeds caught | test cases per seed | trace (shrunk) | explorer |")
    print("|---|---|---|---|---|---|")
    every = {s: True for s in seeds}
    for k, m in enumerate(MUTANTS):
        runs = results[k * len(seeds):(k + 1) * len(seeds)]
        cells, lengths = [], []
        for s, r in zip(seeds, runs, strict=True):
            caught = r.violation is not None and r.prop == m.prop
            every[s] = every[s] and caught
            cells.append(str(r.examples) if caught else "missed")
            if caught:
                lengths.append(len(r.trace))
        n = sum(c != "missed" for c in cells)
        span = f"{min(lengths)}-{max(lengths)}" if lengths else "-"
        print(f"| {m.name} | {m.scenario} | {n}/{len(seeds)} | {' '.join(cells)} | {span} | {shortest[k]} |")
    print(f"\nseeds catching every mutant: {sum(every.values())}/{len(seeds)}\n")

    print("| scenario | states reached (default) | of explorer's | mean over seeds | steps per case mean / max "
          "| walks | deepest walk | test cases | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for sc in DEFAULT_SCENARIOS:
        system = System(sc.bounds)
        total = _states(system)
        d, *rest = _map(_run, [(system, args.examples, args.steps, s) for s in [None, *seeds]], args.jobs)
        mean = sum(r.distinct_states for r in rest) / len(rest)
        print(f"| {sc.name} | {d.distinct_states} | {total} ({100 * d.distinct_states / total:.1f}%) "
              f"| {mean:.0f} ({100 * mean / total:.1f}%) | {d.mean_run_length:.1f} / {d.max_run_length} "
              f"| {d.walks} | {d.max_walk_length} | {d.examples} | {d.seconds:.2f} |")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
