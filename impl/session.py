"""One socket's lifecycle, driven by the model's connection machine (PROTOCOL sections 1, 2, 3, 6).

:class:`ConnectionShell` is the thin I/O shell around one
``Runner(CONNECTION.with_params(buffer_max=preready_buffer_frames))`` (wrapped in a
:class:`~pipeproof.impl.audit.TracedMachine`). It never asks "which state am I in" to decide what
a frame means; it fires the model event the input stands for and acts on the transition the
model returns:

* connection_init -> ``recv_init`` (OPEN -> INITIALISING starts auth; INITIALISING/READY ->
  CLOSED is the duplicate-init close 4429);
* any other frame -> ``recv_frame`` (OPEN -> CLOSED 4401 init_required; INITIALISING: buffered,
  overflow -> CLOSED 4429 preready_buffer_full; READY: queued behind earlier frames);
* auth -> ``auth_reject`` (4401 token_* / 4403 user_disabled) or ``limit_reject`` (4429
  connection_limit) or ``auth_ok`` (READY), then ``send_ack`` (the ack is queued), then one
  ``handle_frame`` per queued frame, in arrival order, each dispatched to the FrameHandler;
* no init in time -> ``init_timeout`` (4408); a silent peer -> ``heartbeat_timeout`` (4408);
  a failed write -> ``send_error``; server shutdown -> ``drain`` then ``drain_close`` (1001);
  the peer leaving -> ``peer_close``.

Closes the model has no dedicated event for (the pre-READY byte budget, the error budget, a store
failure while resolving the context, an audit log that cannot be written before a frame: 1013)
fire ``peer_close`` -- the "any state -> CLOSED" edge -- with the close code and reason in the
audit ``detail``. An ``IllegalTransition`` that should never happen is a server bug: it is
counted (``pipeproof_illegal_transitions``), logged, and the socket is closed with 4400 (or 4429
when it came from a buffer overflow), never 1011.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket

from pipeproof.errors import IllegalTransition, StoreError
from pipeproof.model.connection import CONNECTION, Conn
from pipeproof.model.spec import Machine, Transition
from pipeproof.protocol import AuthCode, CloseReason
from pipeproof.protocol.frames import (
    Ack,
    ConnectionAck,
    ConnectionInit,
    ErrorFrame,
    InvalidMessage,
    RunCancel,
    RunStart,
    parse_client_frame,
)

from .audit import TracedMachine
from .auth import AuthError, authenticate
from .handlers import OutboundFrame, SessionObserver
from .limits import ConnectionLimitExceeded, Slot
from .protocol import EXTENSION
from .sender import Sender, SendFailed

if TYPE_CHECKING:
    from .app import ServerState

log = logging.getLogger("pipeproof.session")

ClientItem = ConnectionInit | Ack | RunStart | RunCancel | InvalidMessage


@dataclass(frozen=True)
class _Queued:
    item: ClientItem
    size: int


def close_of(transition: Transition) -> CloseReason | None:
    """The close a transition determines (its ``Close`` emits with a single reason), if any."""
    close = transition.close
    return close.reason if close is not None else None


def _type_of(item: ClientItem) -> str:
    return f"invalid:{item.frame_type}" if isinstance(item, InvalidMessage) else item.type



@functools.lru_cache(maxsize=8)
def connection_machine(buffer_max: int) -> Machine:
    """The connection machine with its buffer parameter, built once per value: ``with_params``
    re-validates the machine and its compiled transitions are cached per instance, so one
    instance per socket would recompile them on every connection."""
    return CONNECTION.with_params(buffer_max=buffer_max)

class ConnectionShell:
    """Drives one accepted WebSocket; also the :class:`~pipeproof.impl.handlers.Session` that
    handlers see (``session_id``, ``user``, ``account``, ``context_id``, ``epoch``, ``send``)."""

    def __init__(self, state: ServerState, ws: WebSocket) -> None:
        self.state = state
        self.settings = state.settings
        self.ws = ws
        self.session_id = uuid.uuid4().hex
        self._user: str | None = None
        self._account: str | None = None
        self._context_id: str | None = None
        self._epoch = 0
        self.conn = TracedMachine(
            connection_machine(self.settings.preready_buffer_frames),
            "connection",
            self.session_id,
            state.audit,
            listener=lambda _m, t: state.metrics.on_connection_transition(t),
        )
        self._queue: deque[_Queued] = deque()
        self._queued_bytes = 0
        self._wake_worker = asyncio.Event()
        self._room = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot: Slot | None = None
        self._attached = False
        self._errors = 0
        self._init_started = 0.0
        self.last_heard = time.monotonic()
        self.close_code: tuple[int, str] | None = None
        self.sender: Sender | None = None
        self._observed = False  # the handler was told this socket is READY (SessionObserver)

    # -- Session protocol (impl/handlers.py) ----------------------------------------------------

    @property
    def user(self) -> str:
        if self._user is None:
            raise RuntimeError("session is not READY: no user yet")
        return self._user

    @property
    def account(self) -> str:
        if self._account is None:
            raise RuntimeError("session is not READY: no account yet")
        return self._account

    @property
    def context_id(self) -> str:
        if self._context_id is None:
            raise RuntimeError("session is not READY: no context yet")
        return self._context_id

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_room(self, timeout: float) -> None:
        """Wait until the send queue can take a frame (at most ``timeout``; see Sender.wait_room)."""
        if self.sender is not None:
            await self.sender.wait_room(timeout)

    async def send(self, frame: OutboundFrame) -> None:
        """Queue ``frame`` through the choke point; a full queue closes the socket (1013)."""
        if self.sender is None:
            raise SendFailed("closed", "socket not accepted")
        try:
            self.sender.send(frame)
        except SendFailed as exc:
            if exc.why == "queue_full":
                # A peer that does not read is treated like a failed write (its events stay
                # pending for resume); DRAINING has no send_error edge, so it leaves via peer_close.
                event = "send_error" if self.conn.can("send_error") else "peer_close"
                self._close_via(
                    event, close=CloseReason.TRY_AGAIN_LATER, detail={"send_failed": "queue_full"}
                )
            raise

    # -- lifecycle --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Accept the socket and drive it to CLOSED (the FastAPI route's whole body)."""
        await self.ws.accept()
        self.state.metrics.socket_opened()
        self.sender = Sender(
            self.ws, self.conn, queue_max=self.settings.send_queue_max, on_failure=self._on_send_failed
        )
        self.state.sessions.add(self)
        hook = self._extension("on_shutdown")
        if hook is not None:
            hook(self.begin_drain, self.settings.shutdown_grace)
        self._spawn(self._work(), "worker")
        try:
            await self._read_loop()
            await self._closed.wait()
        finally:
            await self._teardown()

    def _extension(self, name: str) -> Any:
        ext = self.ws.scope.get("extensions") or {}
        hooks: Mapping[str, Any] = ext.get(EXTENSION) or {}
        return hooks.get(name)

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            coro, name=f"{name}-{self.session_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A bug escaped a session task. It must not pass silently nor end as 1011: count it,
            # log it with its traceback, and close with the documented "protocol broken" code.
            self.state.metrics.illegal_transitions.labels(machine="connection", event=task.get_name()).inc()
            log.error("session %s task %s failed", self.session_id, task.get_name(), exc_info=exc)
            self._force_close(CloseReason.INTERNAL_ERROR, {"bug": f"{type(exc).__name__}: {exc}"})

    async def _read_loop(self) -> None:
        init_deadline = time.monotonic() + self.settings.init_timeout
        first = True
        while True:
            await self._wait_for_room()
            try:
                if first:
                    message = await asyncio.wait_for(
                        self.ws.receive(), max(0.0, init_deadline - time.monotonic())
                    )
                else:
                    message = await self.ws.receive()
            except TimeoutError:
                self._close_via("init_timeout", detail={"after_s": self.settings.init_timeout})
                return
            if message["type"] == "websocket.disconnect":
                self._peer_gone(int(message.get("code") or 1005), str(message.get("reason") or ""))
                return
            if self.closed:
                # Arrived after our close frame went out (RFC 6455 5.5.1): the machine is CLOSED
                # and the frame is discarded unhandled; keep reading until the peer's close.
                continue
            first = False
            self.last_heard = time.monotonic()
            payload: str | bytes | None = message.get("text")
            if payload is None:
                payload = message.get("bytes") or b""
            self._on_payload(payload)

    async def _wait_for_room(self) -> None:
        # In READY the model queues a frame only while queued < buffer_max; instead of reading a
        # frame the model could not accept, stop reading (TCP back-pressure) until one is handled.
        while not self.closed and self.conn.state is Conn.READY and not self.conn.can("recv_frame"):
            self._room.clear()
            closed = asyncio.ensure_future(self._closed.wait())
            room = asyncio.ensure_future(self._room.wait())
            await asyncio.wait({closed, room}, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            room.cancel()

    def _on_payload(self, payload: str | bytes) -> None:
        size = len(payload)
        item: ClientItem
        try:
            item = parse_client_frame(payload)
        except InvalidMessage as bad:
            item = bad
        if isinstance(item, ConnectionInit) or (
            isinstance(item, InvalidMessage) and item.frame_type == "connection_init"
        ):
            self._on_init(item)
            return
        # The model counts frames, not bytes: the pre-READY byte budget is enforced here, with
        # the same close as the frame budget (section 1).
        if (
            self.conn.state is Conn.INITIALISING
            and self._queued_bytes + size > self.settings.preready_buffer_bytes
        ):
            self._close_via(
                "peer_close",
                close=CloseReason.PREREADY_BUFFER_FULL,
                detail={"budget": "bytes", "limit": self.settings.preready_buffer_bytes},
            )
            return
        transition = self._fire("recv_frame", {"type": _type_of(item), "bytes": size})
        if transition is None:
            return
        if transition.target is Conn.CLOSED:
            self._closed_by(transition)
            return
        self._queue.append(_Queued(item, size))
        self._queued_bytes += size
        self._wake_worker.set()

    def _on_init(self, frame: ConnectionInit | InvalidMessage) -> None:
        transition = self._fire(
            "recv_init", {"resume": isinstance(frame, ConnectionInit) and frame.resume is not None}
        )
        if transition is None:
            return
        if transition.target is Conn.CLOSED:
            self._closed_by(transition)
            return
        self._init_started = time.monotonic()
        self._spawn(self._handshake(frame), "handshake")

    async def _handshake(self, frame: ConnectionInit | InvalidMessage) -> None:
        """Auth, limits, context, READY, ack (sections 1-3). Every await may see the socket closed
        under it (peer gone, duplicate init, overflow): then nothing more is fired."""
        try:
            if isinstance(frame, InvalidMessage):
                raise AuthError(AuthCode.TOKEN_MALFORMED, frame.detail)
            principal = await authenticate(self.settings, frame.token, self.state.directory)
        except AuthError as exc:
            if not self.closed:
                self._close_via(
                    "auth_reject", close=exc.close, detail={"code": exc.code}
                )
            return
        if self.closed:
            return
        try:
            self._slot = await self.state.limiter.acquire(self.session_id, principal.user, principal.account)
        except ConnectionLimitExceeded as exc:
            contexts = self.state.contexts
            if contexts is not None:
                contexts.reject_limit(principal.user, exc.scope, self.session_id)
            if not self.closed:
                self._close_via("limit_reject", detail={"scope": exc.scope, "limit": exc.limit})
            return
        if self.closed:
            return
        contexts = self.state.contexts
        if contexts is None:
            self._close_via("peer_close", close=CloseReason.TRY_AGAIN_LATER, detail={"store": "not_open"})
            return
        try:
            record = await contexts.resolve(principal.user, principal.account)
            info = await contexts.store.find_context(record.context_id)
        except StoreError as exc:
            self.state.metrics.store_errors.labels(type=exc.code).inc()
            log.warning("session %s: store failed resolving the context: %s", self.session_id, exc)
            if not self.closed:
                self._close_via(
                    "peer_close", close=CloseReason.TRY_AGAIN_LATER, detail={"store_error": exc.code}
                )
            return
        if self.closed:
            return
        last_seq = info.last_seq if info is not None else 0
        self._user, self._account = principal.user, principal.account
        self._context_id, self._epoch = record.context_id, record.epoch
        self.conn.user, self.conn.context_id = principal.user, record.context_id
        ready = self._fire("auth_ok", {"epoch": record.epoch, "store_created": record.created})
        if ready is None:
            return
        contexts.attach(record, self.session_id)
        self._attached = True
        recovered = isinstance(frame, ConnectionInit) and frame.resume is not None and not record.created
        assert self.sender is not None
        try:
            self.sender.send(
                ConnectionAck(
                    session_id=self.session_id,
                    context_id=record.context_id,
                    epoch=record.epoch,
                    heartbeat_ms=self.settings.heartbeat_ms,
                    recovered=recovered,
                    last_seq=last_seq,
                )
            )
        except SendFailed:
            return  # the socket is already closing; the close was recorded where it happened
        self.state.metrics.handshake_seconds.observe(time.monotonic() - self._init_started)
        self._spawn(self._heartbeat(), "heartbeat")
        self._wake_worker.set()
        observer = self.state.handler
        if isinstance(observer, SessionObserver):
            # After the ack is queued: delivery may now write events (and resume) on this socket.
            self._observed = True
            resume = frame.resume.last_seq if isinstance(frame, ConnectionInit) and frame.resume else None
            try:
                await observer.on_session_ready(self, resume)
            except StoreError as exc:
                self.state.metrics.store_errors.labels(type=exc.code).inc()
                log.warning("session %s: store failed during resume: %s", self.session_id, exc)
                self._close_via("peer_close", close=CloseReason.TRY_AGAIN_LATER, detail={"store_error": exc.code})

    async def _work(self) -> None:
        """Handle queued frames one at a time, in arrival order, once the model allows it."""
        while not self.closed:
            await self._wake_worker.wait()
            self._wake_worker.clear()
            while self._queue and not self.closed and self.conn.can("handle_frame"):
                queued = self._queue.popleft()
                self._queued_bytes -= queued.size
                if self._fire("handle_frame", {"type": _type_of(queued.item)}) is None:
                    return
                item = queued.item
                if isinstance(item, Ack):
                    # Acks are cumulative (section 5): the acks queued right behind this one are
                    # handled with it, each still its own handle_frame, as one ack of the highest
                    # seq, so a client acking every event costs one store write per batch.
                    while self._queue and isinstance(self._queue[0].item, Ack) and self.conn.can("handle_frame"):
                        queued = self._queue.popleft()
                        self._queued_bytes -= queued.size
                        if self._fire("handle_frame", {"type": "ack"}) is None:
                            return
                        later = queued.item
                        if isinstance(later, Ack) and later.seq > item.seq:
                            item = later
                self._room.set()
                await self._dispatch(item)

    async def _dispatch(self, item: ClientItem) -> None:
        handler = self.state.handler
        try:
            if isinstance(item, InvalidMessage):
                self.state.metrics.invalid_messages.inc()
                self._errors += 1
                if self._errors > self.settings.error_budget:
                    self._close_via(
                        "peer_close",
                        close=CloseReason.INVALID_MESSAGE,
                        detail={"error_budget": self.settings.error_budget},
                    )
                    return
                await self.send(ErrorFrame(code="invalid_message", detail=item.detail))
            elif isinstance(item, Ack):
                await handler.on_ack(self, item)
            elif isinstance(item, RunStart):
                await handler.on_run_start(self, item)
            elif isinstance(item, RunCancel):
                await handler.on_run_cancel(self, item)
            else:  # ConnectionInit never reaches the queue: recv_init handles it
                raise IllegalTransition(
                    "connection", "handle_frame", self.conn.state.name, "init in the queue"
                )
        except SendFailed as exc:
            log.info("session %s: reply not sent, socket closing (%s)", self.session_id, exc.why)
        except IllegalTransition:
            raise
        except Exception as exc:
            # A handler bug must reach the user (the error pipe is never silent) without killing
            # the socket with 1011: answer {"type":"error","code":"internal"} and carry on.
            self.state.metrics.illegal_transitions.labels(machine="handler", event=_type_of(item)).inc()
            log.exception("session %s: handler failed on %s", self.session_id, _type_of(item))
            request_id = item.request_id if isinstance(item, RunStart) else None
            try:
                await self.send(ErrorFrame(code="internal", request_id=request_id, detail=type(exc).__name__))
            except SendFailed:
                log.info("session %s: internal-error reply not sent, socket closing", self.session_id)

    async def _heartbeat(self) -> None:
        """Section 6: ping every interval; a peer silent for two intervals is closed 4408."""
        interval = self.settings.heartbeat_interval
        ping = self._extension("ping")
        metrics = self.state.metrics
        if ping is None:
            metrics.heartbeat_failures.labels(kind="unsupported").inc()
            log.warning("session %s: the ASGI server cannot send pings; heartbeat disabled", self.session_id)
            return
        last_ping = time.monotonic()
        # Silence is counted from READY: the time our own auth and store work took is not the peer's.
        self.last_heard = max(self.last_heard, last_ping)
        while not self.closed:
            # Checked twice per interval so a silent peer is closed close to 2 intervals, not 3.
            await asyncio.sleep(interval / 2)
            if self.closed or self.sender is None or self.sender.closing:
                return
            now = time.monotonic()
            silent = now - self.last_heard
            if silent >= 2 * interval:
                metrics.heartbeat_failures.labels(kind="timeout").inc()
                log.info("session %s: peer silent for %.2fs, closing 4408", self.session_id, silent)
                self._close_via("heartbeat_timeout", detail={"silent_s": round(silent, 3)})
                return
            if now - last_ping < interval:
                continue
            last_ping = now
            try:
                waiter: asyncio.Future[float] = ping()
            except ConnectionError as exc:
                metrics.heartbeat_failures.labels(kind="ping_failed").inc()
                log.warning("session %s: ping failed: %s", self.session_id, exc)
                self._close_via("send_error", detail={"heartbeat": "ping_failed"})
                return
            waiter.add_done_callback(self._on_pong)
            await self._keep_context_alive()

    def _on_pong(self, waiter: asyncio.Future[float]) -> None:
        if not waiter.cancelled():
            self.last_heard = time.monotonic()

    async def _keep_context_alive(self) -> None:
        contexts = self.state.contexts
        if contexts is None or self._context_id is None:
            return
        try:
            alive = await contexts.keepalive(self._context_id)
        except StoreError as exc:
            # The socket stays up (the store may come back); the failure is counted and logged.
            self.state.metrics.store_errors.labels(type=exc.code).inc()
            log.warning("session %s: context keepalive failed: %s", self.session_id, exc)
            return
        if not alive:
            log.warning(
                "session %s: context %s expired in the store while attached",
                self.session_id,
                self._context_id,
            )

    # -- closing ----------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Server shutdown (section 6): ``drain`` then ``drain_close`` -> 1001 going_away.

        Called from uvicorn's shutdown hook and from the app's lifespan; idempotent. Sockets not
        READY have no drain edge in the model: they are closed with 1001 via ``peer_close``.
        """
        if self.closed:
            return
        if self.conn.can("drain"):
            if self._fire("drain", {"why": "server shutdown"}) is None:
                return
            self._close_via("drain_close")
        else:
            self._close_via("peer_close", close=CloseReason.GOING_AWAY, detail={"why": "server shutdown"})

    def _fire(self, event: str, detail: Mapping[str, Any] | None = None) -> Transition | None:
        """Fire ``event``; an IllegalTransition here is a server bug: count, log, close, None."""
        try:
            return self.conn.fire(event, detail)
        except IllegalTransition as exc:
            self.state.metrics.illegal_transitions.labels(machine="connection", event=event).inc()
            log.error("session %s: %s", self.session_id, exc)
            self._force_close(exc.close, {"illegal": event})
            return None

    def _close_via(
        self,
        event: str,
        *,
        close: CloseReason | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Fire a closing event; the close is the transition's ``emits`` unless given."""
        if self.closed:
            return
        full: dict[str, Any] = dict(detail or {})
        if close is not None:
            full.update(code=int(close.code), reason=close.value)
        transition = self._fire(event, full)
        if transition is None:
            return
        self._finish(close if close is not None else close_of(transition))

    def _closed_by(self, transition: Transition) -> None:
        self._finish(close_of(transition))

    def _force_close(self, close: CloseReason, detail: Mapping[str, Any]) -> None:
        """Close after an IllegalTransition: through ``peer_close`` if the model still can."""
        if self.closed:
            return
        if self.conn.can("peer_close"):
            self.conn.fire("peer_close", {**detail, "code": int(close.code), "reason": close.value})
        self._finish(close)

    def _finish(self, close: CloseReason | None) -> None:
        """The machine is CLOSED: write the close frame (if any), drop queued frames, stop tasks."""
        if self.closed:
            return
        self._closed.set()
        if self._observed and isinstance(self.state.handler, SessionObserver):
            self._observed = False
            self.state.handler.on_session_closed(self)
        self._queue.clear()
        self._queued_bytes = 0
        if close is not None:
            code, reason = int(close.code), close.value
            self.close_code = (code, reason)
            self.state.metrics.closes.labels(code=str(code), reason=reason).inc()
            if self.sender is not None:
                self.sender.close(code, reason)
        elif self.sender is not None:
            self.sender.abandon()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    def _peer_gone(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self._close_via("peer_close", detail={"peer_code": code, "peer_reason": reason[:60]})
        if self.sender is not None:
            self.sender.abandon()

    def _on_send_failed(self, exc: SendFailed) -> None:
        log.warning("session %s: %s", self.session_id, exc)
        if self.closed:
            return
        if exc.why == "audit":
            # The audit log cannot be written, so the sender dropped this socket's data frames
            # (their events stay in the store). The socket itself is fine: close it 1013 like a
            # store failure (section 6), so the client reconnects with backoff and resumes once
            # /readyz is back (new sockets are refused while the log fails).
            self._close_via(
                "peer_close", close=CloseReason.TRY_AGAIN_LATER, detail={"send_failed": "audit"}
            )
            return
        event = "send_error" if self.conn.can("send_error") else "peer_close"
        self._close_via(event, detail={"send_failed": exc.detail})

    async def _teardown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sender is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.sender.task), self.settings.shutdown_grace)
            except TimeoutError:
                self.sender.task.cancel()
                log.warning("session %s: writer did not finish within shutdown_grace", self.session_id)
        if self._attached and self._context_id is not None and self.state.contexts is not None:
            self.state.contexts.detach(self._context_id, self.session_id)
            self._attached = False
        if self._slot is not None:
            await self.state.limiter.release(self._slot)
            self._slot = None
        self.state.sessions.discard(self)


__all__ = ["ConnectionShell", "close_of"]
