"""The close table as data (pipeproof/protocol/closes.py; docs/protocol.md, "Close codes")."""

from __future__ import annotations

import pytest

from pipeproof.protocol import AUTH_CLOSES, AuthCode, CloseCode, CloseReason, Reaction


def test_close_code_table_covers_the_protocol() -> None:
    by_code: dict[int, set[str]] = {}
    for row in CloseReason:
        by_code.setdefault(int(row.code), set()).add(row.value)
        assert row.meaning and row.reaction
    assert set(by_code) == {1000, 1001, 1002, 1009, 1011, 1013, 4400, 4401, 4403, 4408, 4429}
    assert by_code[1009] == {"message_too_big"}
    assert by_code[4429] == {"duplicate_init", "preready_buffer_full", "connection_limit"}
    assert by_code[4408] == {"init_timeout", "heartbeat_timeout"}
    assert {"init_required", "token_missing", "user_unknown"} <= by_code[4401]
    # 1011 is the server's own bug, never an expected condition (section 1).
    assert by_code[1011] == {"internal_error"}
    assert CloseReason.of("user_disabled").code == 4403
    assert CloseReason.documented(4403, "user_disabled") and not CloseReason.documented(4401, "user_disabled")


def test_docs_close_table_is_rendered_from_the_enum() -> None:
    from pathlib import Path

    from pipeproof.protocol import close_table_markdown

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    assert close_table_markdown() in doc


def test_auth_codes_close_with_their_own_reason_and_http_status() -> None:
    assert {r.value for r in AUTH_CLOSES} == set(AuthCode)
    assert CloseReason.for_auth(AuthCode.USER_DISABLED).code.http_status == 403
    assert {CloseReason.for_auth(c).code.http_status for c in AuthCode if c is not AuthCode.USER_DISABLED} == {401}
    assert CloseCode.TRY_AGAIN_LATER.http_status is None


def test_unknown_reason_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a documented close reason"):
        CloseReason.of("teapot")
    assert not CloseReason.documented(1011, "going_away")


def test_reactions_say_whether_to_reconnect() -> None:
    assert CloseReason.GOING_AWAY.reaction is Reaction.RESUME and Reaction.RESUME.reconnects
    assert not CloseReason.USER_DISABLED.reaction.reconnects
    assert not CloseReason.INVALID_MESSAGE.reaction.reconnects


def test_property_names_are_the_model_invariants() -> None:
    from pipeproof.model.invariants import INVARIANTS
    from pipeproof.protocol import Property

    assert [i.name for i in INVARIANTS] == list(Property)
