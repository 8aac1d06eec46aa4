"""Tests for pipeproof.impl.store (the package): the store's interface is importable from the package,
whichever module now holds each name."""

from __future__ import annotations

import importlib

import pipeproof.protocol as protocol

# Everything the repository imports from the store, and the interface the single module exported.
INTERFACE = {
    "ESCALATION_REASONS",
    "EXPECTED_SCHEMA_VERSION",
    "MIGRATIONS",
    "RUN_TERMINAL_STATES",
    "ClaimScope",
    "ContextInfo",
    "ContextRecord",
    "EscalationReason",
    "EventRecord",
    "EventState",
    "Migration",
    "RunRecord",
    "SlotVerdict",
    "SqliteSynchronous",
    "Store",
    "encode_event_data",
    "open_store",
}


def test_the_interface_is_exported_from_the_package() -> None:
    store = importlib.import_module("pipeproof.impl.store")
    assert set(store.__all__) == INTERFACE
    for name in store.__all__:
        assert getattr(store, name) is not None, name


def test_the_states_and_reasons_are_the_protocols() -> None:
    store = importlib.import_module("pipeproof.impl.store")
    assert store.EventState is protocol.DeliveryState
    assert store.EscalationReason is protocol.EscalationReason
