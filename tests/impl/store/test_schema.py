"""Tests for pipeproof.impl.store.schema: migrations, the database's own constraints, and the CHECK
constraints rendered from the protocol's enums (PROTOCOL sections 3 and 5)."""

from __future__ import annotations

import asyncio
import enum
import re

import pytest
import sqlalchemy.exc as sa_exc
from sqlalchemy import CheckConstraint, inspect, text
from store_harness import Opener, new_context

from pipeproof.impl.store import EXPECTED_SCHEMA_VERSION, Store, schema
from pipeproof.protocol import LIVE_STATES, DeliveryState, EscalationReason


async def test_migrations_are_applied_once(opener: Opener) -> None:
    store = await opener()
    assert await store.schema_version() == EXPECTED_SCHEMA_VERSION
    assert await store.migrate() == []
    again = await opener()
    assert await again.schema_version() == EXPECTED_SCHEMA_VERSION


async def test_concurrent_migrators_apply_each_step_exactly_once(opener: Opener) -> None:
    stores = [await opener(migrate=False) for _ in range(5)]
    assert await stores[0].schema_version() == 0
    results = await asyncio.gather(*(s.migrate() for s in stores))
    assert sorted(results, key=len) == [[], [], [], [], list(range(1, EXPECTED_SCHEMA_VERSION + 1))]
    assert await stores[0].schema_version() == EXPECTED_SCHEMA_VERSION


async def test_one_live_context_per_user_is_a_database_constraint(store: Store) -> None:
    await new_context(store)
    with pytest.raises(sa_exc.IntegrityError):
        async with store._engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO contexts (id, user_id, account_id, epoch, created_at, last_used_at, "
                    "expired, next_seq) VALUES ('rogue', 'alice', 'acme', 99, 0, 0, :f, 1)"
                ),
                {"f": False},
            )


# -- CHECK constraints rendered from the protocol's enums ------------------------------------------


def quoted(sql: str) -> list[str]:
    """The string literals of an SQL text, in order."""
    return re.findall(r"'([^']*)'", sql)


def check_text(name: str) -> str:
    (constraint,) = [c for c in schema.events.constraints if isinstance(c, CheckConstraint) and c.name == name]
    return str(constraint.sqltext)


def test_state_check_names_every_delivery_state_and_nothing_else() -> None:
    text_ = check_text("ck_events_state")
    assert text_.startswith("state IN (")
    assert quoted(text_) == [state.value for state in DeliveryState]  # each once, in declaration order


def test_reason_check_names_every_escalation_reason_and_nothing_else() -> None:
    text_ = check_text("ck_events_reason")
    assert text_.startswith("reason IS NULL OR reason IN (")
    assert quoted(text_) == [reason.value for reason in EscalationReason]


def test_version_1_constraints_are_the_text_it_shipped_with() -> None:
    # Migration 1 renders these from the enums. A new state or reason changes what a fresh database
    # gets but not what existing ones have: it needs migration 2 (altering the constraint), and then
    # this test moves to pin version 1's text inside that migration. (Version 2, run leases, and
    # version 3, several nodes, left the events table alone.)
    assert schema.EXPECTED_SCHEMA_VERSION == 3
    assert schema.STATE_CHECK == "state IN ('PENDING', 'SENT', 'ACKED', 'ESCALATED')"
    assert schema.REASON_CHECK == "reason IS NULL OR reason IN ('max_attempts', 'no_session', 'send_failed')"


