"""One socket's I/O shell (PROTOCOL sections 1, 2, 3, 6; docs/architecture.md).

:class:`ConnectionShell` reads the socket, runs the handshake's awaits (auth, limits, the store),
pings, and writes through the single choke point (:class:`~pipeproof.impl.sender.Sender`). What a
received frame or a timer *means* is decided by :class:`~pipeproof.core.session.SessionCore`, the
sans-I/O core, which fires the connection machine (model/connection.py) and returns commands:
the shell only feeds it and executes them (``_apply``). Every close is a declared edge of the
machine with its close reason: the server's own closes are ``unavailable`` (store, audit log or
memory guard: ``try_again_later``), ``slow_consumer``, ``shutdown``/``drain_close``
(``going_away``) and ``internal_error`` (a bug: counted, logged, never ``invalid_message``);
``peer_close`` is only the peer's own close.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket

from pipeproof.core.session import (
    BeginHandshake,
    CloseSocket,
    Command,
    Handle,
    Handled,
    Illegal,
    SendFrame,
    SessionCore,
    SessionLimits,
)
from pipeproof.errors import IllegalTransition, StoreError
from pipeproof.model.connection import CONNECTION
from pipeproof.model.spec import Machine
from pipeproof.protocol import AuthCode, CloseReason, ErrorCode
from pipeproof.protocol.frames import Ack, ConnectionAck, ConnectionInit, ErrorFrame, InvalidMessage, RunStart

from .audit import TracedMachine
from .auth import AuthError, authenticate
from .handlers import OutboundFrame, SessionObserver
from .limits import ConnectionLimitExceeded, Slot
from .sender import Sender, SendFailed
from .uvicorn_ws import EXTENSION, TRANSPORT_CLOSE

if TYPE_CHECKING:
    from .app import ServerState

log = logging.getLogger("pipeproof.session")

@functools.lru_cache(maxsize=8)
def connection_machine(buffer_max: int, error_budget: int) -> Machine:
    """The connection machine with its parameters, built once per value: ``with_params``
    re-validates the machine and its compiled transitions are cached per instance, so one
    instance per socket would recompile them on every connection."""
    return CONNECTION.with_params(buffer_max=buffer_max, error_budget=error_budget)


class ConnectionShell:
    """Drives one accepted WebSocket; also the :class:`~pipeproof.impl.handlers.Session` that
    handlers see (``session_id``, ``user``, ``account``, ``context_id``, ``epoch``, ``send``)."""

    def __init__(self, state: ServerState, ws: WebSocket, machine: Machine | None = None) -> None:
        self.state = state
        self.settings = state.settings
        self.ws = ws
        self.session_id = uuid.uuid4().hex
        self._user: str | None = None
        self._account: str | None = None
        self._context_id: str | None = None
        self._epoch = 0
        self._ready_seq = 0
        # ``machine``: a variant of the connection machine (the conformance tests' seeded defects
        # inject broken designs here, a declared point, instead of overriding internals).
        self.conn = TracedMachine(
            machine or connection_machine(self.settings.preready_buffer_frames, self.settings.error_budget),
            "connection",
            self.session_id,
            state.audit,
            listener=lambda _m, t: state.metrics.on_connection_transition(t),
        )
        self.core = SessionCore(
            self.conn,
            SessionLimits(
                preready_buffer_bytes=self.settings.preready_buffer_bytes,
                init_timeout=self.settings.init_timeout,
                heartbeat_interval=self.settings.heartbeat_interval,
            ),
            time.monotonic(),
        )
        self._wake_worker = asyncio.Event()
        self._room = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot: Slot | None = None
        self._attached = False
        self._init_started = 0.0
        self.close_code: tuple[int, str] | None = None
        self.sender: Sender | None = None
        self._observed = False  # the handler was told this socket is READY (SessionObserver)

    # -- Session protocol (impl/handlers.py) ----------------------------------------------------

    @property
    def user(self) -> str:
        if self._user is None:
            raise IllegalTransition("connection", "user", self.conn.state.name, "not READY: no user yet")
        return self._user

    @property
    def account(self) -> str:
        if self._account is None:
            raise IllegalTransition("connection", "account", self.conn.state.name, "not READY: no account yet")
        return self._account

    @property
    def context_id(self) -> str:
        if self._context_id is None:
            raise IllegalTransition("connection", "context_id", self.conn.state.name, "not READY: no context yet")
        return self._context_id

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def ready_seq(self) -> int:
        return self._ready_seq

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_room(self, timeout: float) -> None:
        """Wait until the send queue can take a frame (at most ``timeout``; see Sender.wait_room)."""
        if self.sender is not None:
            await self.sender.wait_room(timeout)

    async def send(self, frame: OutboundFrame) -> None:
        """Queue ``frame`` through the choke point; a full queue closes the socket (``slow_consumer``)."""
        if self.sender is None:
            raise SendFailed("closed", "socket not accepted")
        try:
            self.sender.send(frame)
        except SendFailed as exc:
            if exc.why == "queue_full":
                # A peer that does not read: its events stay pending for resume (section 5).
                self.apply(self.core.server_close("slow_consumer", {"send_failed": "queue_full"}))
            raise

    # -- lifecycle --------------------------------------------------------------------------------

    async def run(self, refuse: CloseReason | None = None) -> None:
        """Accept the socket and drive it to CLOSED (the FastAPI route's whole body).

        ``refuse``: the server cannot take the socket (draining: ``going_away``; not ready or over
        its memory limit: ``try_again_later``); it is closed at once through the declared edge."""
        await self.ws.accept()
        self.state.metrics.socket_opened()
        self.sender = Sender(
            self.ws, self.conn, queue_max=self.settings.send_queue_max, on_failure=self._on_send_failed
        )
        self.state.sessions.add(self)
        if refuse is not None:
            why = {"refused": refuse.value}
            self.apply(self.core.shutdown("refused: draining") if refuse is CloseReason.GOING_AWAY
                        else self.core.server_close("unavailable", why))
            try:
                await self._closed.wait()
            finally:
                await self._teardown()
            return
        hook = self._extension("on_shutdown")
        if hook is not None:
            hook(self.begin_drain, self.settings.shutdown_grace)
        self._spawn(self._work(), "worker")
        try:
            await self._read_until_closed()
        finally:
            await self._teardown()

    async def _read_until_closed(self) -> None:
        """Read until the peer leaves. Once our machine is CLOSED the peer gets ``shutdown_grace``
        to answer our close frame (RFC 6455 5.5.1); a peer that never does (it stopped reading)
        has its connection dropped instead of holding it open (section 6)."""
        reader = asyncio.ensure_future(self._read_loop())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({reader, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                try:
                    await asyncio.wait_for(asyncio.shield(reader), self.settings.shutdown_grace)
                except TimeoutError:
                    reader.cancel()
                    abort = self._extension("abort")
                    if abort is not None:
                        abort()
                    log.info("session %s: no close reply within shutdown_grace; connection dropped",
                             self.session_id)
            else:
                reader.result()  # a bug in the read loop surfaces here, never silently
                await self._closed.wait()
        finally:
            closed.cancel()
            if not reader.done():
                reader.cancel()

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
            self.apply(self.core.server_close("internal_error", {"bug": f"{type(exc).__name__}: {exc}"}))

    async def _read_loop(self) -> None:
        while True:
            await self._wait_for_room()
            deadline = self.core.read_deadline()
            try:
                if deadline is not None:
                    message = await asyncio.wait_for(self.ws.receive(), max(0.0, deadline - time.monotonic()))
                else:
                    message = await self.ws.receive()
            except TimeoutError:
                self.apply(self.core.timer(time.monotonic()))
                if self.closed:
                    return
                continue
            if message["type"] == "websocket.disconnect":
                transport = message.get(TRANSPORT_CLOSE)
                if transport:
                    # Our WebSocket layer refused the bytes (an oversized frame, broken framing)
                    # and sent the close itself.
                    oversized = transport == CloseReason.MESSAGE_TOO_BIG.value
                    self._finish_sent(self.core.oversized() if oversized else self.core.bad_framing())
                else:
                    self._peer_gone(int(message.get("code") or 1005), str(message.get("reason") or ""))
                return
            payload: str | bytes | None = message.get("text")
            if payload is None:
                payload = message.get("bytes") or b""
            self.on_payload(payload)

    def on_payload(self, payload: str | bytes) -> None:
        """One received frame: the core decides, the shell executes (a declared override point)."""
        self.apply(self.core.receive(payload, time.monotonic()))
        self._wake_worker.set()

    async def _wait_for_room(self) -> None:
        # A READY socket whose queue is full stops being read (TCP back-pressure) until a frame is
        # handled, instead of reading a frame the model could not accept.
        while not self.core.can_read():
            self._room.clear()
            closed = asyncio.ensure_future(self._closed.wait())
            room = asyncio.ensure_future(self._room.wait())
            await asyncio.wait({closed, room}, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            room.cancel()

    def apply(self, commands: list[Command]) -> None:
        """Execute what the core decided, in order (sends that need awaiting go through ``_work``)."""
        for cmd in commands:
            if isinstance(cmd, Illegal):
                self.state.metrics.illegal_transitions.labels(machine="connection", event=cmd.error.event).inc()
                log.error("session %s: %s", self.session_id, cmd.error)
            elif isinstance(cmd, CloseSocket):
                self._finish(cmd.close)
            elif isinstance(cmd, BeginHandshake):
                self._init_started = time.monotonic()
                self._spawn(self._handshake(cmd.init), "handshake")
            else:  # SendFrame and Handle are awaited by the worker (_work), in arrival order
                raise IllegalTransition("connection", type(cmd).__name__, self.conn.state.name,
                                        "a frame command outside the worker")

    async def _handshake(self, frame: ConnectionInit | InvalidMessage) -> None:
        """Auth, limits, context, READY, ack (sections 1-3). Every await may see the socket closed
        under it (peer gone, duplicate init, overflow): then nothing more is fired."""
        try:
            if isinstance(frame, InvalidMessage):
                raise AuthError(AuthCode.TOKEN_MALFORMED, frame.detail)
            principal = await authenticate(self.settings, frame.token, self.state.directory)
        except AuthError as exc:
            self.apply(self.core.handshake_failed("auth_reject", exc.close, {"code": exc.code}))
            return
        if self.closed:
            return
        try:
            self._slot = await self.state.limiter.acquire(self.session_id, principal.user, principal.account)
        except StoreError as exc:
            # Slots counted in the store (several nodes): no store, no slot (section 6).
            self.state.metrics.store_errors.labels(type=exc.code).inc()
            log.warning("session %s: store failed taking a connection slot: %s", self.session_id, exc)
            self.apply(self.core.handshake_failed("unavailable", detail={"store_error": exc.code}))
            return
        except ConnectionLimitExceeded as exc:
            contexts = self.state.contexts
            if contexts is not None:
                contexts.reject_limit(principal.user, exc.scope, self.session_id)
            self.apply(self.core.handshake_failed("limit_reject", detail={"scope": exc.scope, "limit": exc.limit}))
            return
        if self.closed:
            return
        contexts = self.state.contexts
        if contexts is None:
            self.apply(self.core.handshake_failed("unavailable", detail={"store": "not_open"}))
            return
        try:
            record = await contexts.resolve(principal.user, principal.account)
            info = await contexts.store.find_context(record.context_id)
        except StoreError as exc:
            self.state.metrics.store_errors.labels(type=exc.code).inc()
            log.warning("session %s: store failed resolving the context: %s", self.session_id, exc)
            self.apply(self.core.handshake_failed("unavailable", detail={"store_error": exc.code}))
            return
        if self.closed:
            return
        last_seq = info.last_seq if info is not None else 0
        self._user, self._account = principal.user, principal.account
        self._context_id, self._epoch = record.context_id, record.epoch
        self._ready_seq = last_seq
        self.conn.user, self.conn.context_id = principal.user, record.context_id
        self.apply(self.core.ready({"epoch": record.epoch, "store_created": record.created}))
        if self.closed:
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
                self.apply(self.core.server_close("unavailable", {"store_error": exc.code}))

    async def _work(self) -> None:
        """Handle queued frames one at a time, in arrival order, once the model allows it."""
        while not self.closed:
            await self._wake_worker.wait()
            self._wake_worker.clear()
            while not self.closed:
                commands = self.core.next_frame()
                if not commands:
                    break
                self._room.set()
                for cmd in commands:
                    if isinstance(cmd, SendFrame):
                        self.state.metrics.invalid_messages.inc()
                        await self._reply(cmd.frame)
                    elif isinstance(cmd, Handle):
                        await self._dispatch(cmd.item)
                    else:
                        self.apply([cmd])

    async def _reply(self, frame: OutboundFrame) -> None:
        try:
            await self.send(frame)
        except SendFailed as exc:
            log.info("session %s: reply not sent, socket closing (%s)", self.session_id, exc.why)

    async def _dispatch(self, item: Handled) -> None:
        handler = self.state.handler
        try:
            if isinstance(item, Ack):
                await handler.on_ack(self, item)
            elif isinstance(item, RunStart):
                await handler.on_run_start(self, item)
            else:
                await handler.on_run_cancel(self, item)
        except SendFailed as exc:
            log.info("session %s: reply not sent, socket closing (%s)", self.session_id, exc.why)
        except IllegalTransition:
            raise
        except Exception as exc:
            # A handler bug must reach the user (the error pipe is never silent) without killing
            # the socket: answer {"type":"error","code":"internal"} and carry on.
            self.state.metrics.illegal_transitions.labels(machine="handler", event=item.type).inc()
            log.exception("session %s: handler failed on %s", self.session_id, item.type)
            request_id = item.request_id if isinstance(item, RunStart) else None
            await self._reply(ErrorFrame(code=ErrorCode.INTERNAL, request_id=request_id, detail=type(exc).__name__))

    async def _heartbeat(self) -> None:
        """Section 6: ping every interval; a peer silent for two intervals is closed ``heartbeat_timeout``."""
        interval = self.settings.heartbeat_interval
        ping = self._extension("ping")
        metrics = self.state.metrics
        if ping is None:
            metrics.heartbeat_failures.labels(kind="unsupported").inc()
            log.warning("session %s: the ASGI server cannot send pings; heartbeat disabled", self.session_id)
            return
        last_ping = time.monotonic()
        self.core.started_heartbeat(last_ping)
        while not self.closed:
            # Checked twice per interval so a silent peer is closed close to 2 intervals, not 3.
            await asyncio.sleep(interval / 2)
            if self.closed or self.sender is None or self.sender.closing:
                return
            now = time.monotonic()
            self.apply(self.core.timer(now))
            if self.closed:
                metrics.heartbeat_failures.labels(kind="timeout").inc()
                log.info("session %s: peer silent, closed %s", self.session_id, self.close_code)
                return
            if now - last_ping < interval:
                continue
            last_ping = now
            try:
                waiter: asyncio.Future[float] = ping()
            except ConnectionError as exc:
                metrics.heartbeat_failures.labels(kind="ping_failed").inc()
                log.warning("session %s: ping failed: %s", self.session_id, exc)
                self.apply(self.core.send_failed({"heartbeat": "ping_failed"}))
                return
            waiter.add_done_callback(self._on_pong)
            await self._keep_context_alive()

    def _on_pong(self, waiter: asyncio.Future[float]) -> None:
        if not waiter.cancelled():
            self.core.heard(time.monotonic())

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
        """Server shutdown (section 6): ``drain`` then ``drain_close`` from READY, ``shutdown``
        before READY; both close ``going_away``. Called from uvicorn's shutdown hook and from the
        app's lifespan; idempotent."""
        self.apply(self.core.shutdown())

    def _finish(self, close: CloseReason | None) -> None:
        """The machine is CLOSED: write the close frame (if any), drop queued frames, stop tasks."""
        if self.closed:
            return
        self._closed.set()
        if self._observed and isinstance(self.state.handler, SessionObserver):
            self._observed = False
            self.state.handler.on_session_closed(self)
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

    def _finish_sent(self, commands: list[Command]) -> None:
        """Like :meth:`apply`, for a close the WebSocket layer has already written."""
        for cmd in commands:
            if isinstance(cmd, CloseSocket) and cmd.close is not None and not self.closed:
                self.close_code = (int(cmd.close.code), cmd.close.value)
                self.state.metrics.closes.labels(code=str(int(cmd.close.code)), reason=cmd.close.value).inc()
                self._finish(None)  # nothing more to write: the close frame is out
            else:
                self.apply([cmd])

    def _peer_gone(self, code: int, reason: str) -> None:
        self.apply(self.core.peer_gone(code, reason))
        if self.sender is not None:
            self.sender.abandon()

    def _on_send_failed(self, exc: SendFailed) -> None:
        log.warning("session %s: %s", self.session_id, exc)
        if self.closed:
            return
        if exc.why == "audit":
            # The audit log cannot be written, so the sender dropped this socket's data frames
            # (their events stay in the store). The socket itself is fine: close it ``try_again_later`` like a
            # store failure (section 6), so the client reconnects with backoff and resumes once
            # /readyz is back (new sockets are refused while the log fails).
            self.apply(self.core.server_close("unavailable", {"send_failed": "audit"}))
            return
        self.apply(self.core.send_failed({"send_failed": exc.detail}))

    async def _teardown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sender is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.sender.task), self.settings.shutdown_grace)
            except TimeoutError:
                # The peer does not read: the writer is stuck behind a full TCP buffer. Nothing
                # more can reach it, so the connection is dropped rather than left ESTABLISHED.
                self.sender.task.cancel()
                abort = self._extension("abort")
                if abort is not None:
                    abort()
                log.warning("session %s: writer did not finish within shutdown_grace; connection dropped",
                            self.session_id)
        if self._attached and self._context_id is not None and self.state.contexts is not None:
            self.state.contexts.detach(self._context_id, self.session_id)
            self._attached = False
        if self._slot is not None:
            await self.state.limiter.release(self._slot)
            self._slot = None
        self.state.sessions.discard(self)


__all__ = ["ConnectionShell"]
