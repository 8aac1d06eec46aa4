"""``pipeproof token``: mint a JWT for local use (PROTOCOL section 2).

Signs with the configured key (``PIPEPROOF_JWT_SECRET``, the dev secret in dev/test, or the RS256
private key), so a token minted here is accepted by ``pipeproof serve`` with the same settings.
"""

from __future__ import annotations

import argparse
import re
import sys

HELP = "mint a JWT for a user (local testing)"

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` -> seconds; ArgumentTypeError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a positive duration: {text!r} (try 30m, 1h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, help="the token's subject")
    parser.add_argument("--account", default="default", help="account claim (connection limits per account)")
    parser.add_argument(
        "--ttl", type=parse_duration, default=3600.0, help="lifetime, e.g. 30m, 1h (default 1h)"
    )


def run(args: argparse.Namespace) -> int:
    from pipeproof.errors import ConfigError
    from pipeproof.impl.auth import mint_token
    from pipeproof.impl.settings import load_settings

    try:
        settings = load_settings()
        token = mint_token(settings, args.user, account=args.account, ttl_seconds=args.ttl)
    except ConfigError as exc:
        print(f"pipeproof token: configuration error: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0
