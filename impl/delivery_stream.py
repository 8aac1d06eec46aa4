"""One context's delivery stream on this node: its sans-I/O core and the asyncio parts the core has
none of (PROTOCOL section 5; impl/delivery.py drives it).

:class:`Stream` holds the :class:`~pipeproof.core.delivery.DeliveryCore` of the context, the READY
sessions the core names by id, the stream's lock, the producers' outbox, and the clock task that
sleeps until ``core.next_deadline()`` and is woken only when the core reports an earlier deadline
(``core.earliest``). :func:`event_frame` is how a stored event goes on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from pipeproof.core.delivery import NEVER, DeliveryCore, Tracked
from pipeproof.errors import StoreError
from pipeproof.protocol.frames import EventFrame

from .handlers import Session
from .store import EventRecord


def event_frame(record: EventRecord, attempt: int) -> EventFrame:
    """The ``event`` frame of ``record``'s ``attempt`` (section 5)."""
    return EventFrame(
        seq=record.seq,
        event_id=record.event_id,
        run_id=record.run_id,
        event=record.kind,  # type: ignore[arg-type]
        data=dict(record.data),
        attempt=attempt,
    )


@dataclass
class Outgoing:
    """An event a producer queued: appended by the stream's appender, then sent."""

    run_id: str
    kind: str
    payload: str  # the data, encoded as the store keeps it
    user: str
    done: asyncio.Future[EventRecord] | None = None  # publish(durable=True) waits on it


@dataclass(eq=False)
class Stream:
    """One context's stream on this node: its core, and the asyncio parts around it."""

    context_id: str
    user: str
    core: DeliveryCore[EventRecord]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sessions: dict[str, Session] = field(default_factory=dict)  # the core's READY sessions, by id
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # wakes the clock (see wake)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    clock: asyncio.Task[None] | None = None
    users: int = 0  # publishes and session registrations in progress: the stream must not be dropped
    appending: int = 0  # events in the append being committed: they count against the window
    outbox: list[Outgoing] = field(default_factory=list)  # queued, not yet handed to the store
    appender: asyncio.Task[None] | None = None  # commits the outbox batch by batch (publish)
    refused: dict[str, StoreError] = field(default_factory=dict)  # run_id -> why its events were dropped
    # Held by the appender from its commit to handing the records to the core, and by an adoption
    # of stored events (DeliveryService.adopt) from its read to its restore: so an event this node
    # just appended is never also adopted as another node's.
    gate: asyncio.Lock = field(default_factory=asyncio.Lock)
    settling: set[int] = field(default_factory=set)  # let go by the core, store write in flight
    due: float = -NEVER  # what the clock sleeps until; -inf while it is awake and will recompute
    # Several nodes (section 6): "owner" when this node makes the context's delivery decisions
    # (always, on one node), "relay" when another node does and this one only writes the attempts
    # it stored as SENT to its own sockets; None until the store has said which.
    role: str | None = "owner"
    remote: set[str] = field(default_factory=set)  # owner: "node:<id>" of the other nodes with READY sockets
    relayed: dict[str, dict[int, int]] = field(default_factory=dict)  # relay: session -> seq -> attempt written
    relay_top: int = 0  # relay: the highest seq written to a socket here
    # relay: every event through this seq has been read with its first send decided (SENT, ACKED
    # or ESCALATED, not PENDING at attempt 0): what is above it is new, and goes to every socket
    # here once even if another node's client acked it first (fan-out of the first send).
    relay_seen: int = 0
    relay_base: dict[str, int] = field(default_factory=dict)  # relay: session -> last seq before it joined
    relay_terminals: set[str] = field(default_factory=set)  # relay: runs whose terminal event is in delivery
    wanted: set[str] = field(default_factory=set)  # what notices asked to re-read (impl/delivery.py)
    worker: asyncio.Task[None] | None = None  # re-reads what ``wanted`` names

    @property
    def live(self) -> Mapping[int, Tracked[EventRecord]]:
        """The unfinished events, in seq order (the core's)."""
        return self.core.live

    @property
    def acking(self) -> bool:
        return self.core.acking

    def idle(self) -> bool:
        """Nothing live, queued or in progress, and no run left to tell: the stream may go."""
        return (not self.core.live and not self.sessions and self.users == 0 and not self.outbox
                and not self.refused and not self.settling and not self.wanted)

    def wake(self) -> None:
        """Wake the clock if the core now has a deadline before what it sleeps until. Most
        changes only add later deadlines (a send's ack wait) or remove some (an ack): waking the
        clock for those would cost a wake-up and a scan per event."""
        if self.core.earliest < self.due:
            self.changed.set()

    def start_clock(self, fire: Callable[[Stream], Awaitable[None]], stopped: Callable[[], bool]) -> None:
        """Run the clock task unless it is running: ``fire(stream)`` at each due deadline."""
        if self.clock is None or self.clock.done():
            self.due = -NEVER
            self.clock = asyncio.get_running_loop().create_task(
                self._run_clock(fire, stopped), name=f"delivery-clock-{self.context_id}"
            )

    async def _run_clock(self, fire: Callable[[Stream], Awaitable[None]], stopped: Callable[[], bool]) -> None:
        """Fire every due deadline of the stream; ends when the stream has nothing unfinished."""
        while self.core.live and not stopped():
            self.changed.clear()
            due = self.core.next_deadline()
            wait = due - time.monotonic()  # the clock the shell gives the core
            if wait > 0:
                self.due = due
                try:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(None if due == NEVER else wait):
                            await self.changed.wait()
                finally:
                    self.due = -NEVER
                continue
            # Shielded: a clock cancelled at shutdown does not cut a store write from its transitions.
            await asyncio.shield(fire(self))


__all__ = ["Outgoing", "Stream", "event_frame"]
