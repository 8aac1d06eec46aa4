"""Close codes and reasons: the "Close codes at a glance" table of docs/protocol.md as data.

Rules:
- every close the server sends is a :class:`CloseReason` member; its ``code`` and ``reaction`` come
  with it, so no module writes a numeric close code;
- a reason belongs to exactly one code; the docs' table (:func:`close_table_markdown`) and the
  trace checker are rendered from this enum, and a test ties docs/protocol.md to it;
- 1011 ``internal_error`` is the server's own bug, never an expected condition (section 1): the
  conformance kit fails any run that observes it.
"""

from __future__ import annotations

import enum

from .names import AuthCode


class CloseCode(enum.IntEnum):
    """The WebSocket close codes the protocol uses (RFC 6455 and the 4xxx private range)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    INVALID_MESSAGE = 4400
    UNAUTHENTICATED = 4401
    FORBIDDEN = 4403
    TIMEOUT = 4408
    TOO_MANY = 4429

    @property
    def http_status(self) -> int | None:
        """The HTTP status of the same refusal: 4401 -> 401, 4403 -> 403 (section 2)."""
        return int(self) - 4000 if int(self) in (4401, 4403) else None


class Reaction(enum.StrEnum):
    """What a client should do after a close (the table's last column)."""

    STOP = "stop"
    RESUME = "reconnect and resume"
    RETRY = "reconnect with backoff"
    FIX = "fix the client"
    REAUTH = "re-authenticate"
    BACK_OFF = "back off"

    @property
    def reconnects(self) -> bool:
        return self in (Reaction.RESUME, Reaction.RETRY, Reaction.BACK_OFF)


class CloseReason(enum.StrEnum):
    """One row of the close table: the reason string is the member's value."""

    code: CloseCode
    reaction: Reaction
    meaning: str

    def __new__(cls, reason: str, code: CloseCode, reaction: Reaction, meaning: str) -> CloseReason:
        member = str.__new__(cls, reason)
        member._value_ = reason
        member.code = code
        member.reaction = reaction
        member.meaning = meaning
        return member

    NORMAL = "normal", CloseCode.NORMAL, Reaction.STOP, "the session ended normally"
    GOING_AWAY = "going_away", CloseCode.GOING_AWAY, Reaction.RESUME, "the server is shutting down (section 6)"
    PROTOCOL_ERROR = (
        "protocol_error", CloseCode.PROTOCOL_ERROR, Reaction.FIX,
        "a WebSocket framing error (RFC 6455: an unmasked frame, a bad opcode); the WebSocket layer fails the "
        "connection (Transport)",
    )
    MESSAGE_TOO_BIG = (
        "message_too_big", CloseCode.MESSAGE_TOO_BIG, Reaction.FIX,
        "a frame larger than max_frame_bytes; the WebSocket layer stops reading it (Transport)",
    )
    INTERNAL_ERROR = (
        "internal_error", CloseCode.INTERNAL_ERROR, Reaction.RETRY,
        "a server bug, counted and logged; never an expected condition (section 1)",
    )
    TRY_AGAIN_LATER = (
        "try_again_later", CloseCode.TRY_AGAIN_LATER, Reaction.RETRY,
        "overload or an unavailable dependency: memory guard, capacity, store or audit log (section 6)",
    )
    INVALID_MESSAGE = (
        "invalid_message", CloseCode.INVALID_MESSAGE, Reaction.FIX,
        "malformed frames past error_budget (section 1)",
    )
    INIT_REQUIRED = (
        "init_required", CloseCode.UNAUTHENTICATED, Reaction.REAUTH,
        "the first frame was not connection_init (section 1)",
    )
    TOKEN_MISSING = (
        "token_missing", CloseCode.UNAUTHENTICATED, Reaction.REAUTH, "connection_init carried no token (section 2)",
    )
    TOKEN_MALFORMED = (
        "token_malformed", CloseCode.UNAUTHENTICATED, Reaction.REAUTH,
        "the token is not a well-formed JWT (section 2)",
    )
    TOKEN_BAD_SIGNATURE = (
        "token_bad_signature", CloseCode.UNAUTHENTICATED, Reaction.REAUTH,
        "the token's signature does not verify (section 2)",
    )
    TOKEN_EXPIRED = "token_expired", CloseCode.UNAUTHENTICATED, Reaction.REAUTH, "the token has expired (section 2)"
    TOKEN_NOT_YET_VALID = (
        "token_not_yet_valid", CloseCode.UNAUTHENTICATED, Reaction.REAUTH,
        "the token's nbf/iat is in the future (section 2)",
    )
    TOKEN_BAD_AUDIENCE = (
        "token_bad_audience", CloseCode.UNAUTHENTICATED, Reaction.REAUTH,
        "the token's audience is not this server's (section 2)",
    )
    USER_UNKNOWN = (
        "user_unknown", CloseCode.UNAUTHENTICATED, Reaction.REAUTH, "the token names no known user (section 2)",
    )
    USER_DISABLED = "user_disabled", CloseCode.FORBIDDEN, Reaction.STOP, "the user is known but disabled (section 2)"
    FORBIDDEN = "forbidden", CloseCode.FORBIDDEN, Reaction.STOP, "the user may not use this resource (section 2)"
    INIT_TIMEOUT = (
        "init_timeout", CloseCode.TIMEOUT, Reaction.RESUME, "no connection_init within init_timeout (section 1)",
    )
    HEARTBEAT_TIMEOUT = (
        "heartbeat_timeout", CloseCode.TIMEOUT, Reaction.RESUME,
        "peer silent for two heartbeat intervals (section 6)",
    )
    DUPLICATE_INIT = (
        "duplicate_init", CloseCode.TOO_MANY, Reaction.BACK_OFF, "a second connection_init on one socket (section 1)",
    )
    PREREADY_BUFFER_FULL = (
        "preready_buffer_full", CloseCode.TOO_MANY, Reaction.BACK_OFF,
        "too many frames or bytes before READY (section 1)",
    )
    CONNECTION_LIMIT = (
        "connection_limit", CloseCode.TOO_MANY, Reaction.BACK_OFF,
        "over the per-user or per-account limit (section 3)",
    )

    @classmethod
    def of(cls, reason: str) -> CloseReason:
        """The member for a reason string; ``ValueError`` for a reason the table does not have."""
        member = cls._value2member_map_.get(reason)
        if not isinstance(member, CloseReason):
            raise ValueError(f"{reason!r} is not a documented close reason")
        return member

    @classmethod
    def for_auth(cls, code: AuthCode) -> CloseReason:
        """The close of an auth failure: the reason is the section-2 code itself."""
        return cls.of(code.value)

    def describe(self) -> str:
        return f"{int(self.code)} {self.value}"

    @classmethod
    def documented(cls, code: int, reason: str) -> bool:
        """Whether ``(code, reason)`` is a row of the table (a reason belongs to one code)."""
        member = cls._value2member_map_.get(reason)
        return isinstance(member, CloseReason) and int(member.code) == code

    @classmethod
    def table(cls) -> list[str]:
        """Every row as ``"code reason"``, for reports of what would have been allowed."""
        return [r.describe() for r in cls]


AUTH_CLOSES: frozenset[CloseReason] = frozenset(CloseReason.for_auth(c) for c in AuthCode)


def close_table_markdown() -> str:
    """The docs' close table, one row per reason (docs/protocol.md, the AsyncAPI document, the report)."""
    lines = ["| code | reason | meaning | client should |", "|---|---|---|---|"]
    lines += [f"| {int(c.code)} | `{c.value}` | {c.meaning} | {c.reaction.value} |" for c in CloseReason]
    return "\n".join(lines)
