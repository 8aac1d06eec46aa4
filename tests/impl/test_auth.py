"""Tests for pipeproof.impl.auth: one specific code per failure (PROTOCOL section 2)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pipeproof.errors import ProtocolError
from pipeproof.impl.auth import (
    AUTH_CODES,
    AuthError,
    Principal,
    StaticUserDirectory,
    UserDirectory,
    authenticate,
    bearer_token,
    default_directory,
    mint_token,
    verify_token,
)
from pipeproof.impl.settings import DEV_JWT_SECRET, Settings

SECRET = "q7Vn-2xLp9!Rz4@Wm8#Tb3$Kc6%Hd1^Fg5&"
OTHER_SECRET = "a1B2-c3D4!e5F6@g7H8#i9J0$k1L2%m3N4^"
NOW = 1_700_000_000.0


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"env": "test", "jwt_secret": SECRET}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def raw_token(claims: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def expect(code: str, settings: Settings, token: Any, now: float | None = NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        verify_token(settings, token, now=now)
    err = info.value
    assert err.code == code
    assert err.reason == code
    if code == "user_disabled":
        assert (err.close_code, err.http_status) == (4403, 403)
    else:
        assert (err.close_code, err.http_status) == (4401, 401)
    assert isinstance(err, ProtocolError)
    # Reasons and details never carry the key or the raw token.
    assert SECRET not in str(err)
    if isinstance(token, str) and len(token) > 20:
        assert token not in str(err)
    return err


def test_round_trip_gives_the_principal() -> None:
    s = make_settings()
    token = mint_token(s, "alice", account="acme", now=NOW, role="admin")
    principal = verify_token(s, token, now=NOW + 10)
    assert principal == Principal("alice", "acme", principal.claims)
    assert principal.claims["role"] == "admin"
    assert principal.claims["iat"] == principal.claims["nbf"] == int(NOW)
    assert principal.claims["exp"] == int(NOW) + 3600
    with pytest.raises(TypeError):
        principal.claims["sub"] = "mallory"  # type: ignore[index]


def test_account_defaults_to_default() -> None:
    s = make_settings()
    assert verify_token(s, mint_token(s, "bob", now=NOW), now=NOW).account == "default"
    no_account = raw_token({"sub": "bob", "exp": int(NOW) + 60})
    assert verify_token(s, no_account, now=NOW).account == "default"


def test_dev_secret_is_used_when_none_is_configured() -> None:
    s = make_settings(jwt_secret=None)
    token = mint_token(s, "alice", now=NOW)
    claims = jwt.decode(token, DEV_JWT_SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["sub"] == "alice"
    assert verify_token(s, token, now=NOW).user == "alice"


def test_every_code_is_tested() -> None:
    # Guard: the parametrised cases below must cover the whole section-2 list.
    covered = {"token_missing", "token_malformed", "token_bad_signature", "token_expired"}
    covered |= {"token_not_yet_valid", "token_bad_audience", "user_unknown", "user_disabled"}
    assert covered == set(AUTH_CODES)


@pytest.mark.parametrize("token", [None, "", "   "])
def test_token_missing(token: str | None) -> None:
    expect("token_missing", make_settings(), token)


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b.c",
        12345,
    ],
)
def test_token_malformed(token: Any) -> None:
    expect("token_malformed", make_settings(), token)


def test_token_malformed_claims() -> None:
    s = make_settings()
    # Correctly signed, but the payload is not JSON.
    expect("token_malformed", s, jwt.api_jws.PyJWS().encode(b"not json", SECRET, algorithm="HS256"))
    # Signed correctly but without the required exp claim.
    expect("token_malformed", s, raw_token({"sub": "alice"}))
    # A non-numeric time claim.
    expect("token_malformed", s, raw_token({"sub": "alice", "exp": "tomorrow"}))
    expect("token_malformed", s, raw_token({"sub": "alice", "exp": "tomorrow"}), now=None)
    # A non-string account.
    expect("token_malformed", s, raw_token({"sub": "alice", "exp": int(NOW) + 60, "account": 7}))


def test_token_bad_signature() -> None:
    s = make_settings()
    expect("token_bad_signature", s, mint_token(make_settings(jwt_secret=OTHER_SECRET), "alice", now=NOW))
    # Tampered payload, original signature.
    header, _payload, sig = mint_token(s, "alice", now=NOW).split(".")
    forged_payload = mint_token(s, "root", now=NOW).split(".")[1]
    expect("token_bad_signature", s, f"{header}.{forged_payload}.{sig}")


def test_unaccepted_algorithms_are_bad_signatures() -> None:
    s = make_settings()
    unsigned = jwt.encode({"sub": "alice", "exp": int(NOW) + 60}, None, algorithm="none")  # type: ignore[arg-type]
    expect("token_bad_signature", s, unsigned)
    hs512 = jwt.encode({"sub": "alice", "exp": int(NOW) + 60}, SECRET * 2, algorithm="HS512")
    expect("token_bad_signature", s, hs512)


@pytest.mark.parametrize("now", [NOW, None], ids=["explicit-now", "wall-clock"])
def test_token_expired(now: float | None) -> None:
    s = make_settings()
    base = NOW if now is not None else time.time()
    token = mint_token(s, "alice", ttl_seconds=60, now=base - 120)
    expect("token_expired", s, token, now=now)


def test_expiry_boundary_is_exact_with_zero_leeway() -> None:
    s = make_settings()
    token = mint_token(s, "alice", ttl_seconds=60, now=NOW)
    assert verify_token(s, token, now=NOW + 59.999).user == "alice"
    expect("token_expired", s, token, now=NOW + 60)  # exp <= now is expired (RFC 7519 4.1.4)


@pytest.mark.parametrize("now", [NOW, None], ids=["explicit-now", "wall-clock"])
def test_token_not_yet_valid(now: float | None) -> None:
    s = make_settings()
    base = NOW if now is not None else time.time()
    nbf_future = raw_token({"sub": "alice", "nbf": int(base) + 600, "exp": int(base) + 3600})
    expect("token_not_yet_valid", s, nbf_future, now=now)
    iat_future = raw_token({"sub": "alice", "iat": int(base) + 600, "exp": int(base) + 3600})
    expect("token_not_yet_valid", s, iat_future, now=now)


def test_nbf_boundary() -> None:
    s = make_settings()
    token = raw_token({"sub": "alice", "nbf": int(NOW), "exp": int(NOW) + 60})
    expect("token_not_yet_valid", s, token, now=NOW - 0.5)
    assert verify_token(s, token, now=NOW).user == "alice"


def test_token_bad_audience() -> None:
    s = make_settings(jwt_audience="pipeproof")
    assert mint_token(s, "alice", now=NOW) and verify_token(s, mint_token(s, "alice", now=NOW), now=NOW)
    wrong = mint_token(make_settings(jwt_audience="someone-else"), "alice", now=NOW)
    expect("token_bad_audience", s, wrong)
    missing = mint_token(make_settings(), "alice", now=NOW)
    expect("token_bad_audience", s, missing)
    # A token scoped to an audience is refused by a server that has none configured.
    expect("token_bad_audience", make_settings(), wrong)


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": int(NOW) + 60},
        {"sub": "", "exp": int(NOW) + 60},
        {"sub": "   ", "exp": int(NOW) + 60},
        {"sub": 42, "exp": int(NOW) + 60},
        {"sub": None, "exp": int(NOW) + 60},
    ],
    ids=["absent", "empty", "blank", "int", "null"],
)
def test_user_unknown(claims: dict[str, Any]) -> None:
    expect("user_unknown", make_settings(), raw_token(claims))


def test_user_disabled_from_settings() -> None:
    s = make_settings(disabled_users=["mallory"])
    expect("user_disabled", s, mint_token(s, "mallory", now=NOW))
    assert verify_token(s, mint_token(s, "alice", now=NOW), now=NOW).user == "alice"


async def test_authenticate_consults_the_directory() -> None:
    s = make_settings()
    directory = StaticUserDirectory(disabled=["mallory"], known=["alice", "mallory"])
    assert isinstance(directory, UserDirectory)
    assert (await authenticate(s, mint_token(s, "alice", now=NOW), directory, now=NOW)).user == "alice"

    with pytest.raises(AuthError) as info:
        await authenticate(s, mint_token(s, "mallory", now=NOW), directory, now=NOW)
    assert (info.value.code, info.value.close_code, info.value.http_status) == ("user_disabled", 4403, 403)

    with pytest.raises(AuthError) as info:
        await authenticate(s, mint_token(s, "eve", now=NOW), directory, now=NOW)
    assert (info.value.code, info.value.close_code, info.value.http_status) == ("user_unknown", 4401, 401)

    # Token problems surface before any directory lookup.
    with pytest.raises(AuthError) as info:
        await authenticate(s, None, directory, now=NOW)
    assert info.value.code == "token_missing"


async def test_default_directory_accepts_any_signed_user_except_disabled() -> None:
    s = make_settings(disabled_users=["mallory"])
    directory = default_directory(s)
    assert await directory.status("anyone-at-all") == "active"
    assert await directory.status("mallory") == "disabled"
    principal = await authenticate(s, mint_token(s, "newcomer", now=NOW), now=NOW)
    assert principal.user == "newcomer"


def test_rs256_round_trip_and_algorithm_confusion() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    s = make_settings(jwt_algorithm="RS256", jwt_public_key=public, jwt_private_key=private)
    assert verify_token(s, mint_token(s, "alice", now=NOW), now=NOW).user == "alice"
    # An HS256 token (even one keyed with the public key text) is refused by an RS256 server.
    expect("token_bad_signature", s, mint_token(make_settings(), "alice", now=NOW))


def test_auth_error_is_a_protocol_error_with_the_code_as_reason() -> None:
    err = AuthError("token_expired", "detail for logs")
    assert isinstance(err, ProtocolError)
    assert (err.close_code, err.reason, err.http_status) == (4401, "token_expired", 401)
    assert str(err).startswith("4401 token_expired")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer   abc", "abc"),
        ("Bearer ", None),
    ],
)
def test_bearer_token(header: str | None, expected: str | None) -> None:
    assert bearer_token(header) == expected


@pytest.mark.parametrize("header", ["Basic dXNlcjpwdw==", "abc.def.ghi", "Token abc.def.ghi"])
def test_another_scheme_or_a_bare_token_is_malformed_not_missing(header: str) -> None:
    with pytest.raises(AuthError) as refused:
        bearer_token(header)
    assert refused.value.code == "token_malformed"
