"""JWT authentication with one specific error per failure (PROTOCOL section 2).

Public surface:

* :func:`mint_token` signs a token for a user (tests, the conformance kit, operators' tooling);
* :func:`verify_token` checks a token synchronously and returns a :class:`Principal`, or raises an
  :class:`AuthError` whose ``code`` is the close reason / HTTP error code of section 2;
* :func:`authenticate` is :func:`verify_token` plus an asynchronous :class:`UserDirectory` lookup
  (``user_unknown`` / ``user_disabled``), which is what the WebSocket and HTTP handlers call;
* :func:`bearer_token` extracts the token from an ``Authorization`` header.

Every failure is an :class:`AuthError`; nothing here returns ``None`` to mean "rejected".
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol, runtime_checkable

import jwt

from pipeproof.errors import ConfigError, ProtocolError
from pipeproof.protocol import AuthCode, CloseReason
from pipeproof.protocol.names import USER_MAX

from .settings import Settings, effective_jwt_secret, env_name

AUTH_CODES: Final[tuple[AuthCode, ...]] = tuple(AuthCode)

DEFAULT_ACCOUNT: Final = "default"
LEEWAY_SECONDS: Final = 0.0
"""Clock-skew allowance; zero so expiry in tests and in the model is exact."""

UserStatus = Literal["active", "disabled", "unknown"]


class AuthError(ProtocolError):
    """A token or user was rejected (PROTOCOL section 2).

    ``code`` is the section-2 code and doubles as the close reason (protocol/closes.py gives its
    close code); ``http_status`` is the HTTP status of the same refusal (401 or 403). ``detail`` is
    for logs only and never holds the token or the key.
    """

    def __init__(self, code: AuthCode | str, detail: str = "") -> None:
        self.code: AuthCode = AuthCode(code)  # ValueError for a code section 2 does not define
        close = CloseReason.for_auth(self.code)
        status = close.code.http_status
        if status is None:
            raise ValueError(f"{code} has no HTTP status")
        self.http_status = status
        super().__init__(close, detail)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's ``sub`` and ``account`` plus every verified claim."""

    user: str
    account: str
    claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@runtime_checkable
class UserDirectory(Protocol):
    """Who may connect (PROTOCOL section 2: ``user_unknown`` vs ``user_disabled``)."""

    async def status(self, user: str) -> UserStatus:
        """``"active"``, ``"disabled"`` (``user_disabled``) or ``"unknown"`` (``user_unknown``)."""
        ...


class StaticUserDirectory:
    """A directory held in memory.

    With ``known=None`` (the default server behaviour) any user carried by a validly signed token
    is active unless listed in ``disabled``: the token issuer is the source of truth for users.
    With a ``known`` set, users outside it are ``unknown``.
    """

    def __init__(self, disabled: Iterable[str] = (), known: Iterable[str] | None = None) -> None:
        self._disabled = frozenset(disabled)
        self._known = None if known is None else frozenset(known)

    async def status(self, user: str) -> UserStatus:
        if user in self._disabled:
            return "disabled"
        if self._known is not None and user not in self._known:
            return "unknown"
        return "active"


def default_directory(settings: Settings) -> StaticUserDirectory:
    """The server's directory: everyone active except ``PIPEPROOF_DISABLED_USERS``."""
    return StaticUserDirectory(disabled=settings.disabled_users)


def _signing_key(settings: Settings) -> str:
    if settings.jwt_algorithm == "HS256":
        return effective_jwt_secret(settings)
    if settings.jwt_private_key is None:
        raise ConfigError(env_name("jwt_private_key"), "required to mint RS256 tokens")
    return settings.jwt_private_key


def _verification_key(settings: Settings) -> str:
    if settings.jwt_algorithm == "HS256":
        return effective_jwt_secret(settings)
    if settings.jwt_public_key is None:
        raise ConfigError(env_name("jwt_public_key"), "required to verify RS256 tokens")
    return settings.jwt_public_key


def mint_token(
    settings: Settings,
    user: str,
    account: str = DEFAULT_ACCOUNT,
    ttl_seconds: float = 3600.0,
    now: float | None = None,
    **extra_claims: Any,
) -> str:
    """Sign a token for ``user`` with claims ``sub``, ``account``, ``iat``, ``nbf``, ``exp``
    (and ``aud`` when ``jwt_audience`` is configured). ``extra_claims`` override or add claims,
    which is how tests build tokens with odd claims.

    Times are whole seconds (RFC 7519 NumericDate): ``iat``/``nbf`` round down so a token is valid
    at ``now``; ``exp`` rounds down too so the token never outlives ``ttl_seconds``.
    """
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {
        "sub": user,
        "account": account,
        "iat": math.floor(issued),
        "nbf": math.floor(issued),
        "exp": math.floor(issued + ttl_seconds),
    }
    if settings.jwt_audience is not None:
        claims["aud"] = settings.jwt_audience
    claims.update(extra_claims)
    return jwt.encode(claims, _signing_key(settings), algorithm=settings.jwt_algorithm)


