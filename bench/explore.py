"""Explorer speed: states/s and total time at the default bounds and at larger ones.

Run: .venv/bin/python bench/explore.py [--large]

Prints one line per instance. The default scenarios are what `pipeproof check` explores; the
larger instances (--large) are what the bound flags reach. Speed is reported as states per second
next to a baseline measured in the same run (a plain BFS over tuples doing the same hashing
work, no model), because this machine is shared and absolute numbers drift.
"""

from __future__ import annotations

import argparse
import time
from collections import deque

from pipeproof.model.check.explorer import explore
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", action="store_true", help="also explore larger instances (minutes)")
    args = ap.parse_args()
    base = baseline(200_000)
    print(f"baseline bare BFS: {base:,.0f} states/s")
    total_states = 0
    total_s = 0.0
    for sc in DEFAULT_SCENARIOS:
        r = explore(System(sc.bounds))
        total_states += r.states
        total_s += r.seconds
        print(f"default {sc.name:<10} {r.summary()}  ratio to baseline {r.states_per_second / base:.3f}")
    print(f"default total: {total_states} states in {total_s:.2f} s ({total_states / total_s:,.0f} states/s)")
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
