"""The store's transactions: reads on pooled connections, writes group-committed by one writer task.

Every write of one :class:`GroupCommitStore` goes through its writer task, which commits the writes
queued while the previous transaction ran in one transaction (why: :meth:`GroupCommitStore._write`)
on a connection it keeps while groups follow each other. A caller resumes only after its group's
COMMIT, so a caller that awaits an append before sending sends only what is durable (PROTOCOL
section 5: an event is stored before it is sent). A write whose body fails does not fail the
others: the group is rolled back and each write committed alone, with its own result or typed
error (:mod:`.errors`).

:class:`GroupCommitStore` is the base of :class:`~pipeproof.impl.store.Store` and knows nothing of
contexts, events or runs: writes of one kind may bring a :data:`Merge` that runs them all as a few
statements (the hot writes, :mod:`.stream`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import sqlalchemy.exc as sa_exc
from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from pipeproof.errors import StoreError, StoreRollbackFailed, StoreUnavailable

from .errors import describe, find_typed_error

T = TypeVar("T")

MAX_GROUP: Final = 256
"""Writes per group transaction at most: bounds how long one transaction holds the write lock."""


Merge = Callable[[AsyncConnection, list[Any]], Awaitable[list[Any]]]
"""Runs several writes of one kind as a few statements: takes their ``args``, returns one outcome
per write (its result, or the StoreError it would raise), in order. Raising, or refusing any
write, sends the whole group down the one-transaction-per-write path."""


@dataclass
class _PendingWrite(Generic[T]):
    """A write waiting for the writer task: its standalone body, optionally a merge of its kind
    with its arguments, and the caller's future (set after COMMIT)."""

    operation: str
    body: Callable[[AsyncConnection], Awaitable[T]]
    future: asyncio.Future[T]
    merge: Merge | None = None
    args: Any = None


class _GroupBodyFailed(Exception):
    """A write's body failed inside a group transaction (internal: the group is then retried
    write by write, so the caller sees the write's own error)."""

    def __init__(self, operation: str) -> None:
        super().__init__(operation)
        self.operation = operation


class _HeldConnection:
    """The writer task's connection, kept while groups follow each other."""

    def __init__(self) -> None:
        self.conn: AsyncConnection | None = None

    async def release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        # Returning a broken connection to the pool may fail: the pool discards it, and the
        # failure that broke it has already been raised to the writes that were using it.
        with contextlib.suppress(sa_exc.SQLAlchemyError, OSError):
            await conn.close()


def _fail(w: _PendingWrite[Any], exc: BaseException) -> None:
    if not w.future.done():
        w.future.set_exception(exc)


