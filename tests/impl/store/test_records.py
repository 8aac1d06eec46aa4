"""Tests for pipeproof.impl.store.records: the records' states and reasons are the protocol's enums,
and event data is encoded one way (PROTOCOL section 5)."""

from __future__ import annotations

import pytest

from pipeproof.impl.store import ESCALATION_REASONS, EventState, encode_event_data
from pipeproof.protocol import DeliveryState, EscalationReason


def test_event_states_match_the_model() -> None:
    delivery = pytest.importorskip("pipeproof.model.delivery")
    assert {s.value for s in EventState} == {s.value for s in delivery.Delivery}


def test_event_state_is_the_protocols_delivery_state() -> None:
    # One enum, not a copy: the store, the model and the server compare members by identity.
    assert EventState is DeliveryState
    assert [s.value for s in EventState] == [s.name for s in EventState]


def test_escalation_reasons_are_the_protocols_wire_strings() -> None:
    assert tuple(reason.value for reason in EscalationReason) == ESCALATION_REASONS
    assert all(type(reason) is str for reason in ESCALATION_REASONS)


def test_event_data_is_encoded_compact_and_sorted() -> None:
    encoded = encode_event_data({"b": 1, "a": [1, 2.5, None], "t": "héllo"})
    assert encoded == '{"a":[1,2.5,null],"b":1,"t":"h\\u00e9llo"}'
    with pytest.raises(TypeError):
        encode_event_data({"bad": object()})
