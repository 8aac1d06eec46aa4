"""The protocol's closed vocabularies, one enum each (docs/protocol.md).

Rules:
- a protocol word (an event kind, an auth code, a delivery state, an escalation reason, an error
  code, a property name) is spelt once, here; every other module imports the member;
- members of the string enums *are* their wire strings (``StrEnum``), so they serialise as-is;
- :class:`DeliveryState` is also the delivery machine's state enum (model/delivery.py): the store's
  CHECK constraint, the model and the server name the same four states.
"""

from __future__ import annotations

import enum

SEQ_MAX = 2**31 - 1
"""The largest seq (and ack, resume.last_seq, attempt): every store keeps it in a signed 32-bit column."""
ID_MAX = 128
"""The longest request_id, run_id, tool name (characters); no NUL in any of them (every store keeps text)."""
TOKEN_MAX = 8192
"""The longest token a connection_init may carry (characters)."""
TOOLS_MAX = 32
"""The most tools one run.start may name."""
USER_MAX = 256
"""The longest user id (a token's ``sub``) and account id (characters); no NUL."""


class FastEnum(enum.Enum):
    """Enum for machine states. Members are singletons, so identity hashing is exact, and it is
    several times faster than Enum's name hashing on the explorer's hot path."""

    __hash__ = object.__hash__


class EventKind(enum.StrEnum):
    """The agent event kinds of section 4, in the order a run may emit them."""

    AGENT_STARTED = "agent_started"
    AGENT_THINKING = "agent_thinking"
    TOOL_EXECUTING = "tool_executing"
    TOOL_COMPLETED = "tool_completed"
    AGENT_COMPLETED = "agent_completed"
    AGENT_FAILED = "agent_failed"

    @property
    def terminal(self) -> bool:
        """Exactly one terminal event ends a run; nothing follows it (section 4)."""
        return self in TERMINAL_KINDS


TERMINAL_KINDS: frozenset[EventKind] = frozenset({EventKind.AGENT_COMPLETED, EventKind.AGENT_FAILED})


class AuthCode(enum.StrEnum):
    """Section 2: each auth failure has its own code, the close reason and the HTTP error code."""

    TOKEN_MISSING = "token_missing"
    TOKEN_MALFORMED = "token_malformed"
    TOKEN_BAD_SIGNATURE = "token_bad_signature"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    TOKEN_BAD_AUDIENCE = "token_bad_audience"
    USER_UNKNOWN = "user_unknown"
    USER_DISABLED = "user_disabled"


class DeliveryState(FastEnum):
    """Section 5: an event is in exactly one of these, and moves only forward."""

    PENDING = "PENDING"
    SENT = "SENT"
    ACKED = "ACKED"
    ESCALATED = "ESCALATED"

    @property
    def live(self) -> bool:
        return self in LIVE_STATES


LIVE_STATES: frozenset[DeliveryState] = frozenset({DeliveryState.PENDING, DeliveryState.SENT})
TERMINAL_STATES: frozenset[DeliveryState] = frozenset({DeliveryState.ACKED, DeliveryState.ESCALATED})


class EscalationReason(enum.StrEnum):
    """Section 5: why an event became ESCALATED."""

    MAX_ATTEMPTS = "max_attempts"
    NO_SESSION = "no_session"
    SEND_FAILED = "send_failed"


class ErrorCode(enum.StrEnum):
    """Codes of ``{"type":"error"}`` frames (sections 1 and 4); the socket stays open after each."""

    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_INPUT = "invalid_input"
    OVER_CAPACITY = "over_capacity"
    RUN_NOT_FOUND = "run_not_found"
    RUN_FINISHED = "run_finished"
    RUNS_UNAVAILABLE = "runs_unavailable"
    CONTEXT_EXPIRED = "context_expired"
    INTERNAL = "internal"


class FailureCode(enum.StrEnum):
    """``data.code`` of the ``agent_failed`` events the reference server emits itself (section 4).

    An agent may end its run with a code of its own (``AgentFailed``), and a run whose events the
    store refuses ends with that StoreError's code (``store_unavailable``...); docs/protocol.md
    lists both beside these."""

    CANCELLED = "cancelled"
    TOOL_ERROR = "tool_error"
    INTERNAL = "internal"
    STEP_LIMIT = "step_limit"
    SHUTDOWN = "shutdown"
    INTERRUPTED = "interrupted"
    NODE_LOST = "node_lost"


class FrameType(enum.StrEnum):
    """The ``type`` of every frame (Transport); dotted names are plain values."""

    CONNECTION_INIT = "connection_init"
    ACK = "ack"
    RUN_START = "run.start"
    RUN_CANCEL = "run.cancel"
    CONNECTION_ACK = "connection_ack"
    EVENT = "event"
    RUN_ACCEPTED = "run.accepted"
    ERROR = "error"


CLIENT_FRAME_TYPES: frozenset[FrameType] = frozenset(
    {FrameType.CONNECTION_INIT, FrameType.ACK, FrameType.RUN_START, FrameType.RUN_CANCEL}
)


class Property(enum.StrEnum):
    """The model's invariants (model/invariants.py states them; docs/model.md explains them)."""

    NO_MESSAGE_BEFORE_READY = "no_message_before_ready"
    READY_BEFORE_ACK = "ready_before_ack"
    EVERY_EVENT_ACKED_OR_ESCALATED = "every_event_acked_or_escalated"
    ACKED_NEVER_RESENT = "acked_never_resent"
    MONOTONIC_EVENT_STATE = "monotonic_event_state"
    ATTEMPTS_BOUNDED = "attempts_bounded"
    ONE_CONTEXT_PER_USER = "one_context_per_user"
    EXPIRED_CONTEXT_NEVER_REUSED = "expired_context_never_reused"
    CONNECTION_LIMITS_RESPECTED = "connection_limits_respected"
    NO_CROSS_USER_READ = "no_cross_user_read"
    RUN_EVENTS_WELL_ORDERED = "run_events_well_ordered"
    CANCEL_BEFORE_START_WINS = "cancel_before_start_wins"
    TIMEOUTS_CLOSE_THE_SOCKET = "timeouts_close_the_socket"
    ONE_LIVE_OWNER = "one_live_owner"
    NO_SESSION_ONLY_WHEN_NONE_READY = "no_session_only_when_none_ready"
    RELAY_WITHIN_POLL_BOUND = "relay_within_poll_bound"
