"""Explorer speed: states/s at the default bounds (and larger ones), compiled path vs reference.

Run: .venv/bin/python bench/explore.py [--rounds N] [--large]

Each round explores every default scenario twice, alternately: with the compiled path
(``explore``'s default, model/check/compiled.py) and with the reference BFS over
``System.successors`` (``fast=False``), so both see the same machine load. Per scenario it
prints the median over the rounds. Speed is also reported as a ratio to a baseline measured in
the same run (a plain BFS over tuples doing the same hashing work, no model), because this
machine is shared and absolute numbers drift; the line to read is "compiled / reference".
The larger instances (--large) run the compiled path only (the reference needs minutes and
gigabytes there).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import deque

from pipeproof.model.check.explorer import ExploreResult, explore
from pipeproof.model.scenarios import DEFAULT_SCENARIOS
from pipeproof.model.system import Bounds, System


def baseline(n: int) -> float:
    """States/s of a bare BFS over n synthetic nested-tuple states (hash + queue only)."""
    start = time.perf_counter()
    seen = {((0, (0, False)),): None}
    todo = deque(seen)
    i = 0
    while todo and len(seen) < n:
        s = todo.popleft()
        for k in range(3):
            i += 1
            nxt = ((i % 7, (i, k == 1)), *s[:2])
            if nxt not in seen:
                seen[nxt] = None
                todo.append(nxt)
    return len(seen) / (time.perf_counter() - start)


def _median(runs: list[ExploreResult]) -> ExploreResult:
    r = runs[-1]
    r.seconds = statistics.median(x.seconds for x in runs)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="rounds per path; medians are reported (default 3)")
    ap.add_argument("--large", action="store_true", help="also explore larger instances (compiled path, minutes)")
    args = ap.parse_args()
    bases: list[float] = []
    runs: dict[tuple[str, str], list[ExploreResult]] = {}
    for _ in range(args.rounds):
        bases.append(baseline(200_000))
        for sc in DEFAULT_SCENARIOS:
            for path, fast in (("compiled", True), ("reference", False)):
                runs.setdefault((path, sc.name), []).append(explore(System(sc.bounds), fast=fast))
    base = statistics.median(bases)
    print(f"baseline bare BFS: {base:,.0f} states/s (median of {args.rounds})")
    totals: dict[str, tuple[int, float]] = {}
    for sc in DEFAULT_SCENARIOS:
        for path in ("compiled", "reference"):
            r = _median(runs[(path, sc.name)])
            n, s = totals.get(path, (0, 0.0))
            totals[path] = (n + r.states, s + r.seconds)
            print(f"{path:<9} {sc.name:<10} {r.summary()}  ratio to baseline {r.states_per_second / base:.3f}")
    rate = {}
    for path, (n, s) in totals.items():
        rate[path] = n / s
        print(f"default total, {path:<9}: {n} states in {s:.2f} s ({rate[path]:,.0f} states/s),"
              f" ratio to baseline {rate[path] / base:.3f}")
    print(f"compiled / reference states/s = {rate['compiled'] / rate['reference']:.1f}x")
    if args.large:
        for name, b in (
            ("2u x 2s x 2e untimed", Bounds(users=2, sessions_per_user=2, events_per_user=2, ack_timeout=0,
                                            resume_window=0, frames=False, drain=False, runs=1)),
            ("1u x 2s x 3e timed", Bounds(users=1, sessions_per_user=2, events_per_user=3, frames=False,
                                          drain=False)),
            ("1u x 1s x 4e, 2 steps", Bounds(users=1, sessions_per_user=1, events_per_user=4, max_steps=2,
                                            ack_timeout=0, resume_window=0, frames=False, drain=False)),
        ):
            r = explore(System(b), max_states=3_000_000)
            print(f"large   {name:<22} {r.summary()}  ratio to baseline {r.states_per_second / base:.3f}")


if __name__ == "__main__":
    main()
