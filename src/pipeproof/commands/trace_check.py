"""``pipeproof trace-check FILE``: validate a JSONL audit log against the model (docs/conformance.md).

Exit codes: 0 the model allows every line, 1 a violation (the first line the model does not allow
is printed with its instance's earlier lines and the events allowed from its state), 2 the input
is unreadable (the line number and what is wrong).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "check a JSONL audit log (the server's, or any that maps onto the model's events) against the model"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="the JSONL audit log ('-' reads stdin)")
    parser.add_argument("--window", action="store_true",
                        help="the log is a window of a longer one: adopt every instance at its first line's state")
    parser.add_argument("--buffer-max", type=int, default=32, help="the server's preready_buffer_frames (32)")
    parser.add_argument("--max-attempts", type=int, default=5, help="the server's max_attempts (5)")
    parser.add_argument("--max-connections-per-user", type=int, default=8,
                        help="the server's max_connections_per_user (8)")
    parser.add_argument("--max-steps", type=int, default=64, help="the server's run_max_steps (64)")
    parser.add_argument("--error-budget", type=int, default=10, help="the server's error_budget (10)")
    parser.add_argument("--urgency", type=float, default=2.0,
                        help="seconds a due delivery deadline may stay unhandled in the log (2.0)")


def run(args: argparse.Namespace) -> int:
    from pipeproof.conformance.errors import TraceUnreadable
    from pipeproof.conformance.tracecheck import ModelParams, check_file, check_lines, read_lines

    params = ModelParams(args.buffer_max, args.max_attempts, args.max_connections_per_user, args.max_steps,
                         args.error_budget)
    try:
        if str(args.file) == "-":
            report = check_lines(read_lines(sys.stdin), params, window=args.window, urgency=args.urgency)
        else:
            report = check_file(args.file, params, window=args.window, urgency=args.urgency)
    except TraceUnreadable as exc:
        print(f"pipeproof trace-check: unreadable input: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{n} {m}" for m, n in sorted(report.instances.items())) or "no instances"
    if report.violation is not None:
        print(f"VIOLATION at line {report.line_no}: {report.violation.render()}")
        print(f"({report.lines} lines read; {counts})")
        return 1
    adopted = f", {report.adopted} adopted mid-stream" if report.adopted else ""
    print(f"ok: {report.lines} lines, {counts}{adopted}")
    return 0
