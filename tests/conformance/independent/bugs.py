"""Bug switches of the independent server (tests/conformance/independent/server.py).

Each switch breaks one rule of docs/protocol.md the way a real server gets it wrong, mostly the
broken pipes of the seed analysis (/work/shared/seed: its file paths are another codebase's). All
are off by default; the regression suite (tests/conformance/test_independent.py) switches them on
one at a time and asserts that the conformance kit fails with one of the properties named here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Bug(enum.Enum):
    """One way to break the protocol; the value is the switch's name on the command line."""

    RESEND_ACKED = "resend_acked"
    UNPAIRED_TOOL = "unpaired_tool"
    ORPHAN_TOOL_COMPLETED = "orphan_tool_completed"
    CANCEL_LOST = "cancel_lost"
    EXPIRED_CONTEXT_REUSED = "expired_context_reused"
    EARLY_RESEND = "early_resend"
    SEQ_GAP = "seq_gap"
    ACK_BEFORE_READY = "ack_before_ready"
    ACK_BEFORE_READY_ECHO = "ack_before_ready_echo"
    HANDLE_BEFORE_READY = "handle_before_ready"
    CONNECTION_ACK_BEFORE_AUTH = "connection_ack_before_auth"
    NO_ESCALATION = "no_escalation"
    NO_SESSION_NEVER_NOTIFIED = "no_session_never_notified"
    SWALLOWED_SEND_FAILURE = "swallowed_send_failure"
    DUPLICATE_CONTEXT = "duplicate_context"
    CROSS_USER_ROUTE = "cross_user_route"
    HEARTBEAT_SUPPRESSED = "heartbeat_suppressed"
    RETRY_CAP_OFF_BY_ONE = "retry_cap_off_by_one"
    NO_USER_LIMIT = "no_user_limit"
    NO_ACCOUNT_LIMIT = "no_account_limit"
    CLOSE_1011_ON_BAD_FRAME = "close_1011_on_bad_frame"
    GENERIC_AUTH_ERROR = "generic_auth_error"
    LATE_VALIDATION = "late_validation"
    SILENT_RUN_FAILURE = "silent_run_failure"
    CANCEL_REVEALS_FOREIGN_RUN = "cancel_reveals_foreign_run"


@dataclass(frozen=True)
class BugInfo:
    """What a switch does, where it comes from, and the kit properties it must trip (any one)."""

    description: str
    origin: str  # the seed item, or the brief's list (issue 15) when the seed has none
    protocol: str  # the docs/protocol.md section it breaks
    properties: frozenset[str]


def _info(description: str, origin: str, protocol: str, *properties: str) -> BugInfo:
    return BugInfo(description, origin, protocol, frozenset(properties))


