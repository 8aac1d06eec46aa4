"""``pipeproof conform ws://HOST:PORT [ws://HOST2:PORT ...]`` / ``pipeproof conform --serve``: the
conformance kit (docs/conformance.md).

Runs the live kit against a server that speaks the protocol; several URLs are the nodes of one
cluster, tested as one server (sessions spread over the nodes, placed by ``--seed``). Tokens are minted with the shared
secret (``--secret`` or ``PIPEPROOF_JWT_SECRET``) or given with ``--token USER=JWT``. The
server's declared timing comes from flags (defaults: the protocol's defaults); ``--serve``
starts the reference server in a subprocess with the small profile and tests it. Prints a
summary per property, writes JUnit XML with ``--junit``, exits 1 on a violation, 2 when the kit
cannot run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HELP = "run the conformance kit against a server (or --serve the reference)"

_TIMING_FLAGS = ("init_timeout", "ack_timeout", "ack_backoff", "ack_timeout_max", "ack_jitter", "max_attempts",
                 "resume_window", "heartbeat_interval", "preready_buffer_frames", "error_budget",
                 "max_connections_per_user", "run_max_steps", "tolerance", "slack", "context_ttl", "reply_timeout")


_FLAG_HELP = {
    "reply_timeout": "seconds the kit waits for a reply (the late bound of it: x tolerance + slack); default 3",
    "context_ttl": "the server's declared context_ttl; the expiry probe runs when it is at most 5 s",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", nargs="*",
                        help="ws://HOST:PORT of the server under test; several: the nodes of one cluster")
    parser.add_argument("--serve", action="store_true", help="start the reference server (subprocess) and test it")
    parser.add_argument("--secret", default=None, help="HS256 secret to mint tokens (default PIPEPROOF_JWT_SECRET)")
    parser.add_argument("--audience", default=None, help="the server's required aud claim, if any")
    parser.add_argument("--token", action="append", default=[], metavar="USER=JWT",
                        help="use this token for USER instead of minting (repeatable)")
    parser.add_argument("--disabled-user", default=None, help="a user the server refuses with 4403 user_disabled")
    parser.add_argument("--examples", type=int, default=None, help="Hypothesis examples (default 20)")
    parser.add_argument("--steps", type=int, default=8, help="client actions per example (default 8)")
    parser.add_argument("--budget", type=float, default=45.0,
                        help="seconds for searching and shrinking before the best trace is reported (45)")
    parser.add_argument("--random", action="store_true",
                        help="new random examples (default: derandomized); the seed is printed")
    parser.add_argument("--random-seed", type=int, default=None, metavar="N",
                        help="replay the random search of seed N (implies --random)")
    parser.add_argument("--seed", type=int, default=0,
                        help="with several URLs: which node each session goes to (the same seed, the same placement)")
    parser.add_argument("--no-runs", action="store_true", help="the server implements sections 1-3 only")
    parser.add_argument("--tolerate-overload", action="store_true",
                        help="accept 1013 try_again_later / 1001 going_away closes (loaded or draining servers)")
    parser.add_argument("--junit", type=Path, default=None, help="write JUnit XML here")
    parser.add_argument("--keep-audit", type=Path, default=None,
                        help="with --serve: copy the server's audit log here and trace-check it")
    for name in _TIMING_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=float if name not in (
            "max_attempts", "preready_buffer_frames", "error_budget", "max_connections_per_user", "run_max_steps")
            else int, default=None, help=_FLAG_HELP.get(name, f"the server's declared {name}"))


def run(args: argparse.Namespace) -> int:
    import shutil

    from pipeproof.conformance.errors import KitError, TraceUnreadable
    from pipeproof.conformance.kit import Target, run_kit
    from pipeproof.conformance.report import text_summary, write_junit
    from pipeproof.conformance.serve import DISABLED_USER, ServedServer
    from pipeproof.conformance.timing import SMALL, Timing
    from pipeproof.conformance.tracecheck import ModelParams, check_file
    from pipeproof.conformance.wire import Tokens

    if args.serve == bool(args.url):
        print("pipeproof conform: give ws://HOST:PORT URL(s) or --serve (not both)", file=sys.stderr)
        return 2
    given: dict[str, str] = {}
    for item in args.token:
        user, sep, tok = item.partition("=")
        if not sep:
            print(f"pipeproof conform: --token wants USER=JWT, got {item!r}", file=sys.stderr)
            return 2
        given[user] = tok
    base = SMALL if args.serve else Timing()
    timing = base.with_(**{n: getattr(args, n) for n in _TIMING_FLAGS})
    server: ServedServer | None = None
    secret: str | None
    try:
        if args.serve:
            server = ServedServer(timing).start()
            nodes, secret, disabled = [server.url], server.secret, DISABLED_USER
            print(f"pipeproof conform: reference server on {server.url} "
                  f"(pid {server.proc.pid if server.proc else '?'})")
        else:
            nodes = [str(u) for u in args.url]
            secret = args.secret or os.environ.get("PIPEPROOF_JWT_SECRET")
            disabled = args.disabled_user
            if secret is None and not given:
                print("pipeproof conform: need --secret (or PIPEPROOF_JWT_SECRET) or --token USER=JWT",
                      file=sys.stderr)
                return 2
        target = Target(nodes[0], Tokens(secret, args.audience, given=given), timing,
                        tolerate_overload=args.tolerate_overload, runs=not args.no_runs, disabled_user=disabled,
                        cluster=tuple(nodes[1:]), seed=args.seed)
        url = " ".join(nodes)
        result = run_kit(target, examples=args.examples or 20, steps=args.steps, randomize=args.random,
                         budget=args.budget, random_seed=args.random_seed)
        print(text_summary(result, url))
        if args.junit is not None:
            write_junit(result, args.junit, url)
        code = 0 if result.ok else 1
        if server is not None and args.keep_audit is not None:
            server.stop()
            shutil.copyfile(server.audit_log, args.keep_audit)
            report = check_file(args.keep_audit, ModelParams(
                timing.preready_buffer_frames, timing.max_attempts, timing.max_connections_per_user,
                timing.run_max_steps, timing.error_budget))
            verdict = "ok" if report.ok else f"VIOLATION at line {report.line_no}"
            print(f"trace-check {args.keep_audit}: {verdict} ({report.lines} lines)")
            if report.violation is not None:
                print(report.violation.render())
                code = 1
        return code
    except (KitError, TraceUnreadable) as exc:
        print(f"pipeproof conform: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.close()
