"""Reference-server configuration, read from the environment and ``.env`` (prefix ``PIPEPROOF_``).

Every knob the protocol names (PROTOCOL sections 1, 3, 5 and 6: ``init_timeout``, ``context_ttl``,
``max_connections_per_user``, ``ack_timeout``, ``max_attempts``, ``resume_window``, the pre-READY
buffer bounds, ``heartbeat_ms``...) lives here with the protocol's default. Durations are floats in
seconds; the wire value ``heartbeat_ms`` is derived (:attr:`Settings.heartbeat_ms`).

Two layers of validation:

* field validation (types, positive durations, ``max_attempts >= 1``...) runs when a
  :class:`Settings` is built; :func:`load_settings` turns pydantic's error into a
  :class:`~pipeproof.errors.ConfigError` that names the environment variable;
* :func:`validate_for_startup` runs the checks that depend on the deployment (``env``): in ``prod``
  the JWT secret must be real (PROTOCOL section 2), and RS256 needs a public key everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipeproof.errors import ConfigError

log = logging.getLogger("pipeproof.settings")

ENV_PREFIX: Final = "PIPEPROOF_"

DEV_JWT_SECRET: Final = "pipeproof-dev-secret-NOT-FOR-PRODUCTION-0123456789"
"""The fixed HS256 secret used in ``dev`` and ``test`` when ``PIPEPROOF_JWT_SECRET`` is unset.

It is public (it is in the source), so :func:`validate_for_startup` rejects it in ``prod``.
"""

MIN_SECRET_BYTES: Final = 32
"""HS256 keys shorter than the hash output (32 bytes) weaken HMAC (RFC 7518 section 3.2)."""

_PLACEHOLDER_SECRETS: Final = frozenset(
    {
        "changeme",
        "change-me",
        "change_me",
        "secret",
        "placeholder",
        "dev-secret",
        "test-secret",
        "your-secret-here",
        "your_secret_here",
        "password",
        DEV_JWT_SECRET.lower(),
    }
)
# Substrings that betray a copied example value even when padded to 32 bytes.
_PLACEHOLDER_FRAGMENTS: Final = (
    "changeme",
    "change-me",
    "placeholder",
    "your-secret-here",
    "not-for-production",
)
_REPEATED_X: Final = re.compile(r"^x{3,}$", re.IGNORECASE)
_MIN_DISTINCT_CHARS: Final = 8
"""A 32-byte secret made of fewer distinct characters (``aaaa...``, ``0101...``) is a placeholder."""

Env = Literal["dev", "test", "prod"]
JwtAlgorithm = Literal["HS256", "RS256"]

SUPPORTED_DATABASE_SCHEMES: Final = ("sqlite+aiosqlite", "postgresql+asyncpg")


def env_name(field: str) -> str:
    """The environment variable that sets ``field`` (what error messages name)."""
    return f"{ENV_PREFIX}{field.upper()}"


PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A duration in seconds: positive and finite (``inf`` would disable a deadline the protocol promises)."""

NOT_SETTINGS_PREFIXES: Final = ("PIPEPROOF_TEST_", "PIPEPROOF_BENCH_")
"""Environment variables of the test and benchmark harnesses, not server settings."""


