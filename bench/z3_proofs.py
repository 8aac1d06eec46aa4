"""Z3 timing: every induction proof together, the bounded-liveness BMC, and the zoo's BMC traces.

Run: .venv/bin/python bench/z3_proofs.py [--mutants] [--repeat N]

Target (docs/benchmarks.md): all induction proofs together under 2 s on this machine. A baseline
is measured in the same run (one trivial Z3 query repeated as many times as the proof asks
queries) so the number can be read on a loaded, shared machine.
"""

from __future__ import annotations

import argparse
import time

import z3

from pipeproof.model.check.z3check import EAE, LIVENESS_DEPTH, bmc, prove, verdicts
from pipeproof.model.mutants import MUTANTS
from pipeproof.model.scenarios import DEFAULT_SCENARIOS
from pipeproof.model.system import System


def baseline(queries: int) -> float:
    start = time.perf_counter()
    x = z3.Int("x")
    for _ in range(queries):
        s = z3.Solver()
        s.add(x > 0, x < 0)
        s.check()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mutants", action="store_true", help="also time Z3's BMC trace for every mutant")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    best = float("inf")
    for _ in range(args.repeat):
        run = prove()
        best = min(best, run.seconds)
    proofs = verdicts(run)
    queries = 1 + len(run.step) + sum(len(v) for v in run.props.values())
    base = baseline(queries)
    print(f"induction: {len(proofs)} properties, {sum(p.verdict == 'proved' for p in proofs)} proved, "
          f"{run.cases} cases of Next, {queries} queries, best of {args.repeat}: {best:.2f} s "
          f"(target < 2 s); baseline {queries} trivial queries {base:.2f} s")
    for sc in DEFAULT_SCENARIOS:
        if sc.bounds.timed:
            r = bmc(System(sc.bounds), [EAE], depth=LIVENESS_DEPTH)
            print(f"bounded liveness BMC {sc.name}: depth {r.depth}, {r.result}, {r.seconds:.2f} s")
    if args.mutants:
        total = 0.0
        for m in MUTANTS:
            r = bmc(m.system(), [m.prop], liveness=False, timeout_ms=120_000)
            total += r.seconds
            print(f"mutant {m.name:<26} {r.result:<9} trace {len(r.steps):>2} steps  {r.seconds:6.2f} s")
        print(f"mutant BMC total {total:.2f} s")


if __name__ == "__main__":
    main()