def _check_times(claims: Mapping[str, Any], now: float) -> None:
    """PyJWT's own time rules, evaluated at a caller-supplied ``now`` (PyJWT only reads the clock).

    Raises PyJWT's exception types so one mapping (``_map_pyjwt``) serves both paths.
    """
    for name in ("iat", "nbf", "exp"):
        if name in claims:
            value = claims[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise jwt.DecodeError(f"{name} claim must be a number")
    if "iat" in claims and int(claims["iat"]) > now + LEEWAY_SECONDS:
        raise jwt.ImmatureSignatureError("The token is not yet valid (iat)")
    if "nbf" in claims and int(claims["nbf"]) > now + LEEWAY_SECONDS:
        raise jwt.ImmatureSignatureError("The token is not yet valid (nbf)")
    if "exp" in claims and int(claims["exp"]) <= now - LEEWAY_SECONDS:
        raise jwt.ExpiredSignatureError("Signature has expired")


def _map_pyjwt(exc: jwt.PyJWTError) -> AuthError:
    """One PyJWT exception -> one section-2 code. Order matters: subclasses before their bases."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, jwt.ExpiredSignatureError):
        return AuthError(AuthCode.TOKEN_EXPIRED, detail)
    if isinstance(exc, jwt.ImmatureSignatureError):
        return AuthError(AuthCode.TOKEN_NOT_YET_VALID, detail)
    if isinstance(exc, jwt.InvalidAudienceError):
        return AuthError(AuthCode.TOKEN_BAD_AUDIENCE, detail)
    if isinstance(exc, jwt.MissingRequiredClaimError):
        if exc.claim == "aud":
            return AuthError(AuthCode.TOKEN_BAD_AUDIENCE, detail)
        if exc.claim == "sub":
            return AuthError(AuthCode.USER_UNKNOWN, detail)
        return AuthError(AuthCode.TOKEN_MALFORMED, detail)
    if isinstance(exc, jwt.exceptions.InvalidSubjectError):
        return AuthError(AuthCode.USER_UNKNOWN, detail)
    # A token signed with an algorithm we do not accept (``none``, HS/RS confusion) cannot be
    # verified with our key: that is a signature failure, not a parse failure.
    if isinstance(exc, jwt.InvalidSignatureError | jwt.InvalidAlgorithmError):
        return AuthError(AuthCode.TOKEN_BAD_SIGNATURE, detail)
    if isinstance(exc, jwt.InvalidIssuedAtError | jwt.DecodeError | jwt.InvalidTokenError):
        return AuthError(AuthCode.TOKEN_MALFORMED, detail)
    return AuthError(AuthCode.TOKEN_MALFORMED, detail)


def verify_token(settings: Settings, token: str | None, now: float | None = None) -> Principal:
    """Verify ``token`` and return its :class:`Principal` (PROTOCOL section 2).

    Checks, in PyJWT's order: structure, signature (only ``settings.jwt_algorithm`` is accepted),
    required ``exp`` and ``sub``, ``iat``/``nbf``/``exp`` against ``now`` with zero leeway
    (``now=None`` lets PyJWT read the clock itself), audience (a configured ``jwt_audience`` must
    match; a token carrying ``aud`` when none is configured is rejected too, as PyJWT does), then
    ``sub`` non-empty string, ``account`` string (absent means ``"default"``), and
    ``PIPEPROOF_DISABLED_USERS``. Raises :class:`AuthError`; ConfigError if keys are missing.
    """
    if token is None or (isinstance(token, str) and token.strip() == ""):
        raise AuthError(AuthCode.TOKEN_MISSING)
    if not isinstance(token, str):
        raise AuthError(AuthCode.TOKEN_MALFORMED, f"token is a {type(token).__name__}, not a string")
    check_clock = now is None
    options: dict[str, Any] = {
        "require": ["exp", "sub"],
        "verify_exp": check_clock,
        "verify_nbf": check_clock,
        "verify_iat": check_clock,
    }
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            _verification_key(settings),
            algorithms=[settings.jwt_algorithm],
            audience=settings.jwt_audience,
            options=options,  # type: ignore[arg-type]  # PyJWT types options as a TypedDict
            leeway=LEEWAY_SECONDS,
        )
        if now is not None:
            _check_times(claims, now)
    except jwt.PyJWTError as exc:
        raise _map_pyjwt(exc) from None
    user = claims.get("sub")
    if isinstance(user, str) and (len(user) > USER_MAX or "\x00" in user):
        raise AuthError(AuthCode.USER_UNKNOWN, "sub is not a valid user id (length or NUL)")
    if not isinstance(user, str) or user.strip() == "":
        raise AuthError(AuthCode.USER_UNKNOWN, "sub is empty or not a string")
    account = claims.get("account", DEFAULT_ACCOUNT)
    if not isinstance(account, str) or account == "" or len(account) > USER_MAX or "\x00" in account:
        raise AuthError(AuthCode.TOKEN_MALFORMED, "account claim is empty, too long, contains NUL or is not a string")
    if user in settings.disabled_users:
        raise AuthError(AuthCode.USER_DISABLED)
    return Principal(user=user, account=account, claims=MappingProxyType(dict(claims)))


async def authenticate(
    settings: Settings,
    token: str | None,
    directory: UserDirectory | None = None,
    now: float | None = None,
) -> Principal:
    """:func:`verify_token`, then ask ``directory`` (default: :func:`default_directory`) about the user.

    ``"unknown"`` raises ``user_unknown``, ``"disabled"`` raises ``user_disabled`` (their codes: protocol/closes.py).
    """
    principal = verify_token(settings, token, now=now)
    lookup = directory if directory is not None else default_directory(settings)
    status = await lookup.status(principal.user)
    if status == "disabled":
        raise AuthError(AuthCode.USER_DISABLED)
    if status == "unknown":
        raise AuthError(AuthCode.USER_UNKNOWN, "not in the user directory")
    return principal


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; ``None`` when there is none.

    ``None`` here means "absent" (then :func:`verify_token` raises ``token_missing``). Any other
    scheme, or a bare token with no scheme, is ``token_malformed`` (section 2, HTTP auth).
    """
    if authorization is None or authorization.strip() == "":
        return None
    scheme, _, rest = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError(AuthCode.TOKEN_MALFORMED, "the Authorization header must be 'Bearer <token>'")
    return rest.strip() or None
