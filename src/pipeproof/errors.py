"""The error tree: one root, a branch per kind of failure a caller can catch whole.

``PipeproofError``
    ``ModelError``: the model itself is wrong (a declaration, or an encoding that disagrees with it)
        ``ModelDefinitionError``: a machine declaration breaks a structural rule (raised when defined)
    ``ProtocolError``: a runtime refusal; ``close`` is the close it implies (like h11's
    ``error_status_hint``), a member of :class:`pipeproof.protocol.CloseReason`
        ``IllegalTransition``: one of our machines refused an event: the server's own bug, so its
        close is ``internal_error`` unless the caller says otherwise
        peer violations, raised where the wire is read: ``InvalidMessage``, ``AuthError``,
        ``ConnectionLimitExceeded``, ``CloseRequested`` (protocol/frames.py, impl/)
    ``StoreError``: the durable store failed; each subclass says how (docs/protocol.md section 3)
        ``LeaseLost``: the store refused a run's write: another node holds its lease (section 6)
    ``AuditWriteFailed``: the audit log could not be written; its lines are kept for a retry
    ``ConfigError``: a setting is invalid or unsafe
    ``RunRejected``: a run.start failed a prerequisite (section 4); ``code`` is the error frame's

Messages name the machine, the state and the rule (or the store operation), never a secret. No
function returns None to mean failure: it raises one of these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeproof.protocol.closes import CloseReason


class PipeproofError(Exception):
    """Root of every error pipeproof raises on purpose."""


class ModelError(PipeproofError):
    """The model (or a variant of it, or an encoding derived from it) is inconsistent."""


class ModelDefinitionError(ModelError):
    """A machine declaration is malformed; raised when the machine is defined.

    Carries the machine name, the offending state (if any) and the rule that was broken so the
    message reads like ``machine 'connection', state 'DRAINING': dead end (rule: no_dead_end)``.
    """

    def __init__(self, machine: str, rule: str, detail: str, state: str | None = None) -> None:
        self.machine = machine
        self.rule = rule
        self.state = state
        self.detail = detail
        where = f"machine {machine!r}" + (f", state {state!r}" if state is not None else "")
        super().__init__(f"{where}: {detail} (rule: {rule})")


class ProtocolError(PipeproofError):
    """A runtime refusal. ``close`` is the close the socket gets for it (its ``code`` and reason)."""

    def __init__(self, close: CloseReason, detail: str = "") -> None:
        self.close = close
        self.detail = detail
        super().__init__(f"{close.describe()}" + (f": {detail}" if detail else ""))

    @property
    def close_code(self) -> int:
        return int(self.close.code)

    @property
    def reason(self) -> str:
        return self.close.value


class IllegalTransition(ProtocolError):
    """An event was fired where the machine's declaration has no enabled transition.

    At runtime this is the server's own mistake (a peer's bad frame is a *declared* transition),
    so the implied close is ``internal_error`` unless ``close`` says otherwise. It is never
    swallowed: the server counts it, logs it and closes with that code.
    """

    def __init__(self, machine: str, event: str, state: str, detail: str = "",
                 close: CloseReason | None = None) -> None:
        from pipeproof.protocol.closes import CloseReason

        self.machine = machine
        self.event = event
        self.state = state
        suffix = f": {detail}" if detail else ""
        super().__init__(close or CloseReason.INTERNAL_ERROR, detail)
        self.args = (f"machine {machine!r}: event {event!r} is not allowed in state {state!r}{suffix}",)

    def __str__(self) -> str:
        return str(self.args[0])


class StoreError(PipeproofError):
    """The durable store failed. ``operation`` names what was being done; never the DSN's secret."""

    code = "store_error"

    def __init__(self, operation: str, detail: str = "") -> None:
        self.operation = operation
        self.detail = detail
        super().__init__(f"{self.code} during {operation}" + (f": {detail}" if detail else ""))


class StoreTimeout(StoreError):
    code = "store_timeout"


class StoreUnavailable(StoreError):
    code = "store_unavailable"


class StoreAuthFailed(StoreError):
    code = "store_auth_failed"


class StorePoolExhausted(StoreError):
    code = "store_pool_exhausted"


class StoreIntegrityError(StoreError):
    code = "store_integrity_error"


class LeaseLost(StoreError):
    """This node no longer holds the lease of the runs ``run_ids`` (section 6, "When a node dies").

    Another node took them over after their lease expired (this node was stalled or cut off from
    the store for longer than the lease TTL), and that node ends them: this one must append nothing
    more for them. Raised by an append the store refused for that reason (nothing of it was
    stored), and by a renewal that found the lease gone before a run's next step fired.
    """

    code = "lease_lost"

    def __init__(self, operation: str, detail: str, run_ids: frozenset[str] = frozenset()) -> None:
        self.run_ids = run_ids
        super().__init__(operation, detail)


class StoreRollbackFailed(StoreError):
    """A rollback itself failed: the transaction's outcome is unknown, so this is escalated, not logged."""

    code = "store_rollback_failed"


class AuditWriteFailed(PipeproofError):
    """The audit log could not be written (disk full, a closed pipe...); never swallowed.

    The transitions it records have happened, so their lines are not dropped: they stay buffered
    in order and every flush retries them first. ``AuditWriter.flush`` raises this until a write
    succeeds (the socket sender then sends no data frame), ``AuditWriter.failing`` says so and
    readiness fails; ``AuditWriter.record`` does not raise it, so a transition already made is
    never interrupted half-way, except as the last resort of a full backlog
    (``AuditWriter.BACKLOG_MAX`` lines held), when that line is dropped. ``pending`` is how many
    lines the writer still holds; the ``OSError`` is the ``__cause__``.
    """

    def __init__(self, target: str, pending: int, detail: str) -> None:
        self.target = target
        self.pending = pending
        self.detail = detail
        super().__init__(f"audit log {target}: write failed, {pending} line(s) held for the next flush: {detail}")


class ConfigError(PipeproofError):
    """A setting is invalid or unsafe; names the offending setting (e.g. PIPEPROOF_JWT_SECRET)."""

    def __init__(self, setting: str, detail: str) -> None:
        self.setting = setting
        self.detail = detail
        super().__init__(f"{setting}: {detail}")


class RunRejected(PipeproofError):
    """A ``run.start`` failed a prerequisite (section 4): answered with an error frame of ``code``."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")
