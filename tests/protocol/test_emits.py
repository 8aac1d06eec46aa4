"""Typed emits (pipeproof/protocol/emits.py): what a transition puts on the wire."""

from __future__ import annotations

import pytest

from pipeproof.model.connection import CONNECTION
from pipeproof.protocol import AUTH_CLOSES, Append, Close, CloseReason, Escalate, EscalationReason, EventKind


def test_a_close_allows_exactly_its_reasons_with_their_codes() -> None:
    auth = Close.any_of(AUTH_CLOSES, label="the auth code")
    assert auth.reason is None and auth.allows(4403, "user_disabled") and auth.allows(4401, "token_expired")
    assert not auth.allows(4401, "user_disabled") and not auth.allows(4429, "connection_limit")
    single = Close(CloseReason.INIT_TIMEOUT)
    assert single.reason is CloseReason.INIT_TIMEOUT and str(single) == "close 4408 init_timeout"
    assert str(auth) == "close 4401|4403 <the auth code>"
    with pytest.raises(ValueError):
        Close()


def test_other_emits_render_for_people() -> None:
    assert str(Escalate(EscalationReason.NO_SESSION)) == "escalation no_session"
    assert str(Append(EventKind.TOOL_COMPLETED)) == "tool_completed"


def test_every_edge_into_closed_says_what_it_sends() -> None:
    silent = {t.event for t in CONNECTION.transitions if t.target.name == "CLOSED" and t.close is None}
    # Only the peer leaving and a failed write end a socket without a close frame of ours.
    assert silent == {"peer_close", "send_error"}
