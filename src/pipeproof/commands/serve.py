"""``pipeproof serve``: run the reference server (PROTOCOL Transport section; DESIGN.md "Operators").

With no configuration it starts in dev mode on SQLite under ``./data`` and prints where it
listens, where the data lives and how to mint a token. Every setting comes from the environment /
``.env`` (``PIPEPROOF_*``); ``--host`` and ``--port`` override the two most common ones.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

HELP = "run the reference server (FastAPI + uvicorn)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default=None, help="interface to bind (default: PIPEPROOF_HOST or 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="port to bind (default: PIPEPROOF_PORT or 8765)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )


def run(args: argparse.Namespace) -> int:
    # Heavy imports here: ``pipeproof check`` must not pay for FastAPI and uvicorn.
    import uvicorn

    from pipeproof.errors import ConfigError
    from pipeproof.impl.app import create_app, uvicorn_config
    from pipeproof.impl.memory import check_memory_limit
    from pipeproof.impl.settings import env_name, load_settings, prepare_paths, validate_for_startup

    overrides: dict[str, object] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    try:
        settings = load_settings(**overrides)
        validate_for_startup(settings)
        check_memory_limit(settings.memory_limit_mb, env_name("memory_limit_mb"))
        prepare_paths(settings)
    except ConfigError as exc:
        print(f"pipeproof serve: configuration error: {exc}", file=sys.stderr)
        return 2
    audit = settings.resolved_audit_log()
    store_url = settings.resolved_database_url()
    where = store_url if store_url.startswith("sqlite") else store_url.split("@")[-1]
    print(f"pipeproof serve ({settings.env} mode)")
    print(f"  listening on   ws://{settings.host}:{settings.port}/v1/ws  (http: /healthz /readyz /metrics)")
    print(f"  store          {where}")
    print(f"  audit log      {audit}")
    if settings.env != "prod" and settings.jwt_secret is None:
        print("  auth           dev secret (never use in production)")
    print("  mint a token:  pipeproof token --user alice")
    sys.stdout.flush()
    from pipeproof.impl.runs import AgentRuntime

    # Runs and delivery are on: the demo agent and the shipped tools work out of the box.
    app = create_app(settings, handler=AgentRuntime())
    server = uvicorn.Server(uvicorn_config(app, settings, log_level=args.log_level))
    # uvicorn re-raises the signal after its graceful shutdown has completed.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 1