BUGS: dict[Bug, BugInfo] = {
    Bug.RESEND_ACKED: _info(
        "on resume, every event with seq <= last_seq is sent again (the resume acked them)",
        "seed 2 (event delivery confirmation)", "5 Resume", "acked_never_resent"),
    Bug.UNPAIRED_TOOL: _info(
        "tool_completed names a tool_call_id that never had a tool_executing (kinds still paired)",
        "seed 5 (tool execution event confirmation)", "4 ordering rules", "run_events_well_ordered"),
    Bug.ORPHAN_TOOL_COMPLETED: _info(
        "an extra tool_completed, for a call that never began, right before agent_completed",
        "seed 5 (tool execution event confirmation)", "4 ordering rules", "run_events_well_ordered"),
    Bug.CANCEL_LOST: _info(
        "a run.cancel of a run still queued (not started) is ignored: the run runs",
        "brief (issue 15)", "4 Cancelling", "cancel_before_start_wins"),
    Bug.EXPIRED_CONTEXT_REUSED: _info(
        "an expired context is handed out again with the same context_id and epoch (stream reset)",
        "seed 14 (user context expiration validation)", "3 Epochs and TTL", "expired_context_never_reused"),
    Bug.EARLY_RESEND: _info(
        "an unacked event is resent after 0.2 x the ack wait",
        "brief (issue 15)", "5 Retries", "timeouts_honoured"),
    Bug.SEQ_GAP: _info(
        "each context's seq skips a number once (after seq 2 comes seq 4)",
        "brief (issue 15)", "5 Append first, then send", "seq_gap_free"),
    Bug.ACK_BEFORE_READY: _info(
        "an `ack` frame pipelined before READY is answered at once with an error frame; the socket stays open",
        "seed 1 (handshake race), seed validation gap 1", "1 Pipelining",
        "replies_answer_requests", "no_message_before_ready"),
    Bug.ACK_BEFORE_READY_ECHO: _info(
        "every frame pipelined before READY is answered at once with an error frame echoing its request_id",
        "seed 1 (handshake race), seed validation gap 1", "1 Pipelining",
        "replies_answer_requests", "no_message_before_ready"),
    Bug.HANDLE_BEFORE_READY: _info(
        "frames pipelined behind connection_init are handled (a run.start accepted) before connection_ack",
        "seed 1 (handshake race)", "1 READY comes before the ack", "no_message_before_ready", "model_transition"),
    Bug.CONNECTION_ACK_BEFORE_AUTH: _info(
        "connection_ack goes out as soon as connection_init arrives, before the token is checked",
        "seed 1 (handshake race)", "1 READY comes before the ack",
        "auth_errors_specific", "ready_before_ack", "connection_limits_respected", "one_context_per_user",
        "expired_context_never_reused"),
    Bug.NO_ESCALATION: _info(
        "an event whose last attempt timed out stays SENT for ever instead of ESCALATED max_attempts",
        "seed 2 and broken pipe 3 (no fallback after the retries)", "5 Escalation",
        "every_event_acked_or_escalated", "timeouts_honoured"),
    Bug.NO_SESSION_NEVER_NOTIFIED: _info(
        "an event with no live session to take it is dropped silently: never sent later, never escalated",
        "broken pipe 1 (WebSocket available? no: user never notified)", "5 Escalation (no_session)",
        "every_event_acked_or_escalated", "timeouts_honoured"),
    Bug.SWALLOWED_SEND_FAILURE: _info(
        "a send with no session to take it fails, and the failure is swallowed by marking the event done (ACKED)",
        "seed 2 (`except Exception: logger.warning`), broken pipe 3", "5 Retries (a failed write)",
        "every_event_acked_or_escalated"),
    Bug.DUPLICATE_CONTEXT: _info(
        "context get-or-create without the per-user lock: two concurrent inits of a user get two contexts",
        "seed 4 (UserContextManager thread safety)", "3 Contexts: one per user", "one_context_per_user"),
    Bug.CROSS_USER_ROUTE: _info(
        "an ack and GET /v1/events resolve the stream by account, not user: they touch another user's stream",
        "seed 4 and validation gap 6 (cross-user contamination)", "3 Isolation",
        "no_cross_user_read", "one_context_per_user", "every_event_acked_or_escalated", "model_transition"),
    Bug.HEARTBEAT_SUPPRESSED: _info(
        "a silent client is never closed 4408 heartbeat_timeout (the heartbeat's failures are swallowed)",
        "seed 9 (heartbeat disabled by error suppression)", "6 Heartbeat", "timeouts_close_the_socket"),
    Bug.RETRY_CAP_OFF_BY_ONE: _info(
        "an unacked event is written max_attempts + 1 times before it escalates",
        "brief (issue 15)", "5 Retries", "attempts_bounded"),
    Bug.NO_USER_LIMIT: _info(
        "max_connections_per_user is not enforced",
        "validation gap 7 (concurrent user limits)", "3 Limits", "connection_limits_respected"),
    Bug.NO_ACCOUNT_LIMIT: _info(
        "max_connections_per_account is not enforced",
        "validation gap 7 (concurrent user limits per account)", "3 Limits", "connection_limits_respected"),
    Bug.CLOSE_1011_ON_BAD_FRAME: _info(
        "an unexpected frame (a first frame that is not connection_init, a malformed frame) closes 1011",
        "seed 1 (1011 on a frame racing the handshake)", "1 1011 is never used", "no_1011"),
    Bug.GENERIC_AUTH_ERROR: _info(
        "every token failure is refused with one generic code (4401 token_malformed, HTTP 401 token_malformed)",
        "seed 7 (authentication error context insufficient)", "2 Authentication", "auth_errors_specific"),
    Bug.LATE_VALIDATION: _info(
        "run.start naming an unregistered tool is accepted and the run fails later (agent_failed tool_error)",
        "seed 8 (agent execution prerequisites missing validation)", "4 Runs (prerequisites)",
        "replies_answer_requests"),
    Bug.SILENT_RUN_FAILURE: _info(
        "a run whose tool fails just stops: no terminal event (agent_failed) is ever emitted",
        "broken pipe 1 (agent execution error: user never notified)", "4 ordering rules (never silent)",
        "run_events_well_ordered"),
    Bug.CANCEL_REVEALS_FOREIGN_RUN: _info(
        "run.cancel of another user's run answers error forbidden, unlike an unknown run_id",
        "seed 4 and validation gap 6 (isolation)", "3 Isolation", "no_cross_user_read"),
}
"""Every switch; a test keeps this table and :class:`Bug` equal."""


def parse(names: str) -> frozenset[Bug]:
    """Switches from a comma-separated list of names (the command line's ``--bugs``)."""
    return frozenset(Bug(n.strip()) for n in names.split(",") if n.strip())


__all__ = ["BUGS", "Bug", "BugInfo", "parse"]
