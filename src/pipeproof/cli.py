"""The ``pipeproof`` command line: one sub-command per module in ``pipeproof.commands``.

Each command module exposes ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``
(the exit code). Modules are imported only when their command runs, so ``pipeproof check`` does
not pay for FastAPI and ``pipeproof serve`` does not pay for Z3.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "check": ("pipeproof.commands.check", "run the model checkers and print the verdict table"),
    "diagrams": ("pipeproof.commands.diagrams", "draw the machines, counterexamples and protocol into diagrams/"),
    "serve": ("pipeproof.commands.serve", "run the reference server (FastAPI + uvicorn)"),
    "token": ("pipeproof.commands.token", "mint a JWT for a user (local testing)"),
    "conform": ("pipeproof.commands.conform", "run the conformance kit against a server (or --serve the reference)"),
    "trace-check": ("pipeproof.commands.trace_check", "check a JSONL audit log against the model"),
    "export": ("pipeproof.commands.export", "write the composed model as Promela for SPIN"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeproof", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = importlib.import_module(args._module).run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
