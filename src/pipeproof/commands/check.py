"""``pipeproof check``: the main job. Runs every checker and prints one verdict table.

Exit 0 when every property holds (or is proved), 1 on any violation, 2 when a checker could not
decide (unknown) and nothing was violated. ``--json`` prints the rows as a JSON list.
``--mutants`` prints the mutant x checker matrix instead (exit 1 when the explorer or Z3 misses
one); ``--explain PROPERTY`` prints the Z3 proof of one property with its strengthening lemmas.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "run the model checkers (explorer, Hypothesis, Z3) and print the verdict table"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    p.add_argument("--no-explorer", action="store_true", help="skip the exhaustive explorer")
    p.add_argument("--no-hypothesis", action="store_true", help="skip Hypothesis")
    p.add_argument("--no-z3", action="store_true", help="skip the Z3 proofs")
    p.add_argument("--no-spin", action="store_true", help="with --mutants: skip the SPIN column")
    p.add_argument("--examples", type=int, default=150, help="Hypothesis examples per test (default 150)")
    p.add_argument("--steps", type=int, default=40, help="Hypothesis steps per example (default 40)")
    p.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: derandomized)")
    p.add_argument("--max-states", type=int, default=2_000_000, help="explorer state budget per scenario")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--engine", choices=("explorer", "spin"), default="explorer",
                   help="spin: model-check with SPIN instead (for bounds the explorer cannot reach; docs/proofs.md)")
    p.add_argument("--jobs", type=int, default=0,
                   help="worker processes for the checkers (default 0: one per core; 1: no workers)")
    p.add_argument("--mutants", action="store_true",
                   help="run every checker against every mutant of the zoo and print the matrix")
    p.add_argument("--only", action="append", metavar="MUTANT", help="with --mutants: just this mutant (repeatable)")
    p.add_argument("--explain", metavar="PROPERTY",
                   help="print how PROPERTY is proved by Z3, with its strengthening lemmas, and exit")
    g = p.add_argument_group("bounds", "set any of these to check one custom instance instead of the defaults")
    g.add_argument("--users", type=int)
    g.add_argument("--sessions", type=int, help="sessions per user")
    g.add_argument("--events", type=int, help="events per user's stream")
    g.add_argument("--attempts", type=int, help="max_attempts")
    g.add_argument("--buffer", type=int, help="pre-ready buffer size (frames)")
    g.add_argument("--ack-timeout", type=int, help="ticks; 0 with --resume-window 0 is untimed")
    g.add_argument("--resume-window", type=int, help="ticks")
    g.add_argument("--max-steps", type=int, help="thinking/tool steps per run")


def _scenarios(args: argparse.Namespace) -> tuple[object, ...]:
    from dataclasses import replace

    from pipeproof.model.scenarios import DEFAULT_SCENARIOS, Scenario
    from pipeproof.model.system import Bounds

    fields = {
        "users": args.users, "sessions_per_user": args.sessions, "events_per_user": args.events,
        "max_attempts": args.attempts, "buffer_max": args.buffer, "ack_timeout": args.ack_timeout,
        "resume_window": args.resume_window, "max_steps": args.max_steps,
    }
    given = {k: v for k, v in fields.items() if v is not None}
    if not given:
        return DEFAULT_SCENARIOS
    b = replace(Bounds(), **given)
    return (Scenario("custom", b, b.describe()),)


def _explain(prop: str) -> int:
    from pipeproof.model.check.z3check import explain
    from pipeproof.model.check.z3props import PROPERTY_BY_NAME

    if prop not in PROPERTY_BY_NAME:
        print(f"pipeproof check: unknown property {prop!r}; one of: {', '.join(PROPERTY_BY_NAME)}", file=sys.stderr)
        return 2
    print(explain(prop))
    return 0


def _mutants(args: argparse.Namespace) -> int:
    """Exit 0 when every cell of the explorer, Z3 and SPIN columns is caught (the guarantees), 1 when
    one is missed, 2 when SPIN could not run (not installed)."""
    from pipeproof.model.check.matrix import GUARANTEES, MatrixOptions, mutant_matrix, render_matrix
    from pipeproof.model.mutants import BY_NAME, MUTANTS

    unknown = sorted(set(args.only or ()) - set(BY_NAME))
    if unknown:
        print(f"pipeproof check: unknown mutant(s) {unknown}; one of: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2

    checkers = [c for c, off in (("explorer", args.no_explorer), ("hypothesis", args.no_hypothesis),
                                 ("z3", args.no_z3), ("spin", args.no_spin)) if not off]
    log = (lambda _m: None) if args.quiet or args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    opts = MatrixOptions(checkers=checkers, examples=args.examples, steps=args.steps,
                         seed=0 if args.seed is None else args.seed, log=log, jobs=args.jobs,
                         mutants=tuple(BY_NAME[n] for n in args.only) if args.only else MUTANTS)
    cells = mutant_matrix(opts)
    if args.json:
        print(json.dumps([{k: c.as_json()[k] for k in ("mutant", "checker", "verdict", "trace_length", "property",
                                                         "seconds", "trace", "detail")} for c in cells], indent=2))
    else:
        print(render_matrix(cells))
        for c in cells:
            if c.verdict == "caught" and c.checker == "z3":
                print(f"\n{c.mutant} (z3, {c.detail}):")
                print("\n".join(f"  {i:>3}. {s}" for i, s in enumerate(c.trace, 1)))
    if any(c.verdict == "missed" and c.checker in GUARANTEES for c in cells):
        return 1
    unavailable = [c for c in cells if c.verdict == "unavailable"]
    if unavailable:
        print(f"pipeproof check: the {unavailable[0].checker} column could not run: {unavailable[0].detail}",
              file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> int:
    from pipeproof.errors import ModelError
    from pipeproof.model.check.checks import CheckOptions, render_closes, render_table, run_checks

    if args.engine == "spin":
        from pipeproof.commands.export import check_with_spin

        return check_with_spin(args, _scenarios)
    if args.explain:
        return _explain(args.explain)
    if args.mutants:
        return _mutants(args)

    try:
        scenarios = _scenarios(args)
    except ModelError as exc:
        print(f"pipeproof check: {exc}", file=sys.stderr)
        return 2
    log = (lambda _m: None) if args.quiet or args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    opts = CheckOptions(
        scenarios=scenarios,  # type: ignore[arg-type]
        explorer=not args.no_explorer,
        hypothesis=not args.no_hypothesis,
        z3=not args.no_z3,
        max_states=args.max_states,
        examples=args.examples,
        steps=args.steps,
        seed=args.seed,
        log=log,
        jobs=args.jobs,
    )
    rows = run_checks(opts)
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
    else:
        print(render_table(rows))
        if not args.quiet:
            print()
            print(render_closes(opts.extra.get("covered") if opts.explorer else None))
        for r in rows:
            if r.verdict == "violated" and r.trace:
                print(f"\n{r.property} ({r.method}) violated, {r.detail}:")
                print("\n".join(f"  {i:>3}. {s}" for i, s in enumerate(r.trace, 1)))
    verdicts = {r.verdict for r in rows}
    if "violated" in verdicts:
        return 1
    if "unknown" in verdicts:
        return 2
    return 0
