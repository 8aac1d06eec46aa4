"""SPIN end to end against the Python explorer: where the compiled search pays for its compile.

Run: .venv/bin/python bench/spin.py [--big]

For each instance, both engines explore the same state space (the counts are printed side by side
and must agree): the explorer (model/check/explorer.py) in this process, and SPIN end to end
(model/check/spin.py: generate the Promela, spin -a, gcc -O2, pan, and the replay of any trail).
The default scenarios and three larger sizes are measured; the crossover is where a straight line
fitted through SPIN's times (a fixed compile cost plus a per-state cost) meets the explorer's.
--big adds instances only SPIN finishes (the explorer's state cap is 2,000,000 in pipeproof check).
The machine is shared, so the baseline printed first is the compile of a trivial Promela model in
the same run: SPIN's fixed cost, against which its times read.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from pipeproof.model.check.explorer import explore
from pipeproof.model.check.spin import PanOptions, verify
from pipeproof.model.scenarios import DEFAULT_SCENARIOS
from pipeproof.model.system import Bounds, System

SIZES: tuple[tuple[str, Bounds], ...] = (
    ("1u x 1s x 4e, 2 steps, untimed", Bounds(users=1, sessions_per_user=1, events_per_user=4, max_steps=2,
                                              ack_timeout=0, resume_window=0, frames=False, drain=False)),
    ("1u x 2s x 3e untimed", Bounds(users=1, sessions_per_user=2, events_per_user=3, ack_timeout=0,
                                    resume_window=0, frames=False, drain=False)),
    ("1u x 2s x 3e timed", Bounds(users=1, sessions_per_user=2, events_per_user=3, frames=False, drain=False)),
)
BIG: tuple[tuple[str, Bounds], ...] = (
    ("2u x 2s x 2e untimed, 1 run", Bounds(users=2, sessions_per_user=2, events_per_user=2, ack_timeout=0,
                                           resume_window=0, frames=False, drain=False, runs=1)),
    ("1u x 2s x 3e, all actions", Bounds(users=1, sessions_per_user=2, events_per_user=3)),
)


def baseline() -> float:
    """Seconds to turn a one-line Promela model into a running pan (spin -a, gcc -O2, pan)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "t.pml").write_text("byte x; active proctype p() { end: do :: d_step { x < 3 -> x++ } od }\n")
        start = time.perf_counter()
        subprocess.run(["spin", "-a", "t.pml"], cwd=tmp, check=True, capture_output=True)
        subprocess.run(["gcc", "-O2", "-DSAFETY", "-o", "pan", "pan.c"], cwd=tmp, check=True, capture_output=True)
        subprocess.run(["./pan", "-n"], cwd=tmp, check=True, capture_output=True)
        return time.perf_counter() - start


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (fixed seconds, seconds per state) through (states, seconds)."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true", help="also run SPIN alone on instances past the explorer")
    args = ap.parse_args()
    print(f"baseline: a trivial model through spin -a, gcc -O2 and pan: {baseline():.2f} s")
    print(f"{'instance':<34} {'states':>10} {'transitions':>12} {'explorer s':>10} {'spin s':>8}"
          f" {'(gcc s)':>8} {'spin/explorer':>13}")
    ex_points: list[tuple[int, float]] = []
    sp_points: list[tuple[int, float]] = []
    instances = [(f"default {sc.name}", sc.bounds) for sc in DEFAULT_SCENARIOS] + list(SIZES)
    for name, bounds in instances:
        system = System(bounds)
        e = explore(system)
        s = verify(system, PanOptions())
        if (s.states, s.transitions) != (e.states, e.transitions):
            raise SystemExit(f"{name}: spin {s.states}/{s.transitions} != explorer {e.states}/{e.transitions}")
        ex_points.append((e.states, e.seconds))
        sp_points.append((s.states, s.seconds))
        print(f"{name:<34} {e.states:>10,} {e.transitions:>12,} {e.seconds:>10.2f} {s.seconds:>8.2f}"
              f" {s.timings['gcc']:>8.2f} {s.seconds / e.seconds:>13.2f}")
    (ea, eb), (sa, sb) = fit(ex_points), fit(sp_points)
    print(f"fit: explorer {ea:.2f} s + {1 / eb:,.0f} states/s; spin {sa:.2f} s + {1 / sb:,.0f} states/s")
    if eb > sb:
        print(f"crossover: spin is faster end to end past about {(sa - ea) / (eb - sb):,.0f} states")
    if args.big:
        for name, bounds in BIG:
            s = verify(System(bounds), PanOptions())
            print(f"spin only {name:<24} {s.summary()}")


if __name__ == "__main__":
    main()
