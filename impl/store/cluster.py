"""The store's cluster operations: node heartbeats, connection slots counted across nodes, one
delivery owner per context, and the notifications between nodes (PROTOCOL section 3 and
section 5, "Several nodes").

Everything a node must agree on with the others is decided here, by the database:

* a node is alive while its ``nodes`` row has not expired (it renews it every lease renewal
  interval); nothing else is trusted about another node;
* a connection slot is a ``sessions`` row, inserted only if the user's and the account's live
  rows (those of alive nodes) are under their limits, counted in the inserting transaction while
  the user and the account are locked (a PostgreSQL advisory transaction lock each; SQLite's
  ``BEGIN IMMEDIATE`` admits one writer at a time), so two nodes can never both take the last slot;
* a context's delivery decisions are made by the node in its ``delivery_owners`` row, taken by one
  upsert whose ``WHERE`` admits only a free row, the taker's own, or a row of a dead node.

Notifications (PostgreSQL ``NOTIFY``) only say "look again": what a node acts on is always read
back from the tables, so a lost or duplicated notification delays, and never changes, an outcome.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Collection, Iterable
from typing import Any, Final, Literal

from sqlalchemy import ColumnElement, Exists, and_, delete, exists, func, or_, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from pipeproof.errors import StoreTimeout, StoreUnavailable

from .errors import describe, find_typed_error
from .schema import delivery_owners, events, nodes, sessions
from .stream import _LIVE_VALUES
from .writer import GroupCommitStore

SlotVerdict = Literal["granted", "user", "account"]
"""What :meth:`ClusterStore.open_session` decided: the slot is taken, or which limit refused it."""

NOTIFY_PAYLOAD_MAX: Final = 7999
"""PostgreSQL refuses a NOTIFY payload of 8000 bytes or more."""


def advisory_key(kind: str, name: str) -> int:
    """A stable signed 64-bit advisory lock key for ``kind:name`` (crc32 of each part, so two
    processes, whatever their Python hash seed, lock the same key)."""
    high = zlib.crc32(kind.encode())
    low = zlib.crc32(name.encode())
    key = (high << 32) | low
    return key - (1 << 64) if key >= 1 << 63 else key


class ClusterStore(GroupCommitStore):
    """Nodes, connection slots, delivery owners and notifications (see module docstring)."""

    # -- nodes -------------------------------------------------------------------------------------

    @staticmethod
    def _alive(node_column: ColumnElement[Any], now: float) -> Exists:
        """``node_column`` names a node whose heartbeat has not run out at ``now``."""
        return exists().where(nodes.c.node_id == node_column, nodes.c.expires > now)

    async def heartbeat(self, node_id: str, now: float, expires: float) -> None:
        """Record that ``node_id`` is alive until ``expires`` (wall-clock seconds)."""

        async def body(conn: AsyncConnection) -> None:
            stmt = self._insert(nodes).values(node_id=node_id, started_at=now, expires=expires)
            await conn.execute(
                stmt.on_conflict_do_update(index_elements=[nodes.c.node_id], set_={"expires": expires})
            )

        await self._run("heartbeat", body, write=True)

    async def join_cluster(self, node_id: str, now: float, expires: float) -> None:
        """A node (re)starts: what its previous process left under this node id (slots of sockets
        that are gone, delivery it no longer tracks) is let go, then its heartbeat starts."""

        async def body(conn: AsyncConnection) -> None:
            await conn.execute(delete(sessions).where(sessions.c.node_id == node_id))
            await conn.execute(delete(delivery_owners).where(delivery_owners.c.node_id == node_id))
            stmt = self._insert(nodes).values(node_id=node_id, started_at=now, expires=expires)
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[nodes.c.node_id], set_={"expires": expires, "started_at": now}
                )
            )

        await self._run("join_cluster", body, write=True)

    async def leave_cluster(self, node_id: str) -> None:
        """A node stops cleanly: its slots and delivery are let go and it is dead at once, so the
        other nodes take its contexts without waiting for the heartbeat to run out."""

        async def body(conn: AsyncConnection) -> None:
            await conn.execute(delete(sessions).where(sessions.c.node_id == node_id))
            await conn.execute(delete(delivery_owners).where(delivery_owners.c.node_id == node_id))
            await conn.execute(delete(nodes).where(nodes.c.node_id == node_id))

        await self._run("leave_cluster", body, write=True)

    async def reap_dead_nodes(self, now: float) -> int:
        """Delete the slots of dead nodes' sockets (they stopped counting when the node died; this
        only keeps the table small). Returns how many."""

        async def body(conn: AsyncConnection) -> int:
            gone = await conn.execute(
                delete(sessions).where(~self._alive(sessions.c.node_id, now)).returning(sessions.c.session_id)
            )
            return len(gone.all())

        return await self._run("reap_dead_nodes", body, write=True)

    async def alive_nodes(self, now: float) -> list[str]:
        """The ids of the nodes alive at ``now``, sorted."""

        async def body(conn: AsyncConnection) -> list[str]:
            rows = await conn.execute(select(nodes.c.node_id).where(nodes.c.expires > now).order_by(nodes.c.node_id))
            return [str(r.node_id) for r in rows]

        return await self._run("alive_nodes", body, write=False)

    # -- connection slots (section 3, connection_limit) --------------------------------------------

    async def open_session(
        self,
        session_id: str,
        node_id: str,
        user: str,
        account: str,
        now: float,
        *,
        max_per_user: int,
        max_per_account: int,
    ) -> SlotVerdict:
        """Take a connection slot for a socket if the user and the account are under their limits
        across every alive node; returns ``"granted"`` or the limit that refused (user first)."""

        async def body(conn: AsyncConnection) -> SlotVerdict:
            if self._dialect == "postgresql":
                # User before account, in every transaction: no two can wait on each other.
                for kind, name in (("user", user), ("account", account)):
                    await conn.execute(select(func.pg_advisory_xact_lock(advisory_key(kind, name))))
            alive = self._alive(sessions.c.node_id, now)
            checks: tuple[tuple[ColumnElement[Any], str, int, SlotVerdict], ...] = (
                (sessions.c.user_id, user, max_per_user, "user"),
                (sessions.c.account_id, account, max_per_account, "account"),
            )
            for column, name, limit, verdict in checks:
                count = (
                    await conn.execute(select(func.count()).select_from(sessions).where(column == name, alive))
                ).scalar_one()
                if int(count) >= limit:
                    return verdict
            await conn.execute(
                sessions.insert().values(
                    session_id=session_id, node_id=node_id, user_id=user, account_id=account, opened_at=now
                )
            )
            return "granted"

        # Its own transaction, not a group's: the advisory locks are held until its COMMIT, and a
        # group holding several users' locks could wait on another node's group in a cycle.
        return await self._run_tx("open_session", body, write=True)

    async def session_ready(self, session_id: str, context_id: str) -> None:
        """The socket is READY in ``context_id`` (its context's owner relays through this node)."""

        async def body(conn: AsyncConnection) -> None:
            await conn.execute(
                update(sessions).where(sessions.c.session_id == session_id).values(context_id=context_id)
            )

        await self._run("session_ready", body, write=True)

    async def close_session(self, session_id: str) -> None:
        """Give the socket's slot back (idempotent)."""

        async def body(conn: AsyncConnection) -> None:
            await conn.execute(delete(sessions).where(sessions.c.session_id == session_id))

        await self._run("close_session", body, write=True)

    async def count_sessions(self, user: str, account: str, now: float) -> tuple[int, int]:
        """Live slots of ``user`` and of ``account`` across alive nodes."""

        async def body(conn: AsyncConnection) -> tuple[int, int]:
            alive = self._alive(sessions.c.node_id, now)
            counts = []
            for column, name in ((sessions.c.user_id, user), (sessions.c.account_id, account)):
                query = select(func.count()).select_from(sessions).where(column == name, alive)
                counts.append(int((await conn.execute(query)).scalar_one()))
            return counts[0], counts[1]

        return await self._run("count_sessions", body, write=False)

    async def ready_nodes(self, context_ids: Collection[str], now: float) -> dict[str, frozenset[str]]:
        """For each of ``context_ids``, the alive nodes holding a READY socket of it (a context
        with none is absent from the answer)."""
        if not context_ids:
            return {}

        async def body(conn: AsyncConnection) -> dict[str, frozenset[str]]:
            rows = await conn.execute(
                select(sessions.c.context_id, sessions.c.node_id)
                .where(sessions.c.context_id.in_(sorted(context_ids)), self._alive(sessions.c.node_id, now))
                .distinct()
            )
            found: dict[str, set[str]] = {}
            for r in rows:
                found.setdefault(str(r.context_id), set()).add(str(r.node_id))
            return {c: frozenset(n) for c, n in found.items()}

        return await self._run("ready_nodes", body, write=False)

    # -- delivery owners (section 5 decisions, once per cluster) -------------------------------------

    async def claim_delivery(self, context_id: str, node_id: str, now: float) -> str:
        """Make ``node_id`` the context's delivery owner if the row is free, already its own, or
        held by a dead node; returns the owner after the claim (``node_id`` or the live holder)."""

        async def body(conn: AsyncConnection) -> str:
            stmt = self._insert(delivery_owners).values(context_id=context_id, node_id=node_id, since=now)
            taken = (
                await conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[delivery_owners.c.context_id],
                        set_={"node_id": node_id, "since": now},
                        where=or_(
                            delivery_owners.c.node_id == node_id,
                            ~self._alive(delivery_owners.c.node_id, now),
                        ),
                    ).returning(delivery_owners.c.node_id)
                )
            ).first()
            if taken is not None:
                return str(taken.node_id)
            holder = (
                await conn.execute(select(delivery_owners.c.node_id).where(delivery_owners.c.context_id == context_id))
            ).scalar_one()
            return str(holder)

        return await self._run("claim_delivery", body, write=True)

    async def release_delivery(self, context_ids: Iterable[str], node_id: str) -> None:
        """``node_id`` no longer decides for ``context_ids`` (it tracks nothing of them)."""
        ids = sorted(set(context_ids))
        if not ids:
            return

        async def body(conn: AsyncConnection) -> None:
            await conn.execute(
                delete(delivery_owners).where(
                    delivery_owners.c.context_id.in_(ids), delivery_owners.c.node_id == node_id
                )
            )

        await self._run("release_delivery", body, write=True)

    async def owned_deliveries(self, node_id: str) -> list[str]:
        """The contexts whose delivery ``node_id`` owns, sorted."""

        async def body(conn: AsyncConnection) -> list[str]:
            rows = await conn.execute(
                select(delivery_owners.c.context_id).where(delivery_owners.c.node_id == node_id)
                .order_by(delivery_owners.c.context_id)
            )
            return [str(r.context_id) for r in rows]

        return await self._run("owned_deliveries", body, write=False)

    async def orphaned_deliveries(self, now: float, limit: int = 1000) -> list[str]:
        """Contexts with events still in delivery whose owner is absent or dead: what a surviving
        node must take over (section 6), sorted, at most ``limit``."""

        async def body(conn: AsyncConnection) -> list[str]:
            owned_alive = (
                select(delivery_owners.c.context_id)
                .where(
                    delivery_owners.c.context_id == events.c.context_id,
                    self._alive(delivery_owners.c.node_id, now),
                )
                .exists()
            )
            rows = await conn.execute(
                select(events.c.context_id)
                .where(events.c.state.in_(_LIVE_VALUES), ~owned_alive)
                .distinct()
                .order_by(events.c.context_id)
                .limit(limit)
            )
            return [str(r.context_id) for r in rows]

        return await self._run("orphaned_deliveries", body, write=False)

    async def acked_among(self, context_id: str, seqs: Collection[int]) -> list[int]:
        """Which of ``seqs`` the store holds ACKED (acked through another node), ascending."""
        if not seqs:
            return []

        async def body(conn: AsyncConnection) -> list[int]:
            rows = await conn.execute(
                select(events.c.seq).where(
                    and_(events.c.context_id == context_id, events.c.seq.in_(sorted(seqs)), events.c.state == "ACKED")
                ).order_by(events.c.seq)
            )
            return [int(r.seq) for r in rows]

        return await self._run("acked_among", body, write=False)

    # -- notifications ---------------------------------------------------------------------------------

    async def notify(self, channel: str, payloads: Iterable[str]) -> None:
        """Send ``payloads`` on ``channel`` (PostgreSQL NOTIFY; each delivered to every listener
        once this commits). A payload too long for NOTIFY is a bug here: ValueError."""
        batch = list(payloads)
        for payload in batch:
            if len(payload.encode()) > NOTIFY_PAYLOAD_MAX:
                raise ValueError(f"a NOTIFY payload of {len(payload.encode())} bytes is over {NOTIFY_PAYLOAD_MAX}")
        if not batch or self._dialect != "postgresql":
            return

        async def body(conn: AsyncConnection) -> None:
            for payload in batch:
                await conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": channel, "p": payload})

        await self._run("notify", body, write=True)

    async def listen(
        self,
        channel: str,
        on_payload: Callable[[str], None],
        on_listening: Callable[[], None],
        *,
        check_every: float,
        timeout: float,
    ) -> None:
        """LISTEN on ``channel`` on a connection of its own, calling ``on_payload`` with each
        payload, until that connection fails; then raise the StoreError that says why (it never
        returns). ``on_listening`` runs once the LISTEN is in place: what was notified before it
        must be read from the store.

        A connection cut is noticed by the driver; one that stalls is noticed by a ``SELECT 1``
        every ``check_every`` seconds that must answer within ``timeout``.
        """
        if self._dialect != "postgresql":
            raise ValueError("LISTEN/NOTIFY needs the PostgreSQL store")

        def deliver(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            on_payload(payload)

        try:
            async with asyncio.timeout(timeout):
                conn = await self._engine.connect()
            try:
                raw = await conn.get_raw_connection()
                driver: Any = raw.driver_connection  # asyncpg's Connection: LISTEN is driver-level
                async with asyncio.timeout(timeout):
                    await driver.add_listener(channel, deliver)
                on_listening()
                while True:
                    await asyncio.sleep(check_every)
                    async with asyncio.timeout(timeout):
                        # On the driver, outside any transaction: PostgreSQL holds notifications
                        # back from a session inside one (SQLAlchemy's execute would open one).
                        await driver.fetchval("SELECT 1")
            finally:
                # A dead connection is discarded, not returned to the pool; a bounded close.
                try:
                    async with asyncio.timeout(timeout):
                        await conn.invalidate()
                        await conn.close()
                except (TimeoutError, sa_exc.SQLAlchemyError, OSError):
                    pass  # already gone: nothing of it is reused, and the failure that ended it is raised
        except TimeoutError as exc:
            raise StoreTimeout("listen", f"no answer within {timeout:g}s") from exc
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            typed = find_typed_error("listen", exc, self._secret)
            raise (typed or StoreUnavailable("listen", describe(exc, self._secret))) from exc
        except Exception as exc:
            # The driver's own errors (add_listener is asyncpg's, not SQLAlchemy's): typed here;
            # anything else is a bug and propagates as it is.
            if not type(exc).__module__.startswith("asyncpg"):
                raise
            raise StoreUnavailable("listen", describe(exc, self._secret)) from exc


__all__ = ["ClusterStore", "SlotVerdict", "advisory_key"]