async def installed_check(store: Store, name: str) -> str:
    """The definition of the events table's CHECK constraint ``name`` as the database holds it."""
    async with store._engine.connect() as conn:
        if store.dialect == "sqlite":
            ddl = (
                await conn.execute(text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'events'"))
            ).scalar_one()
            match = re.search(rf"CONSTRAINT {name} CHECK \((.*)\)", ddl)
            assert match is not None, ddl
            return match.group(1)
        definition = (
            await conn.execute(
                text(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conname = :n AND conrelid = 'events'::regclass"
                ),
                {"n": name},
            )
        ).scalar_one()
        return str(definition)


async def test_the_installed_constraints_name_exactly_the_enums(store: Store) -> None:
    states = await installed_check(store, "ck_events_state")
    assert sorted(quoted(states)) == sorted(state.value for state in DeliveryState)
    reasons = await installed_check(store, "ck_events_reason")
    assert sorted(quoted(reasons)) == sorted(reason.value for reason in EscalationReason)


async def test_the_database_admits_every_enum_word_and_refuses_any_other(store: Store) -> None:
    cid = await new_context(store)
    insert = text(
        "INSERT INTO events (context_id, seq, event_id, run_id, kind, data, state, attempt, reason, "
        "created_at, updated_at) VALUES (:c, :seq, :eid, 'r', 'agent_thinking', '{}', :state, 0, :reason, 0, 0)"
    )
    rows = [(state.value, None) for state in DeliveryState]
    rows += [(DeliveryState.ESCALATED.value, reason.value) for reason in EscalationReason]
    async with store._engine.begin() as conn:
        for seq, (state, reason) in enumerate(rows, 1):
            await conn.execute(insert, {"c": cid, "seq": seq, "eid": f"e{seq}", "state": state, "reason": reason})
    for state, reason in [("DELIVERED", None), ("pending", None), (DeliveryState.ESCALATED.value, "bored")]:
        with pytest.raises(sa_exc.IntegrityError):
            async with store._engine.begin() as conn:
                params = {"c": cid, "seq": 99, "eid": "bad", "state": state, "reason": reason}
                await conn.execute(insert, params)


def test_sql_in_list_renders_declaration_order_whatever_the_input_order() -> None:
    assert schema.sql_in_list(LIVE_STATES) == "('PENDING', 'SENT')"
    assert schema.sql_in_list([DeliveryState.ESCALATED, DeliveryState.PENDING]) == "('PENDING', 'ESCALATED')"
    assert schema.sql_in_list(EscalationReason) == "('max_attempts', 'no_session', 'send_failed')"
    assert schema.sql_literal(DeliveryState.SENT) == "'SENT'"


def test_sql_in_list_refuses_what_it_cannot_render_safely() -> None:
    class Unsafe(enum.Enum):
        QUOTE = "it's"
        NUMBER = 1

    with pytest.raises(ValueError):
        schema.sql_in_list([])
    with pytest.raises(ValueError):
        schema.sql_in_list([DeliveryState.SENT, EscalationReason.NO_SESSION])
    with pytest.raises(ValueError):
        schema.sql_in_list([Unsafe.QUOTE])
    with pytest.raises(ValueError):
        schema.sql_literal(Unsafe.NUMBER)


async def test_versions_2_and_3_add_run_leases_and_nodes_to_a_version_1_database(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database made by version 1 (its runs table as it shipped) keeps its runs; they read as
    # having no lease, which any node may claim (section 6).
    old = await opener(migrate=False)
    with monkeypatch.context() as patch:
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
        assert await old.migrate() == [1]
    cid = await new_context(old)
    async with old._engine.begin() as conn:
        columns = await conn.run_sync(lambda sync: [c["name"] for c in inspect(sync).get_columns("runs")])
        assert "owner_node" not in columns
        await conn.execute(
            text("INSERT INTO runs (run_id, context_id, request_id, user_id, state, created_at, updated_at) "
                 "VALUES ('old-run', :c, 'req', 'alice', 'ACCEPTED', 0, 0)"),
            {"c": cid},
        )
    assert await old.migrate() == [2, 3]
    run = await old.find_run("old-run")
    assert run is not None and (run.owner_node, run.lease_expires, run.cancel_requested) == (None, None, False)
    (claimed,) = await old.claim_runs("b", 10.0, 20.0)
    assert (claimed.run_id, claimed.owner_node) == ("old-run", "b")
