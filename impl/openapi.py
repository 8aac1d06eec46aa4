"""The HTTP API as documented in the OpenAPI document (docs/protocol.md, "Transport and endpoints").

The routes answer with hand-built JSON (the error body, the paging fields), so FastAPI cannot see
their shapes; these models and parameter lists describe them, and tests/impl/test_openapi.py holds
the running server to the document (schemathesis) so the two cannot drift.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from fastapi import Depends
from fastapi.security import HTTPBearer
from pydantic import BaseModel

from pipeproof.protocol import DeliveryState, EventKind
from pipeproof.protocol.names import SEQ_MAX

MAX_PAGE: Final = 1000

BEARER: Final = HTTPBearer(auto_error=False, bearerFormat="JWT",
                           description="a pipeproof JWT (section 2): `Authorization: Bearer <token>`")
"""Declares the bearer scheme in the document; the routes verify the token themselves (auth.py)."""


class ErrorDetail(BaseModel):
    code: str
    detail: str | None = None


class ErrorBody(BaseModel):
    """Every HTTP error: ``{"error": {"code": ..., "detail"?: ...}}``; ``code`` is machine-readable."""

    error: ErrorDetail


class StoredEvent(BaseModel):
    seq: int
    event_id: str
    run_id: str
    event: EventKind
    data: dict[str, Any]
    state: Literal["PENDING", "SENT", "ACKED", "ESCALATED"]
    attempt: int
    reason: str | None


class EventsPage(BaseModel):
    """The caller's own context stream after ``after`` (section 5)."""

    context_id: str | None
    last_seq: int
    events: list[StoredEvent]
    next_after: int


class EscalationsPage(BaseModel):
    """The caller's escalated events after ``after`` (section 5)."""

    context_id: str | None
    escalations: list[StoredEvent]
    next_after: int


class ReadyBody(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]
    failing: str | None = None


class HealthBody(BaseModel):
    status: Literal["alive"]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


def _int_query(name: str, lo: int, hi: int, default: int, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "integer", "minimum": lo, "maximum": hi, "default": default}}


_PAGE_PARAMS: Final = [
    _int_query("after", 0, SEQ_MAX, 0, "only entries with seq > after"),
    _int_query("limit", 1, MAX_PAGE, 100, "at most this many entries"),
]

_STREAM_ERRORS: Final = {
    400: _error("invalid_query: a query parameter is not an integer in its range"),
    401: _error("token_missing, token_malformed, token_bad_signature, token_expired, token_not_yet_valid, "
                "token_bad_audience, user_unknown (section 2)"),
    403: _error("user_disabled (section 2)"),
    404: _error("context_not_found: no such context of the caller's"),
    503: _error("not_ready or a store error code (store_unavailable, store_timeout, ...)"),
}


# A page names its context and where the next page starts: the links let a stateful client (and
# schemathesis's stateful phase) follow them into the other stream route and the next page.
_LINKS: Final = {
    "events": {"operationId": "events", "parameters": {
        "context_id": "$response.body#/context_id", "after": "$response.body#/next_after"}},
    "escalations": {"operationId": "escalations", "parameters": {"context_id": "$response.body#/context_id"}},
}


def stream_route(name: str, page: type[BaseModel], context_id: bool) -> dict[str, Any]:
    """The decorator arguments of a stream-reading route (``name`` is its operationId)."""
    params = list(_PAGE_PARAMS)
    if context_id:
        params.append({"name": "context_id", "in": "query", "required": False, "schema": {"type": "string"},
                       "description": "one of the caller's contexts (default: the live one)"})
    ok = {"model": page, "description": "a page", "links": _LINKS}
    return {"operation_id": name, "response_model": None, "responses": {200: ok, **_STREAM_ERRORS},
            "openapi_extra": {"parameters": params}, "dependencies": [Depends(BEARER)]}


READY_ROUTE: Final[dict[str, Any]] = {
    "response_model": None,
    "responses": {200: {"model": ReadyBody}, 503: {"model": ReadyBody, "description": "a check fails"}},
}
HEALTH_ROUTE: Final[dict[str, Any]] = {"response_model": None, "responses": {200: {"model": HealthBody}}}
METRICS_ROUTE: Final[dict[str, Any]] = {
    "response_model": None,
    "responses": {200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                        "description": "Prometheus text exposition format"}},
}

_ = DeliveryState  # StoredEvent.state spells the same four values

__all__ = ["BEARER", "HEALTH_ROUTE", "MAX_PAGE", "METRICS_ROUTE", "READY_ROUTE", "ErrorBody", "EscalationsPage",
           "EventsPage", "ReadyBody", "stream_route"]