class GroupCommitStore:
    """The transactions under :class:`~pipeproof.impl.store.Store`'s operations.

    :meth:`_run` runs a read in its own transaction on a pooled connection, or queues a write;
    :meth:`_submit` and :meth:`_submit_one` queue a write (optionally of a merged kind) and return
    its future. One writer task per instance commits the queue in groups (:meth:`_write`).
    """

    def __init__(self, engine: AsyncEngine, *, secret: str | None, pg_schema: str | None) -> None:
        self._engine = engine
        self._secret = secret
        self._pg_schema = pg_schema
        self._dialect = engine.dialect.name
        # Group commit: every write of this process goes through one writer task (see _write).
        self._pending: list[_PendingWrite[Any]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._dialect

    @property
    def pg_schema(self) -> str | None:
        """The PostgreSQL schema the tables live in (None: the connection's default)."""
        return self._pg_schema

    # -- plumbing ----------------------------------------------------------------------------------

    async def _run(
        self, operation: str, body: Callable[[AsyncConnection], Awaitable[T]], *, write: bool
    ) -> T:
        """Run ``body`` in a transaction, commit, and type every store failure.

        Reads run in their own transaction on a pooled connection. Writes are group-committed:
        ``body`` joins the writer task's next transaction, and this returns (or raises) only
        after that transaction's COMMIT, so a caller that awaits an append before sending still
        sends only what is durable.
        """
        if not write:
            return await self._run_tx(operation, body, write=False)
        return await self._write(operation, body)

    async def _write(
        self,
        operation: str,
        body: Callable[[AsyncConnection], Awaitable[T]],
        *,
        merge: Merge | None = None,
        args: Any = None,
    ) -> T:
        """Queue a write for the writer task and wait for its commit.

        Why one writer: each transaction costs 1.5-3.5 ms of fixed overhead (BEGIN IMMEDIATE,
        COMMIT and its WAL sync, thread hops to the driver), and SQLite admits one writer at a
        time anyway. The writer takes every write queued while the previous transaction ran and
        commits them together, so that overhead is paid once per batch rather than per write.

        ``merge`` (the hot writes: append, mark_sent, ack_through, mark_pending, escalate) lets
        the group run every write of that kind as one or two statements: each statement costs a
        round trip (thread hops to the SQLite driver), so a group of N appends must not cost N
        statements. Writes queued
        together were issued concurrently (every caller awaits its write before its next one), so
        running them grouped by kind is equivalent to one of their possible arrival orders.
        """
        # A cancelled caller cancels its future: the writer then skips the write if it has not
        # started (as a cancelled transaction would have rolled back), or commits it with the
        # batch it is already part of (as a transaction cancelled after COMMIT would have).
        return await self._submit(operation, body, merge=merge, args=args)

    def _submit(
        self,
        operation: str,
        body: Callable[[AsyncConnection], Awaitable[T]],
        *,
        merge: Merge | None = None,
        args: Any = None,
    ) -> asyncio.Future[T]:
        """Queue a write for the writer task; its future resolves after the group's COMMIT."""
        if self._closing:
            raise StoreUnavailable(operation, "the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append(_PendingWrite(operation, body, future, merge, args))
        if self._writer is None or self._writer.done():
            # A fresh Event per writer: an asyncio.Event binds to the loop that first waits on it.
            self._wake = asyncio.Event()
            self._writer = loop.create_task(self._write_loop(), name="pipeproof-store-writer")
        self._wake.set()
        return future

    async def _write_loop(self) -> None:
        held = _HeldConnection()
        loop_gone = False
        try:
            while self._pending or not self._closing:
                if not self._pending:
                    if held.conn is not None:
                        # The callers of the group just committed resume in the next loop turn,
                        # and those that write again at once (append, then mark_sent, then ack)
                        # queue before this resumes: keep the connection for them. Releasing
                        # and checking out again costs a pool reset and a pre-ping, several
                        # round trips, per group.
                        await asyncio.sleep(0)
                        if self._pending:
                            continue
                    # Idle: the connection goes back to the pool, so the next group's checkout
                    # pre-pings it (a connection dropped while idle is replaced, not failed on).
                    await held.release()
                    # Clear, then re-check, then wait, with no await in between: a write queued
                    # during release() must not have its wake-up cleared.
                    self._wake.clear()
                    if not self._pending and not self._closing:
                        await self._wake.wait()
                    continue
                batch = self._pending[:MAX_GROUP]
                del self._pending[:MAX_GROUP]
                await self._commit_group(batch, held)
        except GeneratorExit:
            # The event loop was closed with this task still waiting, and the coroutine is being
            # collected: nothing can be awaited any more (awaiting here is what Python reports
            # as "coroutine ignored GeneratorExit"). The held connection goes with the loop.
            loop_gone = True
            raise
        finally:
            if not loop_gone:
                await asyncio.shield(held.release())
            # Cancelled (event loop shutting down) or a bug in this loop: no caller may wait
            # forever on a write the writer will not run. (With the loop gone nobody can wait.)
            if not loop_gone:
                for pending in self._pending:
                    _fail(pending, StoreUnavailable(pending.operation, "the store writer stopped"))
            self._pending.clear()

    async def _commit_group(self, batch: list[_PendingWrite[Any]], held: _HeldConnection) -> None:
        live = [w for w in batch if not w.future.done()]
        try:
            if len(live) == 1:  # alone: its own body, exactly an unmerged write
                await self._commit_alone(live[0], held)
            elif live:
                await self._commit_together(live, held)
        finally:
            # Cancellation mid-batch rolls the transaction back (``_run_tx``): say so to each caller.
            for w in live:
                if not w.future.done():  # (checked first: most are done, an exception costs)
                    _fail(w, StoreUnavailable(w.operation, "the store writer stopped before COMMIT"))

    async def _commit_alone(self, w: _PendingWrite[Any], held: _HeldConnection) -> None:
        try:
            result = await self._run_tx(w.operation, w.body, write=True, held=held)
        except Exception as exc:  # noqa: BLE001 - not swallowed: the waiting caller raises it
            # A StoreError, or a bug in the body: either way it belongs to this write's caller,
            # and the writer must live on for the other writes.
            _fail(w, exc)
            return
        if not w.future.done():
            w.future.set_result(result)

    async def _commit_together(self, live: list[_PendingWrite[Any]], held: _HeldConnection) -> None:
        # Plain writes run in queue order; each kind with a merge runs once, where its first
        # write was queued, for all the writes of that kind.
        steps: list[int | Merge] = []
        merged: dict[Merge, list[int]] = {}
        for index, w in enumerate(live):
            if w.merge is None:
                steps.append(index)
            elif w.merge in merged:
                merged[w.merge].append(index)
            else:
                merged[w.merge] = [index]
                steps.append(w.merge)

        async def body(conn: AsyncConnection) -> list[Any]:
            outcomes: list[Any] = [None] * len(live)
            for step in steps:
                if isinstance(step, int):
                    try:
                        outcomes[step] = await live[step].body(conn)
                    except Exception as exc:
                        # One write's failure (an unknown context, a conflict, a lock timeout)
                        # must not fail the others: roll back and commit each alone (below).
                        raise _GroupBodyFailed(live[step].operation) from exc
                    continue
                indexes = merged[step]
                try:
                    results = await step(conn, [live[i].args for i in indexes])
                except Exception as exc:
                    raise _GroupBodyFailed(live[indexes[0]].operation) from exc
                refused = next((r for r in results if isinstance(r, StoreError)), None)
                if refused is not None:
                    # A write refused on its own (an unknown context): rare, so the group takes
                    # the same path as any failure, and that write fails alone exactly as an
                    # unmerged write would (rolled back, typed, rollback failures included).
                    raise _GroupBodyFailed(refused.operation) from refused
                for i, result in zip(indexes, results, strict=True):
                    outcomes[i] = result
            return outcomes

        try:
            outcomes = await self._run_tx("group_commit", body, write=True, held=held)
        except _GroupBodyFailed:
            # The group rolled back; nothing of it is stored. Each write in its own
            # transaction, in order, gets its own result or its own typed error.
            for w in live:
                await self._commit_alone(w, held)
            return
        except StoreError as exc:
            # BEGIN or COMMIT failed: no write of the group is known to be stored, so every
            # caller gets the typed error under its own operation name.
            for w in live:
                typed = type(exc)(w.operation, exc.detail)
                typed.__cause__ = exc.__cause__
                _fail(w, typed)
            return
        for w, outcome in zip(live, outcomes, strict=True):
            if not w.future.done():
                w.future.set_result(outcome)

    async def _run_tx(
        self,
        operation: str,
        body: Callable[[AsyncConnection], Awaitable[T]],
        *,
        write: bool,
        held: _HeldConnection | None = None,
    ) -> T:
        """One transaction on a pooled connection, or on the writer's ``held`` one (kept across
        consecutive groups: a checkout costs a pre-ping round trip, more than a merged group)."""
        try:
            if held is None:
                async with self._engine.connect() as conn:
                    return await self._in_tx(conn, operation, body, write=write)
            if held.conn is None:
                held.conn = await self._engine.connect()
            try:
                return await self._in_tx(held.conn, operation, body, write=write)
            except BaseException:
                # After any failure the connection's state is not known to be clean: the next
                # transaction gets a fresh (pre-pinged) one.
                await held.release()
                raise
        except StoreError:
            raise
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            # OSError: the driver's own connect failures (refused, SSL rejected) are not wrapped.
            typed = find_typed_error(operation, exc, self._secret)
            if typed is None:
                raise
            raise typed from exc

    async def _in_tx(
        self, conn: AsyncConnection, operation: str, body: Callable[[AsyncConnection], Awaitable[T]], *, write: bool
    ) -> T:
        if write:
            sync = conn.sync_connection
            if sync is None or not sync.get_execution_options().get("pipeproof_write", False):
                # Once per connection: the writer's held connection keeps it across groups.
                await conn.execution_options(pipeproof_write=True)
        tx = await conn.begin()
        try:
            result = await body(conn)
        except BaseException as exc:
            try:
                await tx.rollback()
            except (sa_exc.SQLAlchemyError, OSError) as rollback_exc:
                # The outcome of the transaction is unknown: this must surface, typed.
                # (A group's failure is named by the write that failed in it.)
                failed = exc.__cause__ if isinstance(exc, _GroupBodyFailed) and exc.__cause__ else exc
                raise StoreRollbackFailed(
                    operation,
                    f"rollback after {type(failed).__name__} failed: "
                    f"{describe(rollback_exc, self._secret)}; "
                    f"original failure: {describe(exc, self._secret)}",
                ) from rollback_exc
            raise
        await tx.commit()
        return result

    def _insert(self, table: Table) -> Any:
        return pg_insert(table) if self._dialect == "postgresql" else sqlite_insert(table)

    # -- writes of a merged kind -------------------------------------------------------------------

    async def _write_one(self, operation: str, merge: Merge, args: Any) -> Any:
        """Queue one write of a merged kind and wait for its commit (see :meth:`_submit_one`)."""
        return await self._submit_one(operation, merge, args)

    def _submit_one(self, operation: str, merge: Merge, args: Any) -> asyncio.Future[Any]:
        """Queue one write of a merged kind: alone, its body is ``merge`` over just ``args``, and a
        refusal is raised (rolling the transaction back) instead of returned."""

        async def body(conn: AsyncConnection) -> Any:
            (outcome,) = await merge(conn, [args])
            if isinstance(outcome, StoreError):
                raise outcome
            return outcome

        return self._submit(operation, body, merge=merge, args=args)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Commit the writes already queued, then close every pooled connection. The store is
        unusable afterwards (a write raises StoreUnavailable)."""
        self._closing = True
        self._wake.set()
        writer = self._writer
        if writer is not None and not writer.done():
            await writer
        await self._engine.dispose()
