"""What the server does with frames once a socket is READY (PROTOCOL sections 4 and 5).

The connection shell (impl/session.py) parses each frame and, once the model allows
``handle_frame``, calls exactly one method of a :class:`FrameHandler` with a :class:`Session`.
Handlers never write to the socket directly: ``session.send`` goes through the single choke point
(impl/sender.py). :class:`UnavailableRuns` is the part-1 default; the runs and delivery
implementation replaces it by passing its own handler to ``create_app``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from pipeproof.protocol.frames import Ack, ConnectionAck, ErrorFrame, EventFrame, RunAccepted, RunCancel, RunStart

OutboundFrame = ConnectionAck | EventFrame | RunAccepted | ErrorFrame


@runtime_checkable
class Session(Protocol):
    """A READY socket as a handler sees it (read-only identity plus the one way to send)."""

    @property
    def session_id(self) -> str: ...

    @property
    def user(self) -> str: ...

    @property
    def account(self) -> str: ...

    @property
    def context_id(self) -> str: ...

    @property
    def epoch(self) -> int: ...

    @property
    def ready_seq(self) -> int:
        """The context's highest seq when the socket became READY (its connection_ack's
        ``last_seq``): what is appended after it is new to this socket (section 5 fan-out)."""
        ...

    async def wait_room(self, timeout: float) -> None:
        """Wait, at most ``timeout`` seconds, until ``send`` can queue a frame (section 6 back-pressure)."""
        ...

    async def send(self, frame: OutboundFrame) -> None:
        """Queue ``frame`` on the socket's choke point (an ``event`` fires the model's ``deliver``).

        Queues without suspending (the ``await`` never yields to the event loop): delivery relies
        on this to check an event's machine and queue its frame with nothing in between.

        Raises :class:`~pipeproof.impl.sender.SendFailed` if the socket is closed or its queue is
        full (the socket is then closed through the machine); never fails silently.
        """
        ...


@runtime_checkable
class FrameHandler(Protocol):
    """Handles client frames after READY, one at a time per socket, in arrival order (section 1)."""

    async def on_ack(self, session: Session, frame: Ack) -> None: ...

    async def on_run_start(self, session: Session, frame: RunStart) -> None: ...

    async def on_run_cancel(self, session: Session, frame: RunCancel) -> None: ...


@runtime_checkable
class SessionObserver(Protocol):
    """A handler that also follows sockets (sections 1 and 5: delivery fans out to READY sockets,
    a resume acks and redelivers). ``on_session_ready`` runs after the connection_ack is queued;
    ``on_session_closed`` when the socket leaves READY for good (called at most once per socket)."""

    async def on_session_ready(self, session: Session, resume_last_seq: int | None) -> None: ...

    def on_session_closed(self, session: Session) -> None: ...


@runtime_checkable
class LifecycleHandler(Protocol):
    """A handler with a lifecycle: ``start`` once the store is open (recovery of unfinished
    events), ``stop`` at shutdown before the store closes (section 6)."""

    def start(self, state: Any, store: Any) -> None: ...

    async def stop(self, grace: float) -> None: ...


class UnavailableRuns:
    """Part 1: runs are not implemented yet, and say so on the wire instead of going silent.

    ``run.start`` and ``run.cancel`` answer ``{"type":"error","code":"runs_unavailable"}`` (with the
    ``request_id`` for ``run.start``); an ``ack`` is accepted and has nothing to acknowledge.
    """

    async def on_ack(self, session: Session, frame: Ack) -> None:
        return None

    async def on_run_start(self, session: Session, frame: RunStart) -> None:
        await session.send(
            ErrorFrame(code="runs_unavailable", request_id=frame.request_id, detail="runs are not enabled")
        )

    async def on_run_cancel(self, session: Session, frame: RunCancel) -> None:
        await session.send(ErrorFrame(code="runs_unavailable", detail="runs are not enabled"))


__all__ = ["FrameHandler", "LifecycleHandler", "OutboundFrame", "Session", "SessionObserver", "UnavailableRuns"]
