"""Run leases on this node: which runs it holds, until when it may append for them, renewing and
claiming in the store (PROTOCOL section 6, "When a node dies").

Each unfinished run is held by one node, recorded in the store as ``runs.owner_node`` and
``runs.lease_expires`` (wall-clock seconds). The node running it renews the lease every
``lease_renew_interval`` to ``now + run_lease_ttl``; a node that finds a lease expired takes the
run over with one conditional UPDATE (:meth:`~pipeproof.impl.store.Store.claim_runs`) and ends it
(:class:`~pipeproof.impl.runs.AgentRuntime` decides how). :class:`RunLeases` is the bookkeeping
and the store calls; the loop that drives them is the runtime's.

The fence. A node that stalls (a long pause, a store it cannot reach) for longer than the TTL may
find its run already taken over and ended by another node. So before each append for a run the
runtime asks :meth:`RunLeases.ensure`: the node may append only while its last renewal started
less than ``run_lease_ttl - lease_renew_interval`` ago (the rest of the TTL is the margin for that
append to commit and for clock skew between nodes); past that it renews this one lease first, and
a lease another node now holds raises :class:`~pipeproof.errors.LeaseLost` before anything of the
step happens. Renewals on time (every ``lease_renew_interval``) keep the check a dict lookup.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final

from pipeproof.errors import LeaseLost

from .store import ClaimScope, RunRecord, Store

NEVER_VALID: Final = float("-inf")


@dataclass(frozen=True)
class Renewal:
    """What one renewal learnt: runs this node no longer holds, and runs a cancel was recorded for
    by another node (section 4: the holder honours it)."""

    lost: frozenset[str]
    cancelled: frozenset[str]


class RunLeases:
    """The leases of the runs this node holds (see module docstring).

    ``wall`` and ``monotonic`` are the clocks: the store's lease stamps are wall-clock seconds
    (every node compares them with its own wall clock, so nodes need clocks that agree to well
    within ``lease_renew_interval``), the fence is monotonic.
    """

    def __init__(
        self,
        store: Store,
        *,
        node_id: str,
        ttl: float,
        renew_interval: float,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < renew_interval < ttl:
            raise ValueError("the renewal interval must be positive and below the lease TTL")
        self.store = store
        self.node_id = node_id
        self.ttl = ttl
        self.renew_interval = renew_interval
        self._wall = wall
        self._monotonic = monotonic
        self._valid_until: dict[str, float] = {}  # run_id -> monotonic end of the fence
        self._granting: set[str] = set()  # runs whose granting write (create_run) is in flight
        self._lost: set[str] = set()

    # -- bookkeeping -------------------------------------------------------------------------------

    def stamp(self) -> tuple[float, float]:
        """``(monotonic now, lease_expires)`` for a lease granted now: take it *before* the store
        write that grants it, so the fence never outlasts the stored lease."""
        return self._monotonic(), self._wall() + self.ttl

    def granting(self, run_id: str) -> None:
        """A write granting this node ``run_id``'s lease is about to be queued: until
        :meth:`hold` (it committed) or :meth:`release` (it did not), no claim of this node names
        the run, and no renewal does either (the row may not exist yet: a renewal would find
        nothing and take the lease for lost)."""
        self._granting.add(run_id)

    def hold(self, run_id: str, granted_at: float) -> None:
        """This node holds ``run_id``'s lease, granted (or renewed) by a write started at
        ``granted_at`` (monotonic, from :meth:`stamp`)."""
        self._valid_until[run_id] = granted_at + self.ttl - self.renew_interval
        self._granting.discard(run_id)
        self._lost.discard(run_id)

    def release(self, run_id: str) -> None:
        """The run ended here (or was lost and its driver stopped, or its lease was never
        granted): stop renewing it, forget it."""
        self._valid_until.pop(run_id, None)
        self._granting.discard(run_id)
        self._lost.discard(run_id)

    def held(self) -> list[str]:
        """The runs this node holds (not those still being granted), in no particular order."""
        return list(self._valid_until)

    def holds(self, run_id: str) -> bool:
        return run_id in self._valid_until

    def lost(self, run_id: str) -> bool:
        """Another node took ``run_id`` over from this one."""
        return run_id in self._lost

    def valid(self, run_id: str) -> bool:
        """This node may append for ``run_id`` now without renewing first (the fence)."""
        return self._monotonic() < self._valid_until.get(run_id, NEVER_VALID)

    # -- store calls -------------------------------------------------------------------------------

    async def ensure(self, run_id: str) -> None:
        """Return when this node may append for ``run_id``: at once while the fence holds, else
        after renewing this lease. Raises LeaseLost when another node holds it now, and the
        StoreError of a renewal the store refused (the caller ends the run as on any store
        failure: its append would fail the same way)."""
        if self.valid(run_id):
            return
        if run_id in self._lost:
            raise LeaseLost("renew_run_leases", f"run {run_id}: another node took it over", frozenset({run_id}))
        granted_at, expires = self.stamp()
        still = await self.store.renew_run_leases(self.node_id, [run_id], expires)
        if run_id not in still:
            self._lose(run_id)
            raise LeaseLost("renew_run_leases", f"run {run_id}: the lease expired and another node took it over",
                            frozenset({run_id}))
        if run_id in self._valid_until:  # (released meanwhile: the run ended here)
            self.hold(run_id, granted_at)

    async def renew(self) -> Renewal:
        """Renew every lease this node holds in one conditional UPDATE; raises StoreError."""
        ids = self.held()
        if not ids:
            return Renewal(frozenset(), frozenset())
        granted_at, expires = self.stamp()
        still = await self.store.renew_run_leases(self.node_id, ids, expires)
        lost: set[str] = set()
        for run_id in ids:
            if run_id in still:
                if run_id in self._valid_until:
                    self.hold(run_id, granted_at)
            elif run_id in self._valid_until:
                self._lose(run_id)
                lost.add(run_id)
        cancelled = frozenset(run_id for run_id, flagged in still.items() if flagged)
        return Renewal(frozenset(lost), cancelled)

    async def claim(self, scope: ClaimScope, exclude: Collection[str] = ()) -> list[RunRecord]:
        """Take the runs ``scope`` names (see Store.claim_runs) and hold them; raises StoreError.
        The runs this node holds are never claimed (its own live runs are not orphans)."""
        granted_at, expires = self.stamp()
        skip = set(exclude) | set(self._valid_until) | self._granting
        claimed = await self.store.claim_runs(self.node_id, self._wall(), expires, scope=scope, exclude=skip)
        for record in claimed:
            self.hold(record.run_id, granted_at)
        return claimed

    def _lose(self, run_id: str) -> None:
        self._valid_until.pop(run_id, None)
        self._lost.add(run_id)


__all__ = ["Renewal", "RunLeases"]
