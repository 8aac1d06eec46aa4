"""This node among several on one PostgreSQL store (PROTOCOL section 3; section 5, "Several nodes";
section 6, "When a node dies").

:class:`ClusterLink` is everything a node does to be one of several:

* **heartbeat**: the node's ``nodes`` row is renewed every ``lease_renew_interval`` to ``now +
  run_lease_ttl``; a node whose row ran out is dead to the others (its sockets stop counting
  against the limits, its contexts' delivery is taken over);
* **connection slots**: it is the server's :class:`~pipeproof.impl.limits.ConnectionLimiter`,
  counting every alive node's sockets in the store (:meth:`~pipeproof.impl.store.Store.open_session`),
  so the per-user and per-account limits hold across the cluster;
* **notices**: a node that changed what others must act on (appended or sent events, stored
  acks, a socket that became READY or left, a context whose delivery it let go) sends a
  :class:`Notice` by ``NOTIFY``; every node ``LISTEN``\\ s and hands the notices of the other
  nodes to delivery (impl/delivery.py). A notice only says "read the store again", so a lost one
  costs time, never an outcome: every ``cluster_poll_interval`` delivery re-reads the store for
  everything it relays or owns (:meth:`ClusterLink.poll_loop`), and whenever the listener
  (re)connects it does so at once (what was notified before the LISTEN was missed).

How long a lost notice can delay an event: at most ``cluster_poll_interval`` plus one store read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from pipeproof.errors import StoreError, StoreUnavailable

from .limits import ConnectionLimitExceeded, Slot
from .metrics import Metrics
from .settings import Settings
from .store import Store

log = logging.getLogger("pipeproof.cluster")

NoticeKind = Literal["events", "acks", "sessions", "owner"]
"""What changed in a context: ``events`` appended or sent (relays write them, the owner adopts
them), ``acks`` stored by a relay (the owner fires them), ``sessions`` READY or gone on a node
(the owner relays through it or not), ``owner``: the owner let the context go (a node with
sockets of it takes it)."""

_CODES: Final[dict[str, NoticeKind]] = {kind[0]: kind for kind in get_args(NoticeKind)}
LISTEN_RETRY_MAX: Final = 5.0
"""Seconds between attempts to LISTEN again, at most (doubling from 0.1 s, with jitter)."""


@dataclass(frozen=True, slots=True)
class Notice:
    """One notification: ``kind`` happened to ``context_id`` on node ``origin``."""

    kind: NoticeKind
    context_id: str
    origin: str

    def encode(self) -> str:
        """``"e|<origin>|<context_id>"``: the kind's initial, then the two ids."""
        return f"{self.kind[0]}|{self.origin}|{self.context_id}"

    @classmethod
    def decode(cls, payload: str) -> Notice:
        """The notice of a payload; ValueError for one no node of this version sends."""
        code, sep, rest = payload.partition("|")
        origin, sep2, context_id = rest.partition("|")
        if not sep or not sep2 or code not in _CODES or not origin or not context_id:
            raise ValueError(f"not a pipeproof notice: {payload[:80]!r}")
        return cls(_CODES[code], context_id, origin)


def channel_name(pg_schema: str | None) -> str:
    """The NOTIFY channel of a store: one per database and schema, so that stores sharing a
    database in separate schemas (tests) do not hear each other."""
    return "pipeproof" if pg_schema is None else f"pipeproof.{pg_schema}"


