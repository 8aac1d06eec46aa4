"""The error tree: one root, two branches a caller can catch whole.

``PipeproofError``
    ``ModelError``: the model itself is wrong (raised at definition time or by a checker)
        ``ModelDefinitionError``: a machine declaration breaks a structural rule
        ``IllegalTransition``: an event fired in a state (or with variables) its machine forbids
    ``ProtocolError``: a peer broke the wire contract (docs/protocol.md); carries a close code
    ``StoreError``: the durable store failed; each subclass says how (docs/protocol.md section 3)
    ``AuditWriteFailed``: the audit log could not be written; its lines are kept for a retry

Messages name the machine, the state and the rule (or the store operation), never a secret.
"""

from __future__ import annotations


class PipeproofError(Exception):
    """Root of every error pipeproof raises on purpose."""


class ModelError(PipeproofError):
    """The model (or a variant of it) is inconsistent."""


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


class IllegalTransition(ModelError):
    """An event was fired where the machine's declaration has no enabled transition.

    The reference server turns this into a documented close code; it is never swallowed.
    """

    def __init__(self, machine: str, event: str, state: str, detail: str = "") -> None:
        self.machine = machine
        self.event = event
        self.state = state
        suffix = f": {detail}" if detail else ""
        super().__init__(f"machine {machine!r}: event {event!r} is not allowed in state {state!r}{suffix}")


class ProtocolError(PipeproofError):
    """A peer broke the wire contract; ``close_code`` and ``reason`` are what the socket is closed with."""

    def __init__(self, close_code: int, reason: str, detail: str = "") -> None:
        self.close_code = close_code
        self.reason = reason
        self.detail = detail
        super().__init__(f"{close_code} {reason}" + (f": {detail}" if detail else ""))


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