class Settings(BaseSettings):
    """All reference-server settings; build with :func:`load_settings` to get a ConfigError on bad input.

    Defaults are the protocol's (PROTOCOL.md; section numbers in each field's description).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    env: Env = "dev"
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)

    # Section 2: auth.
    jwt_secret: str | None = None
    jwt_algorithm: JwtAlgorithm = "HS256"
    jwt_public_key: str | None = Field(default=None, description="PEM, RS256 verification key")
    jwt_private_key: str | None = Field(default=None, description="PEM, RS256 signing key (minting only)")
    jwt_audience: str | None = None
    # NoDecode: we accept both a JSON list and a comma-separated string, parsed below.
    disabled_users: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Storage.
    data_dir: Path = Path("./data")
    database_url: str | None = None
    store_timeout: PositiveSeconds = 5.0
    store_pool_size: int = Field(default=10, ge=1)
    # SQLite only. In WAL mode NORMAL skips the fsync per commit: a commit survives a process crash
    # (kill -9: it is in the WAL file, in the OS's page cache), and only an OS crash or power loss
    # can lose the last commits. FULL syncs the WAL on every commit (power-loss durable, slower).
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"

    # Section 1: connection lifecycle.
    init_timeout: PositiveSeconds = 3.0
    preready_buffer_frames: int = Field(default=32, ge=1)
    preready_buffer_bytes: int = Field(default=262_144, ge=1)
    max_frame_bytes: int = Field(
        default=1_048_576, ge=1024, description="largest WebSocket message read; a larger one closes message_too_big"
    )
    error_budget: int = Field(default=10, ge=1, description="malformed frames answered before invalid_message")
    send_queue_max: int = Field(default=256, ge=1)

    # Section 3: contexts and limits.
    context_ttl: PositiveSeconds = 1800.0
    max_connections_per_user: int = Field(default=8, ge=1)
    max_connections_per_account: int = Field(default=256, ge=1)

    # Section 5: delivery.
    ack_timeout: PositiveSeconds = 5.0
    max_attempts: int = Field(default=5, ge=1)
    resume_window: PositiveSeconds = 120.0
    ack_backoff: float = Field(default=2.0, ge=1.0, allow_inf_nan=False, description="ack wait multiplier per attempt")
    ack_timeout_max: PositiveSeconds = 60.0
    ack_jitter: float = Field(default=0.1, ge=0.0, le=1.0, description="ack wait jitter, a fraction")
    max_inflight_events: int = Field(
        default=1024, ge=1, description="unfinished events per context before a run's emit waits"
    )

    # Section 4: runs.
    max_active_runs: int = Field(default=256, ge=1, description="queued plus running, per process")
    max_queued_runs_per_context: int = Field(default=8, ge=1)
    run_max_steps: int = Field(default=64, ge=1, description="thinking and tool steps per run")
    run_input_max_chars: int = Field(default=16_384, ge=1)
    tool_timeout: PositiveSeconds = 30.0

    # Section 6: heartbeat, shutdown, overload.
    heartbeat_interval: PositiveSeconds = 15.0
    shutdown_grace: PositiveSeconds = 10.0
    memory_limit_mb: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    # Section 6, "When a node dies": each unfinished run is held under a lease by the node running
    # it. A fresh id per process by default, so a restarted node is a new node and takes its old
    # runs over only once their leases expire; an id kept across restarts (unique among the live
    # processes) lets the restarted node end its own old runs at once.
    node_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex,
        min_length=1,
        max_length=128,
        description="this process's node id, unique among the nodes sharing a store",
    )
    run_lease_ttl: PositiveSeconds = 10.0
    run_lease_renew_interval: PositiveSeconds | None = Field(
        default=None, description="lease renewal and takeover scan period; unset means run_lease_ttl / 3"
    )

    # Section 6, "Several nodes" (PostgreSQL only): nodes tell each other of new events, acks and
    # sockets by NOTIFY; each node also re-reads the store this often, so a lost notification
    # delays an event by at most this much (plus one store read).
    cluster_poll_interval: PositiveSeconds = Field(
        default=1.0, description="seconds between a node's store polls for what a lost notification missed"
    )
    # Off: no LISTEN/NOTIFY at all, every node learns by polling (a connection pooler in
    # transaction mode, such as PgBouncer's, cannot hold a LISTEN).
    cluster_notify: bool = Field(default=True, description="tell other nodes of changes by NOTIFY (off: poll only)")

    audit_log: str | None = Field(
        default=None, description='"stdout", "off", or a file path; unset means data_dir/audit.jsonl'
    )

    @field_validator("disabled_users", mode="before")
    @classmethod
    def _parse_user_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        scheme = value.split("://", 1)[0]
        if scheme not in SUPPORTED_DATABASE_SCHEMES:
            # Only the scheme is echoed: the rest of a URL may hold a password.
            raise ValueError(
                f"unsupported scheme {scheme!r}; expected one of {', '.join(SUPPORTED_DATABASE_SCHEMES)}"
            )
        return value

    @field_validator("node_id")
    @classmethod
    def _check_node_id(cls, value: str) -> str:
        # Stored and logged as it is: no NUL, no blank id that would look like none at all.
        if "\x00" in value or not value.strip():
            raise ValueError("must be a non-blank id without NUL")
        return value

    @field_validator("audit_log")
    @classmethod
    def _check_audit_log(cls, value: str | None) -> str | None:
        if value is not None and value.strip() == "":
            raise ValueError('empty; use "stdout", "off" or a file path')
        return value

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.max_connections_per_user > self.max_connections_per_account:
            raise ValueError("max_connections_per_user exceeds max_connections_per_account")
        return self

    @property
    def heartbeat_ms(self) -> int:
        """``heartbeat_ms`` as sent in ``connection_ack`` (PROTOCOL section 1)."""
        return round(self.heartbeat_interval * 1000)

    @property
    def lease_renew_interval(self) -> float:
        """Seconds between lease renewals and takeover scans (section 6): the setting, or a third
        of the lease TTL when it is unset."""
        if self.run_lease_renew_interval is not None:
            return self.run_lease_renew_interval
        return self.run_lease_ttl / 3

    def resolved_database_url(self) -> str:
        """``database_url``, or the embedded default ``sqlite+aiosqlite`` file ``data_dir/pipeproof.db``."""
        if self.database_url is not None:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'pipeproof.db').resolve()}"

    def resolved_audit_log(self) -> Literal["stdout", "off"] | Path:
        """Where the JSONL audit log goes: ``"stdout"``, ``"off"`` or a file path."""
        if self.audit_log is None:
            return self.data_dir / "audit.jsonl"
        lowered = self.audit_log.strip().lower()
        if lowered == "stdout":
            return "stdout"
        if lowered == "off":
            return "off"
        return Path(self.audit_log)


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings` from env/.env plus ``overrides``; invalid input raises ConfigError.

    The error names the environment variable of the first invalid field, never its value (a bad
    value may be a secret).
    """
    unknown = unknown_variables(os.environ)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first.get("loc", ())
        field = str(loc[0]) if loc else "settings"
        setting = env_name(field) if field in Settings.model_fields else "PIPEPROOF_*"
        raise ConfigError(setting, str(first.get("msg", "invalid value"))) from None
    if unknown:
        # A misspelt setting silently keeps its default: an error in prod, a warning elsewhere.
        names = ", ".join(sorted(unknown))
        if settings.env == "prod":
            raise ConfigError(sorted(unknown)[0], f"not a setting (unknown: {names})")
        log.warning("ignoring unknown settings: %s", names)
    return settings


