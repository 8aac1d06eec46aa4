"""Wall time of ``pipeproof check`` per checker and in total, for the default run and for --mutants.

Run: .venv/bin/python bench/check.py [--mutants] [--repeat N]

Targets (docs/benchmarks.md, "pipeproof check"): the default check in 15 s wall or less on this
machine, ``--mutants`` in 60 s or less. Each checker is timed alone in this process (one core:
what it costs), then the whole command is timed end to end as a user runs it (a fresh process,
imports included, workers on every core), so the split and the total come from the same run.
A bare-Python baseline (a fixed loop) is timed in the same run because the machine is shared:
its seconds say how loaded the machine was.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeproof.model.check.checks import CheckOptions, run_tasks
from pipeproof.model.check.matrix import CHECKERS, MatrixOptions, mutant_matrix

ROOT = Path(__file__).resolve().parents[1]
PIPEPROOF = [sys.executable, "-m", "pipeproof.cli"]


def baseline() -> float:
    """Seconds for a fixed pure-Python loop (about 0.09 s on a quiet core here)."""
    start = time.perf_counter()
    acc = 0
    for i in range(3_000_000):
        acc ^= i * 7
    return time.perf_counter() - start


def per_checker_default() -> dict[str, float]:
    """Each checker alone, serially in this process (``jobs=1``): what it costs on one core."""
    out = {}
    for name in ("explorer", "hypothesis", "z3"):
        opts = CheckOptions(explorer=name == "explorer", hypothesis=name == "hypothesis", z3=name == "z3", jobs=1)
        start = time.perf_counter()
        run_tasks(opts)
        out[name] = time.perf_counter() - start
    return out


def per_checker_mutants() -> dict[str, float]:
    out = {}
    for name in CHECKERS:
        start = time.perf_counter()
        mutant_matrix(MatrixOptions(checkers=(name,), jobs=1))
        out[name] = time.perf_counter() - start
    return out


def end_to_end(args: list[str]) -> float:
    """The command as a user runs it, in a fresh process (imports and worker start-up included)."""
    start = time.perf_counter()
    proc = subprocess.run([*PIPEPROOF, "check", "--quiet", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"pipeproof check {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return seconds


def report(title: str, split: dict[str, float], totals: list[float], target: float) -> None:
    print(f"{title}")
    for name, seconds in split.items():
        print(f"  {name:<11} {seconds:6.2f} s alone on one core")
    print(f"  {'sum':<11} {sum(split.values()):6.2f} s (what one core would take)")
    best, median = min(totals), statistics.median(totals)
    verdict = "meets" if best <= target else "MISSES"
    print(f"  {'total':<11} {best:6.2f} s wall end to end, best of {len(totals)} (median {median:.2f} s), "
          f"{os.cpu_count()} cores; target {target:.0f} s: {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mutants", action="store_true", help="also time --mutants (about two minutes)")
    ap.add_argument("--repeat", type=int, default=3, help="end-to-end runs of each command (best is reported)")
    args = ap.parse_args()
    print(f"baseline loop: {baseline():.3f} s (quiet machine: about 0.09 s)")
    report("pipeproof check (default)", per_checker_default(), [end_to_end([]) for _ in range(args.repeat)], 15)
    if args.mutants:
        report("pipeproof check --mutants", per_checker_mutants(),
               [end_to_end(["--mutants"]) for _ in range(max(1, args.repeat - 1))], 60)
    print(f"baseline loop: {baseline():.3f} s (again, after the runs)")


if __name__ == "__main__":
    main()
