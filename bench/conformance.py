"""Throughput of the conformance kit: client actions per second against the reference server
(docs/benchmarks.md, "Conformance kit"). Not a test: it prints numbers.

    .venv/bin/python bench/conformance.py [--examples N] [--steps N]

Starts the reference server in its own process (``pipeproof conform --serve``'s launcher, small
declared timing), runs the live kit, then trace-checks the server's audit log, and reports
examples, client actions, observations checked and lines replayed per second.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from pipeproof.conformance.kit import Target, run_kit
from pipeproof.conformance.serve import DISABLED_USER, ServedServer
from pipeproof.conformance.timing import SMALL
from pipeproof.conformance.tracecheck import ModelParams, check_file
from pipeproof.conformance.wire import Tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    with ServedServer(SMALL) as server:
        target = Target(server.url, Tokens(server.secret), SMALL, disabled_user=DISABLED_USER)
        result = run_kit(target, examples=args.examples, steps=args.steps, budget=600)
        server.stop()
        tmp = Path(tempfile.mkdtemp())
        log = tmp / "audit.jsonl"
        shutil.copyfile(server.audit_log, log)
    checks = sum(result.checks.values())
    print(f"live kit: {result.examples} examples, {result.actions} client actions, {checks} checks "
          f"in {result.seconds:.1f}s -> {result.actions / result.seconds:.1f} actions/s, "
          f"{checks / result.seconds:.0f} checks/s ({'ok' if result.ok else 'VIOLATION ' + result.violation.prop})")
    t = time.perf_counter()
    report = check_file(log, ModelParams(SMALL.preready_buffer_frames, SMALL.max_attempts,
                                         SMALL.max_connections_per_user, SMALL.run_max_steps,
                                         SMALL.error_budget))
    dt = time.perf_counter() - t
    print(f"trace-check: {report.lines} lines in {dt:.3f}s -> {report.lines / dt:.0f} lines/s "
          f"({'ok' if report.ok else 'VIOLATION'})")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