class ClusterLink:
    """This node's heartbeat, store-counted slots and notices (see module docstring).

    ``on_notice`` gets each notice of another node; ``on_resync`` is called when notices may
    have been missed (the listener (re)connected) and must re-read the store. Both are
    delivery's (impl/delivery.py), set with :meth:`attach`.
    """

    def __init__(self, settings: Settings, store: Store, metrics: Metrics, *, pg_schema: str | None = None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.node_id = settings.node_id
        self.channel = channel_name(pg_schema)
        self.listening = asyncio.Event()
        self._on_notice: Callable[[Notice], None] = lambda notice: None
        self._on_resync: Callable[[], None] = lambda: None
        self._outbox: list[str] = []
        self._farewell: list[str] = []  # "owner" notices, sent after leaving (close)
        self._flush: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._slots: dict[str, Slot] = {}
        self._unreleased: dict[str, Slot] = {}  # slots whose release the store refused: retried
        self._ready_in: dict[str, str] = {}  # session_id -> the context it is READY in
        self.joined = asyncio.Event()  # no slot is taken before this node's join cleared its old ones
        self._rng = random.Random()
        self._closed = False

    def attach(self, on_notice: Callable[[Notice], None], on_resync: Callable[[], None]) -> None:
        self._on_notice, self._on_resync = on_notice, on_resync

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the cluster (what this node id's previous process held is let go), retried until
        the store takes it, then keep the heartbeat and the listener."""
        delay = 0.1
        while True:
            now = time.time()
            try:
                await self.store.join_cluster(self.node_id, now, now + self.settings.run_lease_ttl)
                break
            except StoreError as exc:
                self.metrics.store_errors.labels(type=exc.code).inc()
                log.warning("joining the cluster failed (%s); retrying", exc)
            await asyncio.sleep(delay * (1 + self._rng.random()))
            delay = min(delay * 2, LISTEN_RETRY_MAX)
        self.joined.set()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._heartbeat_loop(), name="cluster-heartbeat")]
        if self.settings.cluster_notify:
            self._tasks.append(loop.create_task(self._listen_loop(), name="cluster-listen"))

    def spawn(self, loop_body: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Run ``loop_body`` (delivery's poll loop) until :meth:`close`."""
        self._tasks.append(asyncio.get_running_loop().create_task(loop_body(), name=name))

    async def close(self) -> None:
        """Stop the loops, then leave the cluster at once: the other nodes take this node's
        contexts on their next poll instead of after its heartbeat runs out."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._flush is not None:
            # A failed send is logged by the flush itself (the others' polls catch up).
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush
        try:
            await self.store.leave_cluster(self.node_id)
            # Now the contexts this node owned are free: the nodes with sockets of them take them
            # at once rather than at their next poll.
            await self.store.notify(self.channel, self._farewell)
        except StoreError as exc:
            # Not fatal: the heartbeat runs out within run_lease_ttl and the others act then.
            log.warning("could not leave the cluster cleanly (%s); the others act when its heartbeat runs out", exc)

    # -- heartbeat ---------------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.lease_renew_interval
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            try:
                await self.store.heartbeat(self.node_id, now, now + self.settings.run_lease_ttl)
                for slot in list(self._unreleased.values()):
                    await self.store.close_session(slot.session_id)
                    self._unreleased.pop(slot.session_id, None)
                await self.store.reap_dead_nodes(now)
            except StoreError as exc:
                # Retried next round. A heartbeat missed for run_lease_ttl makes this node dead to
                # the others, who then take its contexts; its runs' fence stops it appending.
                self.metrics.store_errors.labels(type=exc.code).inc()
                log.warning("cluster heartbeat failed: %s", exc)

    # -- notices -------------------------------------------------------------------------------------------

    def tell(self, kind: NoticeKind, context_id: str) -> None:
        """Notify the other nodes that ``kind`` happened to ``context_id`` (coalesced: the notices
        of one event-loop turn go out in one transaction)."""
        if self._closed or not self.settings.cluster_notify:
            return
        payload = Notice(kind, context_id, self.node_id).encode()
        if kind == "owner":
            # Sent once this node has left (close): before, the others could not take it yet.
            self._farewell.append(payload)
            return
        if payload not in self._outbox:
            self._outbox.append(payload)
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self._send_notices(), name="cluster-notify")

    async def _send_notices(self) -> None:
        await asyncio.sleep(0)  # let the rest of this turn's notices join the batch
        while self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                await self.store.notify(self.channel, batch)
            except StoreError as exc:
                # Lost notices: the other nodes' polls find what they announced.
                self.metrics.store_errors.labels(type=exc.code).inc()
                log.warning("%d notices not sent (%s); the other nodes' polls catch up", len(batch), exc)
                return

    def _received(self, payload: str) -> None:
        try:
            notice = Notice.decode(payload)
        except ValueError:
            log.warning("ignored a notification this version does not send: %r", payload[:80])
            return
        if notice.origin != self.node_id:
            self._on_notice(notice)

    async def _listen_loop(self) -> None:
        """LISTEN, and LISTEN again after each failure, with backoff; each time the LISTEN is in
        place, delivery re-reads the store (notices sent meanwhile were missed)."""
        delay = 0.1

        def listening() -> None:
            nonlocal delay
            delay = 0.1
            self.listening.set()
            self._on_resync()

        while True:
            try:
                await self.store.listen(
                    self.channel,
                    self._received,
                    listening,
                    check_every=self.settings.cluster_poll_interval,
                    timeout=self.settings.store_timeout,
                )
            except StoreError as exc:
                self.listening.clear()
                self.metrics.store_errors.labels(type=exc.code).inc()
                log.warning("cluster listener lost (%s); polling until it is back", exc)
            await asyncio.sleep(delay * (1 + self._rng.random()))
            delay = min(delay * 2, LISTEN_RETRY_MAX)

    # -- connection slots (ConnectionLimiter) ---------------------------------------------------------

    async def acquire(self, session_id: str, user: str, account: str) -> Slot:
        """Take a slot counted across every alive node, or raise ConnectionLimitExceeded (the
        user checked before the account, as section 3 says); a StoreError propagates."""
        if not self.joined.is_set():
            try:
                async with asyncio.timeout(self.settings.store_timeout):
                    await self.joined.wait()
            except TimeoutError as exc:
                raise StoreUnavailable("open_session", "this node has not joined the cluster yet") from exc
        verdict = await self.store.open_session(
            session_id,
            self.node_id,
            user,
            account,
            time.time(),
            max_per_user=self.settings.max_connections_per_user,
            max_per_account=self.settings.max_connections_per_account,
        )
        if verdict == "user":
            raise ConnectionLimitExceeded("user", self.settings.max_connections_per_user)
        if verdict == "account":
            raise ConnectionLimitExceeded("account", self.settings.max_connections_per_account)
        slot = Slot(session_id, user, account)
        self._slots[session_id] = slot
        return slot

    async def release(self, slot: Slot) -> None:
        """Give the slot back (idempotent). A release the store refuses is retried by the
        heartbeat, so a slot is never held for a socket that is gone."""
        if self._slots.pop(slot.session_id, None) is None:
            return
        context_id = self._ready_in.pop(slot.session_id, None)
        try:
            await self.store.close_session(slot.session_id)
        except StoreError as exc:
            self._unreleased[slot.session_id] = slot
            self.metrics.store_errors.labels(type=exc.code).inc()
            log.warning("slot of %s not released (%s); retried with the heartbeat", slot.session_id, exc)
            return
        if context_id is not None:
            # After the row is gone: the owner re-reads which nodes still hold sockets of it.
            self.tell("sessions", context_id)

    def count(self, user: str, account: str) -> tuple[int, int]:
        """This node's sockets of ``user`` and ``account`` (the store has the cluster's)."""
        # Derived from the slots held, not kept as a second count (nothing calls it per handshake).
        slots = self._slots.values()
        return sum(s.user == user for s in slots), sum(s.account == account for s in slots)

    async def session_ready(self, session_id: str, context_id: str) -> None:
        """A socket of this node is READY in ``context_id``: recorded, and the owner told."""
        await self.store.session_ready(session_id, context_id)
        self._ready_in[session_id] = context_id
        self.tell("sessions", context_id)


__all__ = ["ClusterLink", "Notice", "NoticeKind", "channel_name"]
