"""``GET /v1/events?after=SEQ`` and ``GET /v1/escalations`` (PROTOCOL Transport section; section 5).

The polling fallback and recovery view of a context's durable stream: the same events, seqs and
states the socket delivers. Auth is ``Authorization: Bearer <token>`` with the section-2 codes
(401, or 403 ``user_disabled``). A user reads only their own context: the live one by default,
or ``context_id=`` one of their own earlier contexts; anyone else's context answers 404
``context_not_found``, exactly like one that does not exist (section 3). Bad query parameters
answer 400 ``invalid_query``. Every error body is ``{"error":{"code":...,"detail":...}}``.
Reading the stream acks nothing: only a client ``ack`` (or a resume) does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pipeproof.errors import StoreError
from pipeproof.protocol.names import ID_MAX, SEQ_MAX

from .auth import AuthError, authenticate, bearer_token
from .openapi import MAX_PAGE, EscalationsPage, EventsPage, stream_route
from .store import ContextInfo, EventRecord, Store

if TYPE_CHECKING:
    from .app import ServerState



class _HttpError(Exception):
    def __init__(self, status: int, code: str, detail: str = "") -> None:
        self.status = status
        self.code = code
        self.detail = detail
        super().__init__(f"{status} {code}")


def _error(exc: _HttpError) -> JSONResponse:
    body: dict[str, Any] = {"code": exc.code}
    if exc.detail:
        body["detail"] = exc.detail
    return JSONResponse({"error": body}, status_code=exc.status)


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _HttpError(400, "invalid_query", f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise _HttpError(400, "invalid_query", f"{name} must be between {lo} and {hi}")
    return value


def event_json(record: EventRecord) -> dict[str, Any]:
    return {
        "seq": record.seq,
        "event_id": record.event_id,
        "run_id": record.run_id,
        "event": record.kind,
        "data": dict(record.data),
        "state": record.state.value,
        "attempt": record.attempt,
        "reason": record.reason,
    }


async def _caller_context(state: ServerState | None, request: Request) -> tuple[Store, ContextInfo | None]:
    if state is None or state.contexts is None:
        raise _HttpError(503, "not_ready", "the store is not open yet")
    try:
        token = bearer_token(request.headers.get("authorization"))
        principal = await authenticate(state.settings, token, state.directory)
    except AuthError as exc:
        raise _HttpError(exc.http_status, exc.code) from None
    store = state.contexts.store
    wanted = request.query_params.get("context_id")
    if wanted is None:
        return store, await store.find_live_context(principal.user)
    if len(wanted) > ID_MAX or "\x00" in wanted:
        # No context has such an id, and no store is asked about it (PostgreSQL refuses NUL in text).
        raise _HttpError(404, "context_not_found", "no such context")
    info = await store.find_context(wanted)
    if info is None or info.user_id != principal.user:
        raise _HttpError(404, "context_not_found", "no such context")
    return store, info


def install_event_routes(app: FastAPI, get_state: Callable[[], ServerState | None]) -> None:
    """Add the two stream-reading routes to ``app``."""

    @app.get("/v1/events", **stream_route("events", EventsPage, context_id=True))
    async def events_route(request: Request) -> JSONResponse:
        try:
            after = _int_param(request, "after", 0, 0, SEQ_MAX)
            limit = _int_param(request, "limit", 100, 1, MAX_PAGE)
            store, info = await _caller_context(get_state(), request)
            if info is None:
                return JSONResponse({"context_id": None, "last_seq": 0, "events": [], "next_after": after})
            records = await store.events_after(info.context_id, after, limit)
        except _HttpError as exc:
            return _error(exc)
        except StoreError as exc:
            return _error(_HttpError(503, exc.code, exc.operation))
        return JSONResponse(
            {
                "context_id": info.context_id,
                "last_seq": info.last_seq,
                "events": [event_json(r) for r in records],
                "next_after": records[-1].seq if records else after,
            }
        )

    @app.get("/v1/escalations", **stream_route("escalations", EscalationsPage, context_id=True))
    async def escalations_route(request: Request) -> JSONResponse:
        try:
            after = _int_param(request, "after", 0, 0, SEQ_MAX)
            limit = _int_param(request, "limit", 100, 1, MAX_PAGE)
            store, info = await _caller_context(get_state(), request)
            if info is None:
                return JSONResponse({"context_id": None, "escalations": [], "next_after": after})
            # Escalations are few (each is an incident), so the page is cut here, in seq order.
            records = [r for r in await store.escalations(info.context_id) if r.seq > after][:limit]
        except _HttpError as exc:
            return _error(exc)
        except StoreError as exc:
            return _error(_HttpError(503, exc.code, exc.operation))
        return JSONResponse({"context_id": info.context_id, "escalations": [event_json(r) for r in records],
                             "next_after": records[-1].seq if records else after})


__all__ = ["event_json", "install_event_routes"]
