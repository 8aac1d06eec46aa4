"""The FastAPI reference server (PROTOCOL Transport section; sections 1-3 and 6).

:func:`create_app` builds one app with its own settings, metrics registry, audit writer, limiter
and store. Routes are thin: ``/v1/ws`` hands the socket to a
:class:`~pipeproof.impl.session.ConnectionShell` (or refuses it before the lifecycle starts with
``try_again_later`` when the server is not ready or over its memory limit, ``going_away`` when it is
shutting down); ``/healthz``, ``/readyz`` and ``/metrics`` report. :func:`uvicorn_config` is how
the server must be run: this repo's WebSocket protocol class and uvicorn's own pings disabled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from fastapi import FastAPI, Response, WebSocket
from fastapi.responses import JSONResponse

from pipeproof.protocol import CloseReason

from .audit import AuditWriter
from .auth import UserDirectory, default_directory
from .cluster import ClusterLink
from .contexts import ContextRegistry
from .events_api import install_event_routes
from .handlers import FrameHandler, LifecycleHandler, UnavailableRuns
from .limits import ConnectionLimiter, InProcessLimiter
from .memory import MemoryGuard, check_memory_limit
from .metrics import CONTENT_TYPE, Metrics
from .openapi import HEALTH_ROUTE, METRICS_ROUTE, READY_ROUTE
from .readiness import Readiness
from .session import ConnectionShell
from .settings import Settings, env_name, load_settings, validate_for_startup
from .store import Store
from .uvicorn_ws import PipeproofWebSocketProtocol

log = logging.getLogger("pipeproof.app")

READY_RETRY_SECONDS: Final = 1.0
READY_RECHECK_SECONDS: Final = 10.0


@dataclass
class ServerState:
    """Everything one app instance owns; sessions read it, nothing else mutates it."""

    settings: Settings
    metrics: Metrics
    audit: AuditWriter
    readiness: Readiness
    limiter: ConnectionLimiter
    directory: UserDirectory
    handler: FrameHandler
    contexts: ContextRegistry | None = None
    sessions: set[ConnectionShell] = field(default_factory=set)
    draining: bool = False
    memory: MemoryGuard | None = None
    cluster: ClusterLink | None = None  # several nodes on one PostgreSQL store (section 6)

    def memory_exceeded(self) -> bool:
        """The memory guard (section 6, impl/memory.py): over ``memory_limit_mb`` at the load that crossed it."""
        if self.memory is None:
            self.memory = MemoryGuard(self.settings.memory_limit_mb, lambda: len(self.sessions))
        return self.memory.exceeded()


def create_app(
    settings: Settings | None = None,
    *,
    handler: FrameHandler | None = None,
    limiter: ConnectionLimiter | None = None,
    directory: UserDirectory | None = None,
    audit: AuditWriter | None = None,
    store_opener: Callable[..., Awaitable[Store]] | None = None,
) -> FastAPI:
    """Build the app. ``settings`` default to env / .env (ConfigError on bad input); the
    handler defaults to :class:`UnavailableRuns`, the limiter to :class:`InProcessLimiter`;
    ``store_opener`` replaces :func:`~pipeproof.impl.store.open_store` (tests: a PostgreSQL schema).

    Startup (lifespan) runs :func:`validate_for_startup` (a ConfigError stops the server), opens
    the audit log, then the readiness checks; until they pass, sockets are refused with ``try_again_later`` and
    ``/readyz`` says which check fails, retried every second in the background.
    """
    s = settings if settings is not None else load_settings()
    metrics = Metrics()
    readiness = Readiness(s, metrics) if store_opener is None else Readiness(s, metrics, store_opener)
    state_box: dict[str, ServerState] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        validate_for_startup(s)
        check_memory_limit(s.memory_limit_mb, env_name("memory_limit_mb"))
        # Paths are checked by `pipeproof serve` before it listens (exit 2); an embedded app keeps
        # starting with an unusable data directory and reports it on /readyz until it is fixed.
        writer = audit if audit is not None else AuditWriter(s.resolved_audit_log())
        # Check audit_log (and Readiness.ready) reads the writer: a log that cannot be written
        # makes /readyz 503 and refuses new sockets (PROTOCOL Transport section).
        readiness.audit = writer
        state = ServerState(
            settings=s,
            metrics=metrics,
            audit=writer,
            readiness=readiness,
            limiter=limiter or InProcessLimiter(s.max_connections_per_user, s.max_connections_per_account),
            directory=directory or default_directory(s),
            handler=handler or UnavailableRuns(),
        )
        state_box["state"] = state
        app.state.pipeproof = state

        def on_open(store: Store) -> None:
            state.contexts = ContextRegistry(
                store, writer, metrics, ttl=s.context_ttl, max_per_user=s.max_connections_per_user
            )
            if store.dialect == "postgresql" and state.cluster is None:
                # PostgreSQL is the store of several nodes: this one joins them, its sockets count
                # against the limits cluster-wide (unless the embedder brought its own limiter), and
                # delivery fans out through the store (section 5, "Several nodes").
                state.cluster = ClusterLink(s, store, metrics, pg_schema=store.pg_schema)
                if limiter is None:
                    state.limiter = state.cluster
                joining = asyncio.get_running_loop().create_task(state.cluster.start(), name="cluster-join")
                joining.add_done_callback(_join_done)
            if isinstance(state.handler, LifecycleHandler):
                # Runs and delivery start with the store: unfinished events are recovered (section 6).
                state.handler.start(state, store)

        readiness.on_store_open(on_open)
        report = await readiness.check()
        if not report.ok:
            log.warning("not ready: %s failed (%s)", report.failing, report.checks.get(report.failing or ""))
        monitor = asyncio.get_running_loop().create_task(_monitor(readiness), name="readiness-monitor")
        try:
            yield
        finally:
            state.draining = True
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
            for session in list(state.sessions):
                session.begin_drain()
            await _wait_sessions(state, s.shutdown_grace)
            if isinstance(state.handler, LifecycleHandler):
                # Runs finish or fail before the store closes; unacked events stay stored (section 6).
                await state.handler.stop(s.shutdown_grace)
            if state.cluster is not None:
                # After delivery stopped: the other nodes take this node's contexts at once.
                await state.cluster.close()
            await readiness.close()
            if audit is None:
                writer.close()

    # The interactive docs and the OpenAPI document are for development; prod serves neither.
    dev = s.env != "prod"
    app = FastAPI(title="pipeproof reference server", lifespan=lifespan, docs_url="/docs" if dev else None,
                  redoc_url="/redoc" if dev else None, openapi_url="/openapi.json" if dev else None)

    @app.get("/healthz", **HEALTH_ROUTE)
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", **READY_ROUTE)
    async def readyz() -> JSONResponse:
        report = await readiness.check()
        body = report.as_json()
        state = state_box.get("state")
        guard_refuses = state is not None and state.memory_exceeded()
        if state is not None and state.memory is not None and state.memory.limit_mb is not None:
            checks = body["checks"]
            assert isinstance(checks, dict)
            checks["memory"] = state.memory.describe()
        if report.ok and guard_refuses:
            # New sockets are refused while the guard holds: /readyz says so too.
            body["status"], body["failing"] = "not_ready", "memory"
        return JSONResponse(body, status_code=200 if report.ok and not guard_refuses else 503)

    @app.get("/metrics", **METRICS_ROUTE)
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    install_event_routes(app, lambda: state_box.get("state"))

    @app.websocket("/v1/ws")
    async def ws_endpoint(ws: WebSocket) -> None:
        state = state_box["state"]
        # A refused socket still runs its lifecycle: the refusal is a declared edge of the
        # connection machine (shutdown or unavailable), audited and drawn like any close.
        await ConnectionShell(state, ws).run(refuse=_refusal(state))

    return app


def _join_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # Sockets wait for the join (ClusterLink.acquire) and are closed by their init timeout;
        # /readyz reports the store, which is what failed.
        log.error("could not join the cluster", exc_info=task.exception())


def _refusal(state: ServerState) -> CloseReason | None:
    """Why a new socket is refused as soon as it is accepted; None (no refusal) to serve it."""
    if state.draining:
        return CloseReason.GOING_AWAY
    if not state.readiness.ready or state.contexts is None or state.memory_exceeded():
        return CloseReason.TRY_AGAIN_LATER
    return None


async def _monitor(readiness: Readiness) -> None:
    """Retry the checks until ready, then re-check now and then (an idle server notices too)."""
    while True:
        await asyncio.sleep(READY_RECHECK_SECONDS if readiness.ready else READY_RETRY_SECONDS)
        await readiness.check()


async def _wait_sessions(state: ServerState, grace: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while state.sessions and loop.time() < deadline:
        await asyncio.sleep(0.02)
    if state.sessions:
        log.warning("%d sockets still open after shutdown_grace", len(state.sessions))


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> Any:
    """The uvicorn.Config to run ``app`` with: app-driven heartbeats (section 6), no 1011."""
    import uvicorn

    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "ws": PipeproofWebSocketProtocol,
        "ws_ping_interval": None,
        "ws_ping_timeout": None,
        # Frames over this are refused by the WebSocket layer with message_too_big (a declared
        # edge, recv_oversized) before they are buffered whole.
        "ws_max_size": settings.max_frame_bytes,
        "lifespan": "on",
        "log_level": "info",
        "timeout_graceful_shutdown": settings.shutdown_grace + 1.0,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


__all__ = ["ServerState", "create_app", "uvicorn_config"]
