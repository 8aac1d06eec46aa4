"""Tests for ``pipeproof token`` and ``pipeproof serve`` argument handling."""

from __future__ import annotations

import argparse

import pytest

from pipeproof.commands import serve, token
from pipeproof.impl.auth import verify_token
from pipeproof.impl.settings import load_settings


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert token.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1h", "1w", "soon"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        token.parse_duration(text)


def test_token_command_mints_a_verifiable_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    parser = argparse.ArgumentParser()
    token.configure(parser)
    assert token.run(parser.parse_args(["--user", "alice", "--account", "acme", "--ttl", "10m"])) == 0
    minted = capsys.readouterr().out.strip()
    principal = verify_token(load_settings(), minted)
    assert (principal.user, principal.account) == ("alice", "acme")
    assert principal.claims["exp"] - principal.claims["iat"] == 600


def test_serve_refuses_unsafe_production_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPEPROOF_ENV", "prod")
    monkeypatch.delenv("PIPEPROOF_JWT_SECRET", raising=False)
    parser = argparse.ArgumentParser()
    serve.configure(parser)
    assert serve.run(parser.parse_args(["--port", "0"])) == 2
    assert "PIPEPROOF_JWT_SECRET" in capsys.readouterr().err
