"""``pipeproof export``: the composed model in another checker's language (docs/proofs.md, "The SPIN
engine"). Also the SPIN half of ``pipeproof check --engine spin`` (``check_with_spin``).

``pipeproof export --promela FILE`` writes the System at the given bounds (the same flags as
``pipeproof check``; none: the default ``Bounds``) as Promela generated from the machine
declarations; ``--scenario NAME`` starts from a default scenario's bounds and ``--mutant NAME``
exports a mutant of the zoo (at its scenario's bounds unless others are given). ``-`` writes to
standard output. Exit 0, or 2 on bad bounds or an unknown name.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from pipeproof.model.scenarios import Scenario

HELP = "write the composed model as Promela (for SPIN), generated from the declarations"

BOUND_FLAGS: dict[str, str] = {
    # flag dest: Bounds field (the same flags as pipeproof check)
    "users": "users", "sessions": "sessions_per_user", "events": "events_per_user", "attempts": "max_attempts",
    "buffer": "buffer_max", "ack_timeout": "ack_timeout", "resume_window": "resume_window", "max_steps": "max_steps",
}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--promela", metavar="FILE", required=True, help="the Promela file to write ('-': stdout)")
    p.add_argument("--scenario", metavar="NAME", help="start from this default scenario's bounds")
    p.add_argument("--mutant", metavar="NAME", help="export this mutant of the zoo instead of the reference model")
    g = p.add_argument_group("bounds", "the instance to export (as for pipeproof check)")
    g.add_argument("--users", type=int)
    g.add_argument("--sessions", type=int, help="sessions per user")
    g.add_argument("--events", type=int, help="events per user's stream")
    g.add_argument("--attempts", type=int, help="max_attempts")
    g.add_argument("--buffer", type=int, help="pre-ready buffer size (frames)")
    g.add_argument("--ack-timeout", type=int, help="ticks; 0 with --resume-window 0 is untimed")
    g.add_argument("--resume-window", type=int, help="ticks")
    g.add_argument("--max-steps", type=int, help="thinking/tool steps per run")


def run(args: argparse.Namespace) -> int:
    from pipeproof.errors import ModelError
    from pipeproof.model.check.promela import generate
    from pipeproof.model.mutants import BY_NAME, scenario
    from pipeproof.model.system import Bounds, System, reference_model

    if args.mutant is not None and args.mutant not in BY_NAME:
        print(f"pipeproof export: unknown mutant {args.mutant!r}; one of: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    mutant = BY_NAME[args.mutant] if args.mutant else None
    base_name = args.scenario or (mutant.scenario if mutant else None)
    try:
        base = scenario(base_name).bounds if base_name else Bounds()
    except KeyError:
        print(f"pipeproof export: unknown scenario {base_name!r}", file=sys.stderr)
        return 2
    given = {field: getattr(args, dest) for dest, field in BOUND_FLAGS.items() if getattr(args, dest) is not None}
    try:
        bounds = replace(base, **given)
        model = mutant.model(bounds) if mutant else reference_model(bounds)
        text = generate(System(bounds, model)).text
    except ModelError as exc:
        print(f"pipeproof export: {exc}", file=sys.stderr)
        return 2
    if args.promela == "-":
        sys.stdout.write(text)
    else:
        Path(args.promela).write_text(text)
        print(f"pipeproof export: wrote {args.promela} ({model.name} at {bounds.describe()})", file=sys.stderr)
    return 0


def check_with_spin(args: argparse.Namespace, scenarios: Callable[[argparse.Namespace], Sequence[object]]) -> int:
    """``pipeproof check --engine spin``: SPIN in place of the explorer, one row per invariant, the
    exit codes of ``pipeproof check`` (1: a violation; 2: unknown, e.g. spin is not installed)."""
    from pipeproof.errors import ModelError
    from pipeproof.model.check.checks import render_table
    from pipeproof.model.check.spin import PanOptions, default_memory_mb, spin_rows

    if getattr(args, "mutants", False) or getattr(args, "explain", None):
        print("pipeproof check: --engine spin checks the model's invariants; --mutants and --explain are the"
              " other checkers' (run them without --engine spin)", file=sys.stderr)
        return 2
    try:
        chosen = cast("tuple[Scenario, ...]", tuple(scenarios(args)))
    except ModelError as exc:
        print(f"pipeproof check: {exc}", file=sys.stderr)
        return 2
    log = (lambda _m: None) if args.quiet or args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    rows = spin_rows(chosen, options=PanOptions(memory_mb=default_memory_mb()), log=log)
    for reason in sorted({r.detail for r in rows if r.verdict == "unknown" and r.detail}):
        print(f"pipeproof check: spin could not decide: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
    else:
        print(render_table(rows))
        for r in rows:
            if r.verdict == "violated" and r.trace:
                print(f"\n{r.property} ({r.method}) violated, {r.detail}:")
                print("\n".join(f"  {i:>3}. {s}" for i, s in enumerate(r.trace, 1)))
    verdicts = {r.verdict for r in rows}
    if "violated" in verdicts:
        return 1
    return 2 if "unknown" in verdicts else 0