def unknown_variables(environ: Mapping[str, str]) -> set[str]:
    """``PIPEPROOF_*`` variables that name no setting (a typo keeps a default silently)."""
    known = {env_name(f) for f in Settings.model_fields}
    return {k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known
            and not k.upper().startswith(NOT_SETTINGS_PREFIXES)}


def prepare_paths(settings: Settings) -> None:
    """Create the data directory and open the audit log once, before the server listens: a path
    that is a regular file, under /proc, or not writable is a :class:`ConfigError` naming its
    setting (exit 2, no traceback), never a failure after the banner."""
    database = settings.resolved_database_url()
    if database.startswith("sqlite"):
        _writable_dir(settings.data_dir if settings.database_url is None
                      else Path(database.split(":///", 1)[-1]).expanduser().parent,
                      env_name("data_dir") if settings.database_url is None else env_name("database_url"))
    audit = settings.resolved_audit_log()
    if isinstance(audit, Path):
        setting = env_name("audit_log") if settings.audit_log is not None else env_name("data_dir")
        _writable_dir(audit.parent, setting)
        try:
            with audit.open("a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise ConfigError(setting, f"cannot write the audit log {audit}: {exc.strerror or exc}") from None


def _writable_dir(path: Path, setting: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".pipeproof-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(setting, f"{path} is not a writable directory: {exc.strerror or exc}") from None


def delivery_horizon(settings: Settings) -> float:
    """Seconds from an event's append to its last possible escalation (section 5): every ack wait
    at its longest jitter, then the whole resume window."""
    waits = sum(min(settings.ack_timeout * settings.ack_backoff ** k, settings.ack_timeout_max)
                for k in range(settings.max_attempts))
    return waits * (1 + settings.ack_jitter) + settings.resume_window


def is_placeholder_secret(secret: str) -> bool:
    """True for values copied from examples: ``changeme``, ``secret``, ``xxx...``, ``change...``."""
    lowered = secret.strip().lower()
    if lowered in _PLACEHOLDER_SECRETS or lowered.startswith("change"):
        return True
    if _REPEATED_X.match(lowered):
        return True
    if any(fragment in lowered for fragment in _PLACEHOLDER_FRAGMENTS):
        return True
    return len(set(lowered)) < _MIN_DISTINCT_CHARS


def effective_jwt_secret(settings: Settings) -> str:
    """The HS256 key to sign and verify with (PROTOCOL section 2).

    ``jwt_secret`` when set; in ``dev``/``test`` an unset secret falls back to
    :data:`DEV_JWT_SECRET`. In ``prod`` an unset secret raises ConfigError (startup validation
    should already have refused to start).
    """
    if settings.jwt_secret is not None and settings.jwt_secret != "":
        return settings.jwt_secret
    if settings.env == "prod":
        raise ConfigError(env_name("jwt_secret"), "required when PIPEPROOF_ENV=prod")
    return DEV_JWT_SECRET


def _check_pem(setting: str, pem: str, kind: Literal["public", "private"]) -> None:
    # Imported here so the HS256-only path never needs cryptography loaded.
    from cryptography.hazmat.primitives import serialization

    try:
        if kind == "public":
            serialization.load_pem_public_key(pem.encode("utf-8"))
        else:
            serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError) as exc:
        # The key text itself is never echoed; only the parser's complaint class.
        raise ConfigError(setting, f"not a valid PEM {kind} key ({type(exc).__name__})") from None


def validate_for_startup(settings: Settings) -> None:
    """Refuse to start with unsafe settings (PROTOCOL section 2; readiness in the Transport section).

    * ``prod`` + HS256: ``PIPEPROOF_JWT_SECRET`` must be set, at least 32 bytes, and not a
      placeholder (see :func:`is_placeholder_secret`, which also rejects :data:`DEV_JWT_SECRET`).
    * the run lease is renewed more often than it lasts (section 6).
    * on PostgreSQL, the cluster poll is quicker than the ack wait (section 5, "Several nodes").
    * RS256 in any env: ``PIPEPROOF_JWT_PUBLIC_KEY`` must be a PEM public key; there is no dev
      fallback because no built-in key pair would be safe to ship. A private key, if given, must
      parse too.
    """
    horizon = delivery_horizon(settings)
    if settings.context_ttl < horizon:
        # A context that can expire while its events still wait for a session or an ack would
        # strand them: resume lands on a new context (section 3) and never sees them.
        raise ConfigError(env_name("context_ttl"), f"{settings.context_ttl:g}s is below the delivery horizon "
                          f"({horizon:.0f}s: every ack wait at max_attempts, plus resume_window)")
    if settings.lease_renew_interval >= settings.run_lease_ttl:
        # A lease renewed no more often than it lasts expires under a live node, which then
        # loses its runs to a takeover (section 6).
        raise ConfigError(env_name("run_lease_renew_interval"), f"{settings.lease_renew_interval:g}s is not "
                          f"below PIPEPROOF_RUN_LEASE_TTL ({settings.run_lease_ttl:g}s)")
    several_nodes = (settings.database_url or "").startswith("postgresql")
    if several_nodes and settings.cluster_poll_interval >= settings.ack_timeout:
        # Several nodes: a lost notice is made good by the next poll. A poll slower than the ack
        # wait would let the owner resend (or escalate) before another node's socket had the
        # attempt once (section 5, "Several nodes"; docs/model.md, the poll bound).
        raise ConfigError(env_name("cluster_poll_interval"), f"{settings.cluster_poll_interval:g}s is not "
                          f"below PIPEPROOF_ACK_TIMEOUT ({settings.ack_timeout:g}s)")
    if settings.jwt_algorithm == "HS256":
        if settings.env == "prod":
            setting = env_name("jwt_secret")
            secret = settings.jwt_secret
            if secret is None or secret == "":
                raise ConfigError(setting, "required when PIPEPROOF_ENV=prod")
            if len(secret.encode("utf-8")) < MIN_SECRET_BYTES:
                raise ConfigError(setting, f"must be at least {MIN_SECRET_BYTES} bytes in prod")
            if is_placeholder_secret(secret):
                raise ConfigError(setting, "is a placeholder value; generate a random secret")
    else:
        if settings.jwt_public_key is None or settings.jwt_public_key.strip() == "":
            raise ConfigError(env_name("jwt_public_key"), "required when PIPEPROOF_JWT_ALGORITHM=RS256")
        _check_pem(env_name("jwt_public_key"), settings.jwt_public_key, "public")
        if settings.jwt_private_key is not None:
            _check_pem(env_name("jwt_private_key"), settings.jwt_private_key, "private")
