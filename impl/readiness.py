"""Startup validation and ``GET /readyz`` (PROTOCOL Transport section; DESIGN.md "Operators").

The server accepts no socket until every check has passed, and ``/readyz`` re-runs the checks on
each request (a cheap ping and a one-row write, each under a timeout) so it turns 503 as soon as
the store becomes unreachable and 200 again when it is back. Checks, in order:

* ``config``: :func:`~pipeproof.impl.settings.validate_for_startup` passed;
* ``store_reachable``: the store opens (first time) and answers ``SELECT 1``;
* ``schema_version``: the schema is at :data:`~pipeproof.impl.store.EXPECTED_SCHEMA_VERSION`
  (opening the store applies pending migrations; a newer schema than this build fails);
* ``store_writable``: a real write commits (a read-only or full store is not ready);
* ``audit_log``: the audit log (impl/audit.py) is being written. While
  :attr:`~pipeproof.impl.audit.AuditWriter.failing` is True the check first retries the held
  lines (:meth:`~pipeproof.impl.audit.AuditWriter.flush`; on an idle server nothing else would),
  then fails with ``write_failed: <error>``. New sockets are refused from the failed write on,
  without waiting for the next check (:attr:`Readiness.ready` reads the writer live), since no
  data frame can be sent while the lines behind it are not in the log.

The report names the first failing check; for the store checks the detail is the StoreError's
code and its sanitised message (the store never puts the DSN's password in a message).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from pipeproof.errors import AuditWriteFailed, ConfigError, StoreError, StoreTimeout, StoreUnavailable

from .audit import AuditWriter
from .metrics import Metrics
from .settings import Settings, validate_for_startup
from .store import EXPECTED_SCHEMA_VERSION, Store, open_store

log = logging.getLogger("pipeproof.readiness")

CHECKS: Final = ("config", "store_reachable", "schema_version", "store_writable", "audit_log")
PROBE_TIMEOUT_CAP: Final = 2.0
"""Upper bound for one readiness probe, so /readyz answers quickly even with a long store_timeout."""

T = TypeVar("T")


@dataclass(frozen=True)
class ReadyReport:
    """``checks`` maps every check name to ``"ok"``, a failure detail, or ``"not_run"``."""

    ok: bool
    failing: str | None
    checks: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        body: dict[str, object] = {"status": "ready" if self.ok else "not_ready", "checks": self.checks}
        if self.failing is not None:
            body["failing"] = self.failing
        return body


class Readiness:
    """Owns the store handle; ``check()`` opens it on first success and re-probes it after.

    ``audit`` is the server's audit writer (set by the app's lifespan when it opens the log); with
    none, ``audit_log`` passes (there is nothing that could fail)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        opener: Callable[..., Awaitable[Store]] = open_store,
        audit: AuditWriter | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.audit = audit
        self._opener = opener
        self.store: Store | None = None
        self.last = ReadyReport(False, "store_reachable", {name: "not_run" for name in CHECKS})
        self._lock = asyncio.Lock()
        self._on_open: list[Callable[[Store], None]] = []

    @property
    def ready(self) -> bool:
        """The last report passed and the audit log is not failing now: a write that fails
        between two checks refuses new sockets at once (the monitor then re-checks every second,
        which retries the log)."""
        audit = self.audit
        return self.last.ok and (audit is None or not audit.failing)

    def on_store_open(self, callback: Callable[[Store], None]) -> None:
        self._on_open.append(callback)

    async def check(self) -> ReadyReport:
        """Run every check (one run at a time); the result is also kept in :attr:`last`."""
        async with self._lock:
            self.last = await self._run_checks()
            return self.last

    async def _probe(self, operation: str, awaitable: Awaitable[T], timeout: float) -> T:
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError:
            raise StoreTimeout(operation, f"no answer within {timeout:.1f}s") from None

    async def _run_checks(self) -> ReadyReport:
        checks = {name: "not_run" for name in CHECKS}
        probe_timeout = min(self.settings.store_timeout, PROBE_TIMEOUT_CAP)
        try:
            validate_for_startup(self.settings)
        except ConfigError as exc:
            checks["config"] = f"config_error: {exc}"
            return ReadyReport(False, "config", checks)
        checks["config"] = "ok"
        name = "store_reachable"
        try:
            if self.store is None:
                self.store = await self._open(self.settings.store_timeout + 1.0)
                for callback in self._on_open:
                    callback(self.store)
            await self._probe("ping", self.store.ping(), probe_timeout)
            checks[name] = "ok"
            name = "schema_version"
            version = await self._probe("schema_version", self.store.schema_version(), probe_timeout)
            if version != EXPECTED_SCHEMA_VERSION:
                checks[name] = f"schema_mismatch: found {version}, expected {EXPECTED_SCHEMA_VERSION}"
                return ReadyReport(False, name, checks)
            checks[name] = "ok"
            name = "store_writable"
            await self._probe("check_writable", self.store.check_writable(), probe_timeout)
            checks[name] = "ok"
        except StoreError as exc:
            self.metrics.store_errors.labels(type=exc.code).inc()
            # /readyz is unauthenticated: it names the failing check and the error's code, never
            # the driver's text (which can hold host and database names); the log has the detail.
            checks[name] = f"{exc.code}: {exc.operation}"
            if self.last.ok:
                log.warning("store became unready (%s): %s", name, exc)
            return ReadyReport(False, name, checks)
        failure = self._audit_failure()
        if failure is not None:
            checks["audit_log"] = failure
            return ReadyReport(False, "audit_log", checks)
        checks["audit_log"] = "ok"
        return ReadyReport(True, None, checks)

    def _audit_failure(self) -> str | None:
        """``write_failed: ...`` while the audit log cannot be written, else None.

        A failing writer is flushed here first: the lines it holds are retried on every flush,
        and on a server with no traffic (new sockets refused, so no transitions) this retry,
        every second from the monitor, is what notices the disk has room again.
        """
        audit = self.audit
        if audit is None or not audit.failing:
            return None
        try:
            audit.flush()
        except AuditWriteFailed as exc:
            # The writer logged the episode's start (once); this says why readiness fails.
            return f"write_failed: {exc.detail} ({exc.pending} line(s) held)"
        return None

    async def _open(self, timeout: float) -> Store:
        settings = self.settings
        try:
            return await self._probe(
                "open",
                self._opener(
                    settings.resolved_database_url(),
                    pool_size=settings.store_pool_size,
                    timeout=settings.store_timeout,
                    sqlite_synchronous=settings.sqlite_synchronous,  # ignored for PostgreSQL
                ),
                timeout,
            )
        except OSError as exc:
            # Creating the SQLite file's directory failed (a file in the way, no permission):
            # the store is unreachable, typed like every other store failure.
            raise StoreUnavailable("open", f"{type(exc).__name__}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise StoreUnavailable("open", f"unusable store URL: {exc}") from None

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()
            self.store = None


__all__ = ["CHECKS", "Readiness", "ReadyReport"]
