"""Typing the store's failures: driver exceptions to :class:`~pipeproof.errors.StoreError` subclasses.

Every failure of the store reaches its caller as a StoreError subclass naming the operation, so
the server can answer it as the protocol says (PROTOCOL section 6: a store failure while resolving
a context closes ``try_again_later``; Transport: ``/readyz`` reports the failing check). How
it failed (timeout, unavailable, auth, pool exhausted, integrity) is read from the SQLSTATE, the
exception class or the driver's message of any link of the exception's cause chain. Messages never
contain the DSN's password, nor SQL. An exception that is not a store failure (a bug in the store)
is left to raise as it is.
"""

from __future__ import annotations

from typing import Final

import sqlalchemy.exc as sa_exc

from pipeproof.errors import (
    StoreAuthFailed,
    StoreError,
    StoreIntegrityError,
    StorePoolExhausted,
    StoreTimeout,
    StoreUnavailable,
)

# SQLSTATE classes (PostgreSQL appendix A) that say how a failure should be typed.
PG_AUTH_STATES: Final = frozenset({"28000", "28P01"})
PG_TIMEOUT_STATES: Final = frozenset({"57014", "55P03", "40P01"})
PG_UNAVAILABLE_STATES: Final = frozenset({"3D000", "57P01", "57P02", "57P03", "53300"})


def cause_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its explicit causes (SQLAlchemy wrapper -> adapter error -> driver error).

    ``__context__`` is not followed: it holds whatever was being handled when ``exc`` arose (an
    earlier, unrelated failure during a rollback, say), which would mis-type ``exc``.
    """
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        orig = getattr(current, "orig", None)
        current = current.__cause__ or (orig if isinstance(orig, BaseException) else None)
    return seen


def find_error_kind(exc: BaseException) -> type[StoreError] | None:
    """Which StoreError ``exc`` is, or None when it is not a store failure (a bug: let it raise)."""
    if isinstance(exc, StoreError):
        return type(exc)
    # SQLAlchemy's pool timeout is its own class, not the builtin TimeoutError.
    if isinstance(exc, sa_exc.TimeoutError):
        return StorePoolExhausted
    if isinstance(exc, sa_exc.IntegrityError):
        return StoreIntegrityError
    for link in cause_chain(exc):
        sqlstate = getattr(link, "sqlstate", None)
        if isinstance(sqlstate, str):
            if sqlstate in PG_AUTH_STATES:
                return StoreAuthFailed
            if sqlstate.startswith("23"):
                return StoreIntegrityError
            if sqlstate in PG_TIMEOUT_STATES:
                return StoreTimeout
            if sqlstate in PG_UNAVAILABLE_STATES or sqlstate.startswith("08"):
                return StoreUnavailable
    for link in cause_chain(exc):
        if isinstance(link, TimeoutError):  # connect timeout; checked before OSError, its base
            return StoreTimeout
        if isinstance(link, OSError):  # refused, unreachable, reset, rejected SSL upgrade
            return StoreUnavailable
        message = str(link).lower()
        if "database is locked" in message or "database is busy" in message:
            return StoreTimeout
        if "unable to open database file" in message or "readonly database" in message:
            return StoreUnavailable
        if "disk i/o error" in message or "database or disk is full" in message:
            return StoreUnavailable
        if type(link).__module__.startswith("asyncpg") and "connection" in type(link).__name__.lower():
            return StoreUnavailable
    if isinstance(exc, sa_exc.DisconnectionError):
        return StoreUnavailable
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return StoreUnavailable
    if isinstance(exc, sa_exc.DBAPIError):
        return StoreError
    return None


def describe(exc: BaseException, secret: str | None) -> str:
    """A one-line detail: the innermost driver message, never the password, never the SQL."""
    innermost = cause_chain(exc)[-1]
    message = str(innermost).splitlines()[0] if str(innermost) else ""
    detail = f"{type(innermost).__name__}: {message}" if message else type(innermost).__name__
    if secret:
        detail = detail.replace(secret, "***")
    return detail[:300]


def find_typed_error(operation: str, exc: BaseException, secret: str | None) -> StoreError | None:
    """``exc`` as the StoreError ``operation`` raises for it, or None when it is not a store failure."""
    kind = find_error_kind(exc)
    if kind is None:
        return None
    return kind(operation, describe(exc, secret))
