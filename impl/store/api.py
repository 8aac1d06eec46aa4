"""The store's API: :class:`Store`, over contexts, the per-context event stream and runs (PROTOCOL
sections 3, 4 and 5).

The event operations come from :class:`~.stream.EventStream` and the transaction plumbing from
:class:`~.writer.GroupCommitStore`; this module adds the schema and readiness operations, contexts
(section 3: one live context per user, made by the database, never by an in-process lock) and
runs (section 4: ``run.start`` is idempotent on its ``request_id``; section 6: each unfinished run
is held under a lease by one node, and a node takes over a run whose lease expired).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Sequence
from typing import Final, Literal

from sqlalchemy import ColumnElement, false, func, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncConnection

from pipeproof.errors import StoreIntegrityError

from .cluster import ClusterStore
from .records import ContextInfo, ContextRecord, RunRecord, context_from_row, now_or_clock, run_from_row
from .schema import RUN_TERMINAL_STATES, apply_migrations, contexts, read_schema_version, runs, store_probe
from .stream import EventStream

_MAX_CONTEXT_RACE_RETRIES: Final = 8
"""Conflicting inserts one get_or_create_context survives before it gives up (each one means
another transaction committed the user's live context, which the next round reads)."""

ClaimScope = Literal["expired", "own", "all"]
"""Which unfinished runs :meth:`Store.claim_runs` takes: those whose lease expired, those the
claiming node's id already holds (its previous process), or every one."""


class Store(EventStream, ClusterStore):
    """The async store interface (PROTOCOL sections 3-5). Build it with :func:`~.engine.open_store`.

    Safe to share between tasks, and the same instance (or instances in other processes) may be
    used concurrently. Reads run in their own transaction on a pooled connection; writes are
    group-committed by one writer task per instance (:meth:`_write`): each write's body runs in
    order inside a shared transaction and its caller resumes after that COMMIT. A write whose body
    fails does not fail the others: the group is rolled back and each write committed alone.
    """

    # -- schema ------------------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Apply every pending migration, idempotently and safely from many processes at once.

        Migrators serialise on a PostgreSQL advisory transaction lock (SQLite: the write lock taken
        by ``BEGIN IMMEDIATE``), then re-read the version inside the lock. Returns the versions this
        call applied (empty when the schema was current).
        """

        async def body(conn: AsyncConnection) -> list[int]:
            return await apply_migrations(conn, dialect=self._dialect, pg_schema=self._pg_schema)

        return await self._run("migrate", body, write=True)

    async def schema_version(self) -> int:
        """The applied schema version; 0 for an empty database."""
        return await self._run("schema_version", read_schema_version, write=False)

    # -- readiness ---------------------------------------------------------------------------------

    async def ping(self) -> float:
        """Round-trip ``SELECT 1``; returns the seconds it took (``/readyz``, Transport section)."""

        async def body(conn: AsyncConnection) -> float:
            started = time.perf_counter()
            await conn.execute(select(1))
            return time.perf_counter() - started

        return await self._run("ping", body, write=False)

    async def check_writable(self, now: float | None = None) -> None:
        """Commit a real write (an upsert of ``store_probe``) so ``/readyz`` catches a read-only or
        full store, not only an unreachable one. Raises a StoreError subclass on failure."""
        stamp = now_or_clock(now)

        async def body(conn: AsyncConnection) -> None:
            stmt = self._insert(store_probe).values(id=1, checked_at=stamp)
            stmt = stmt.on_conflict_do_update(index_elements=[store_probe.c.id], set_={"checked_at": stamp})
            await conn.execute(stmt)

        await self._run("check_writable", body, write=True)

    # -- contexts (section 3) ----------------------------------------------------------------------

    async def get_or_create_context(self, user: str, account: str, now: float, ttl: float) -> ContextRecord:
        """The user's live context, created if there is none (PROTOCOL section 3).

        Atomic under any concurrency, in one process or many: the partial unique index admits one
        live row per user and the insert is ``ON CONFLICT DO NOTHING``, so a loser re-reads the
        winner's row. A live context idle for more than ``ttl`` (``now - last_used_at > ttl``) is
        marked expired in the same transaction and replaced by a new one with ``epoch + 1``; an
        expired context is never returned. Returning an existing context touches it. ``account``
        is recorded when a context is created; a live context keeps the account it was created with.
        """
        if ttl <= 0:
            raise ValueError("ttl must be positive")

        async def body(conn: AsyncConnection) -> ContextRecord:
            for _ in range(_MAX_CONTEXT_RACE_RETRIES):
                live = (
                    await conn.execute(
                        select(contexts)
                        .where(contexts.c.user_id == user, contexts.c.expired == false())
                        .with_for_update()  # PostgreSQL: serialise on the row; SQLite ignores it
                    )
                ).first()
                if live is not None:
                    if now - float(live.last_used_at) <= ttl:
                        await conn.execute(
                            update(contexts)
                            .where(contexts.c.id == live.id)
                            .values(last_used_at=max(float(live.last_used_at), now))
                        )
                        return ContextRecord(str(live.id), int(live.epoch), False, user, str(live.account_id))
                    await conn.execute(
                        update(contexts)
                        .where(contexts.c.id == live.id, contexts.c.expired == false())
                        .values(expired=True, expired_at=now)
                    )
                next_epoch = (
                    select(func.coalesce(func.max(contexts.c.epoch), 0) + 1)
                    .where(contexts.c.user_id == user)
                    .scalar_subquery()
                )
                inserted = (
                    await conn.execute(
                        self._insert(contexts)
                        .values(
                            id=uuid.uuid4().hex,
                            user_id=user,
                            account_id=account,
                            epoch=next_epoch,
                            created_at=now,
                            last_used_at=now,
                            expired=False,
                            next_seq=1,
                        )
                        .on_conflict_do_nothing()
                        .returning(contexts.c.id, contexts.c.epoch)
                    )
                ).first()
                if inserted is not None:
                    return ContextRecord(str(inserted.id), int(inserted.epoch), True, user, account)
                # Another transaction committed a live context first: loop and read it.
            raise StoreIntegrityError(
                "get_or_create_context",
                f"no live context after {_MAX_CONTEXT_RACE_RETRIES} conflicting inserts for one user",
            )

        return await self._run("get_or_create_context", body, write=True)

    async def touch_context(self, context_id: str, now: float, ttl: float | None = None) -> bool:
        """Record activity on a context. True if it is live and was touched; False if it has expired
        (and, with ``ttl``, if it is idle past ``ttl``, in which case it is marked expired now), so
        the caller must resolve a new context. Unknown ``context_id``: StoreIntegrityError."""

        async def body(conn: AsyncConnection) -> bool:
            row = (
                await conn.execute(select(contexts).where(contexts.c.id == context_id).with_for_update())
            ).first()
            if row is None:
                raise StoreIntegrityError("touch_context", f"no context {context_id!r}")
            if bool(row.expired):
                return False
            if ttl is not None and now - float(row.last_used_at) > ttl:
                await conn.execute(
                    update(contexts)
                    .where(contexts.c.id == context_id, contexts.c.expired == false())
                    .values(expired=True, expired_at=now)
                )
                return False
            await conn.execute(
                update(contexts)
                .where(contexts.c.id == context_id)
                .values(last_used_at=max(float(row.last_used_at), now))
            )
            return True

        return await self._run("touch_context", body, write=True)

    async def expire_idle_contexts(self, now: float, ttl: float) -> list[str]:
        """Mark every live context idle past ``ttl`` expired (a sweeper); returns their ids."""

        async def body(conn: AsyncConnection) -> list[str]:
            result = await conn.execute(
                update(contexts)
                .where(contexts.c.expired == false(), contexts.c.last_used_at < now - ttl)
                .values(expired=True, expired_at=now)
                .returning(contexts.c.id)
            )
            return sorted(str(r.id) for r in result)

        return await self._run("expire_idle_contexts", body, write=True)

    async def find_context(self, context_id: str) -> ContextInfo | None:
        """The context row, or None if no such context exists."""

        async def body(conn: AsyncConnection) -> ContextInfo | None:
            row = (await conn.execute(select(contexts).where(contexts.c.id == context_id))).first()
            return None if row is None else context_from_row(row)

        return await self._run("find_context", body, write=False)

    async def find_live_context(self, user: str) -> ContextInfo | None:
        """The user's non-expired context, or None when they have none (read-only: never creates)."""

        async def body(conn: AsyncConnection) -> ContextInfo | None:
            row = (
                await conn.execute(
                    select(contexts).where(contexts.c.user_id == user, contexts.c.expired == false())
                )
            ).first()
            return None if row is None else context_from_row(row)

        return await self._run("find_live_context", body, write=False)

    # -- runs (section 4) --------------------------------------------------------------------------

    async def create_run(
        self,
        context_id: str,
        request_id: str,
        user: str,
        now: float,
        *,
        state: str = "ACCEPTED",
        run_id: str | None = None,
        owner_node: str | None = None,
        lease_expires: float | None = None,
    ) -> tuple[RunRecord, bool]:
        """Create the run for ``(context_id, request_id)`` or return the existing one (section 4).

        Returns ``(run, created)``; a repeated ``request_id`` returns the first run and ``False``,
        whatever ``state``/``run_id``/lease the repeat passed. A new run is held by ``owner_node``
        until ``lease_expires`` (section 6). Unknown context: StoreIntegrityError.
        """
        new_id = run_id if run_id is not None else uuid.uuid4().hex

        async def body(conn: AsyncConnection) -> tuple[RunRecord, bool]:
            inserted = (
                await conn.execute(
                    self._insert(runs)
                    .values(
                        run_id=new_id,
                        context_id=context_id,
                        request_id=request_id,
                        user_id=user,
                        state=state,
                        created_at=now,
                        updated_at=now,
                        owner_node=owner_node,
                        lease_expires=lease_expires,
                    )
                    .on_conflict_do_nothing(index_elements=[runs.c.context_id, runs.c.request_id])
                    .returning(*runs.c)
                )
            ).first()
            if inserted is not None:
                return run_from_row(inserted), True
            existing = (
                await conn.execute(
                    select(runs).where(runs.c.context_id == context_id, runs.c.request_id == request_id)
                )
            ).one()
            return run_from_row(existing), False

        return await self._run("create_run", body, write=True)

    async def set_run_state(
        self,
        run_id: str,
        state: str,
        now: float | None = None,
        *,
        from_states: Collection[str] | None = None,
    ) -> RunRecord:
        """Set a run's state; with ``from_states``, only if the current state is one of them (a
        compare-and-set, so two nodes cannot both finish a run). Returns the run as stored.
        Unknown run: StoreIntegrityError."""
        stamp = now_or_clock(now)

        async def body(conn: AsyncConnection) -> RunRecord:
            stmt = update(runs).where(runs.c.run_id == run_id)
            if from_states is not None:
                stmt = stmt.where(runs.c.state.in_(list(from_states)))
            changed = (
                await conn.execute(stmt.values(state=state, updated_at=stamp).returning(*runs.c))
            ).first()
            if changed is not None:
                return run_from_row(changed)
            current = (await conn.execute(select(runs).where(runs.c.run_id == run_id))).first()
            if current is None:
                raise StoreIntegrityError("set_run_state", f"no run {run_id!r}")
            return run_from_row(current)

        return await self._run("set_run_state", body, write=True)

    async def find_run(self, run_id: str) -> RunRecord | None:
        """The run, or None if there is no such run."""

        async def body(conn: AsyncConnection) -> RunRecord | None:
            row = (await conn.execute(select(runs).where(runs.c.run_id == run_id))).first()
            return None if row is None else run_from_row(row)

        return await self._run("find_run", body, write=False)

    async def unfinished_runs(self) -> list[RunRecord]:
        """Runs not in a terminal state (COMPLETED, FAILED, REJECTED), oldest first."""

        async def body(conn: AsyncConnection) -> list[RunRecord]:
            rows = await conn.execute(
                select(runs).where(runs.c.state.not_in(RUN_TERMINAL_STATES)).order_by(runs.c.created_at)
            )
            return [run_from_row(r) for r in rows]

        return await self._run("unfinished_runs", body, write=False)

    # -- run leases (section 6) ----------------------------------------------------------------------

    async def renew_run_leases(
        self, node_id: str, run_ids: Sequence[str], lease_expires: float
    ) -> dict[str, bool]:
        """Extend to ``lease_expires`` the leases ``node_id`` holds on ``run_ids`` (section 6).

        One conditional UPDATE: only a row still held by ``node_id`` and unfinished is renewed.
        Returns, for each run still held, whether a cancel was recorded for it
        (:meth:`record_run_cancel`); a run missing from the answer is no longer this node's (another
        node took it over after its lease expired, or it finished), and must not emit again.
        Renewing a lease that expired but that nobody took is allowed: nobody else has acted on it.
        """
        if not run_ids:
            return {}

        async def body(conn: AsyncConnection) -> dict[str, bool]:
            rows = await conn.execute(
                update(runs)
                .where(
                    runs.c.run_id.in_(list(run_ids)),
                    runs.c.owner_node == node_id,
                    runs.c.state.not_in(RUN_TERMINAL_STATES),
                )
                .values(lease_expires=lease_expires)
                .returning(runs.c.run_id, runs.c.cancel_requested)
            )
            return {str(r.run_id): bool(r.cancel_requested) for r in rows}

        return await self._run("renew_run_leases", body, write=True)

    async def claim_runs(
        self,
        node_id: str,
        now: float,
        lease_expires: float,
        *,
        scope: ClaimScope = "expired",
        exclude: Collection[str] = (),
    ) -> list[RunRecord]:
        """Take over unfinished runs for ``node_id`` until ``lease_expires`` (section 6); returns
        them as stored after the claim, oldest first.

        One conditional ``UPDATE ... RETURNING`` whose ``WHERE`` admits only what ``scope`` names
        (``"expired"``: a lease that ran out before ``now``, or none at all; ``"own"``: a lease
        ``node_id`` holds, left by its previous process; ``"all"``: every unfinished run, the
        single-node SQLite store at startup), except the runs in ``exclude``: those the claiming
        node runs itself, whose lease may run out while it is slow to renew. Two nodes claiming at once
        cannot both take a run: PostgreSQL locks the row and re-checks the ``WHERE`` for the second
        (which then sees the first's fresh lease), and SQLite admits one writer at a time.
        """
        conditions: list[ColumnElement[bool]] = [runs.c.state.not_in(RUN_TERMINAL_STATES)]
        if scope == "expired":
            conditions.append(or_(runs.c.lease_expires.is_(None), runs.c.lease_expires < now))
        elif scope == "own":
            conditions.append(runs.c.owner_node == node_id)
        elif scope != "all":
            raise ValueError(f"unknown claim scope {scope!r}")
        if exclude:
            conditions.append(runs.c.run_id.not_in(sorted(exclude)))

        async def body(conn: AsyncConnection) -> list[RunRecord]:
            rows = await conn.execute(
                update(runs)
                .where(*conditions)
                .values(owner_node=node_id, lease_expires=lease_expires)
                .returning(*runs.c)
            )
            return sorted((run_from_row(r) for r in rows), key=lambda r: (r.created_at, r.run_id))

        return await self._run("claim_runs", body, write=True)

    async def record_run_cancel(self, run_id: str, now: float | None = None) -> RunRecord:
        """Record a ``run.cancel`` on an unfinished run, for the node holding it (section 4, section
        6): it reads the flag when it renews the lease, and a node taking the run over honours it.
        A finished run is left as it is. Returns the run as stored; unknown run: StoreIntegrityError."""
        stamp = now_or_clock(now)

        async def body(conn: AsyncConnection) -> RunRecord:
            changed = (
                await conn.execute(
                    update(runs)
                    .where(runs.c.run_id == run_id, runs.c.state.not_in(RUN_TERMINAL_STATES))
                    .values(cancel_requested=true(), updated_at=stamp)
                    .returning(*runs.c)
                )
            ).first()
            if changed is not None:
                return run_from_row(changed)
            current = (await conn.execute(select(runs).where(runs.c.run_id == run_id))).first()
            if current is None:
                raise StoreIntegrityError("record_run_cancel", f"no run {run_id!r}")
            return run_from_row(current)

        return await self._run("record_run_cancel", body, write=True)
