"""``pipeproof diagrams``: write diagrams/ from the model and the verification record (docs/diagrams.md).

* ``pipeproof diagrams`` renders diagrams/ from the model plus diagrams/verdicts.json (seconds);
* ``pipeproof diagrams --refresh`` first runs every checker and the mutant matrix and rewrites
  verdicts.json (minutes), then renders;
* ``pipeproof diagrams --check`` regenerates in memory and compares with the committed files
  (CI): exit 1 listing what differs, or when the model changed since verdicts.json was recorded.

Exit codes: 0 ok; 1 drift or a stale record; 2 the record is missing or unreadable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "draw the machines, counterexamples and protocol into diagrams/ (--check: drift check for CI)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("diagrams"), help="the diagrams folder (default: ./diagrams)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="regenerate in memory and fail (exit 1) if a committed file differs or the record is stale")
    mode.add_argument("--refresh", action="store_true",
                      help="run every checker and the mutant matrix, rewrite verdicts.json, then draw (slow)")
    p.add_argument("--no-hypothesis", action="store_true", help="with --refresh: skip Hypothesis (the record says so)")
    p.add_argument("--no-z3", action="store_true", help="with --refresh: skip Z3 (the record says so)")
    p.add_argument("--no-matrix", action="store_true",
                   help="with --refresh: explorer column only in the mutant matrix (skip model/check/matrix.py)")
    p.add_argument("--quiet", action="store_true", help="only errors")


def run(args: argparse.Namespace) -> int:
    from pipeproof.drawing import generate
    from pipeproof.drawing.record import RECORD_NAME, RecordError, RefreshOptions, dumps, load, refresh
    from pipeproof.drawing.source import DEFAULT_SOURCE

    out: Path = args.out
    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    record_path = out / RECORD_NAME

    if args.refresh:
        say("diagrams: running the checkers for the verification record (this takes a while)")
        record = refresh(DEFAULT_SOURCE, RefreshOptions(
            hypothesis=not args.no_hypothesis, z3=not args.no_z3, matrix=not args.no_matrix, log=say))
        out.mkdir(parents=True, exist_ok=True)
        record_path.write_text(dumps(record), encoding="utf-8")
        say(f"diagrams: wrote {record_path}")
    else:
        try:
            record = load(record_path)
        except RecordError as exc:
            print(f"pipeproof diagrams: {exc}", file=sys.stderr)
            return 2

    if args.check:
        drift = generate.check(out, DEFAULT_SOURCE, record)
        if drift.ok:
            say(f"diagrams: {out} is up to date ({drift.compared} files compared)")
            if drift.skipped:
                say(drift.render())
            return 0
        print(f"pipeproof diagrams --check: {out} is out of date; run pipeproof diagrams"
              f"{' --refresh' if drift.stale_record else ''} and commit the result", file=sys.stderr)
        print(drift.render(), file=sys.stderr)
        return 1

    result = generate.write(out, DEFAULT_SOURCE, record, say)
    say(f"diagrams: wrote {len(result.written)} files to {out} ({result.unchanged} unchanged"
        + (f", removed {len(result.removed)} leftovers" if result.removed else "") + ")")
    if result.graphviz is None:
        print(f"pipeproof diagrams: graphviz's `dot` is not on PATH: wrote the DOT sources and skipped "
              f"{len(result.skipped)} renderings ({', '.join(result.skipped[:3])}, ...); existing SVG/PNG "
              f"files were left as they were and may be out of date.\n  {generate.INSTALL_HINT}",
              file=sys.stderr)
    else:
        say(f"diagrams: renderings made with graphviz {result.graphviz}")
    if result.stale_record:
        from pipeproof.drawing.record import STALE_MESSAGE

        print(f"pipeproof diagrams: {STALE_MESSAGE}", file=sys.stderr)
        return 1
    return 0
