"""Agent runs: validation, idempotent start, cancel, the driver, shutdown (PROTOCOL sections 4-6).

:class:`AgentRuntime` is the server's :class:`~pipeproof.impl.handlers.FrameHandler` once runs are
enabled (``create_app(settings, handler=AgentRuntime())``; ``pipeproof serve`` does this). It also
observes sessions (READY / closed, for delivery and resume) and takes part in the app's lifecycle
(recovery at startup, draining at shutdown).

Each run is one traced run machine (``model.run``; audit id ``run_id``) and the driver fires it
for every step *before* appending the step's event, so the events of a run are exactly the
machine's emissions, in its order:

* ``run.start``: prerequisites are checked before anything starts -- not shutting down, input
  valid (``invalid_input``), tools registered (``unknown_tool``), context live
  (``context_expired``), quotas and memory headroom (``over_capacity``). A failure fires
  ``validate_fail`` and answers ``error``; success stores the run (the store makes
  ``(context, request_id)`` unique, so a repeated ``request_id`` answers the first run's
  ``run.accepted`` and starts nothing), fires ``validate_ok`` and answers ``run.accepted``.
* Runs of one context execute one at a time, in order; a run waits ACCEPTED behind earlier ones.
  ``run.cancel`` fires ``cancel``: a waiting run then never starts (the machine refuses
  ``agent_started``) and ends with one ``agent_failed`` (code ``cancelled``); a running run stops
  at its next step (a tool in progress is cancelled and completes ``ok=false``).
* The agent's steps become ``agent_thinking``, ``tool_executing``/``tool_completed`` pairs and
  ``agent_completed``. A step the machine refuses (the step budget ``run_max_steps``) ends the run
  with ``agent_failed`` (``step_limit``); :class:`~pipeproof.impl.agents.AgentFailed` ends it with
  its code; any other exception inside the agent ends it with ``agent_failed`` (``internal``).
* Shutdown: no new runs; waiting runs end ``agent_failed`` (``shutdown``); running runs get
  ``shutdown_grace`` to finish, then are cancelled and end ``agent_failed`` (``shutdown``). Their
  events stay in the store for resume after the restart.
* Leases (section 6, "When a node dies"; :mod:`~pipeproof.impl.leases`): every run this node
  accepts is held under a lease in the store, renewed every ``lease_renew_interval``. At startup,
  then every interval, the node claims the runs whose node died (their lease expired; at startup
  also those its own node id held, and on SQLite, a single-node store, every unfinished run) and
  ends each as its node would have: an open tool pair is closed, then ``agent_failed`` with
  ``interrupted`` (the node's own previous process) or ``node_lost`` (another node's lease ran
  out), or ``cancelled`` if a cancel was recorded for it. A run whose lease another node took
  while this one stalled appends nothing more (the fence raises ``LeaseLost``).
* ``run.cancel`` always gets an answer: the run's terminal event for a run this node runs, or a
  run held elsewhere (the cancel is recorded in the store, the holder or the node taking the run
  over honours it, and this node hands the terminal event to its sessions once the run ended);
  ``error`` ``run_not_found`` or ``run_finished`` otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from pipeproof.errors import LeaseLost, RunRejected, StoreError
from pipeproof.model.run import Run, run_machine
from pipeproof.model.spec import Runner
from pipeproof.protocol import TERMINAL_KINDS, ErrorCode, FailureCode
from pipeproof.protocol.frames import Ack, ErrorFrame, RunAccepted, RunCancel, RunStart

from .agents import Agent, AgentFailed, AgentRequest, DemoAgent, FinalAnswer, StepStream, Thinking, ToolCall
from .audit import TracedMachine
from .delivery import DeliveryMetrics, DeliveryService, restored_runner
from .handlers import Session
from .leases import RunLeases
from .sender import SendFailed
from .store import ClaimScope, RunRecord, Store
from .tools import ToolOutcome, ToolRegistry, default_registry, execute

if TYPE_CHECKING:
    from .app import ServerState

log = logging.getLogger("pipeproof.runs")

_DURABLE: Final = frozenset({"agent_completed", "agent_failed", "tool_executing"})

_TAKEOVER_DETAIL: Final[Mapping[str, str]] = {
    FailureCode.INTERRUPTED: "the server stopped while the run was in progress",
    FailureCode.CANCELLED: "cancelled; the node running it stopped",
}

CANCEL_SETTLE_SECONDS: Final = 2.0
"""After shutdown_grace, how long cancelled runs get to append their agent_failed."""


@dataclass
class _Run:
    run_id: str
    context_id: str
    user: str
    request_id: str
    input: str
    tools: list[str]
    machine: TracedMachine
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_code: str = FailureCode.CANCELLED
    open_call: tuple[str, str] | None = None  # (tool_call_id, tool) between the pair's events
    task: asyncio.Task[None] | None = None
    in_agent: bool = False  # the driver task is suspended inside the agent's step
    cancel_sent: bool = False  # _request_cancel cancelled the driver task to interrupt that step
    lease_lost: bool = False  # another node took the run over: it must not emit again


@dataclass
class _RemoteCancel:
    """A run.cancel of a run another node holds (or held): answered once the run has ended."""

    context_id: str
    user: str
    sessions: list[Session] = field(default_factory=list)


class _Cancelled(Exception):
    """The run was cancelled while a step was in progress (internal control flow)."""


class AgentRuntime:
    """Runs and delivery for the reference server (see module docstring)."""

    def __init__(self, *, agent: Agent | None = None, tools: ToolRegistry | None = None) -> None:
        self.agent: Agent = agent or DemoAgent()
        self.tools = tools or default_registry()
        self._state: ServerState | None = None
        self._store: Store | None = None
        self.delivery: DeliveryService | None = None
        self.metrics: DeliveryMetrics | None = None
        self._runs: dict[str, _Run] = {}  # accepted and not finished
        self._by_request: dict[tuple[str, str], str] = {}
        self._queues: dict[str, deque[_Run]] = {}
        self._running: dict[str, _Run] = {}
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.leases: RunLeases | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._startup_claims: list[tuple[ClaimScope, str]] = []  # retried each round until done
        self._remote_cancels: dict[str, _RemoteCancel] = {}  # run_id -> the cancels to answer

    # -- lifecycle (impl/app.py) ---------------------------------------------------------------

    def start(self, state: ServerState, store: Store) -> None:
        """The store is open: build delivery and the leases, recover unfinished events and take
        over orphaned runs in the background, then keep the leases (section 6)."""
        self._state, self._store = state, store
        settings = state.settings
        self.metrics = DeliveryMetrics(state.metrics) if self.metrics is None else self.metrics
        self.delivery = DeliveryService(
            settings, store, state.audit, self.metrics, holder=settings.node_id, cluster=state.cluster
        )
        self._machine = run_machine(settings.run_max_steps)
        self.leases = RunLeases(
            store, node_id=settings.node_id, ttl=settings.run_lease_ttl, renew_interval=settings.lease_renew_interval
        )
        # SQLite is the single-node store: whatever it holds unfinished at startup was this node's
        # before it stopped. On PostgreSQL only this node id's own leases are its previous
        # process's (other nodes may be alive); the others wait for their lease to expire.
        self._startup_claims = (
            [("all", FailureCode.INTERRUPTED)] if store.dialect == "sqlite" else [("own", FailureCode.INTERRUPTED)]
        )
        self._spawn(self._recover(), "runs-recover")

    async def _recover(self) -> None:
        """Section 6 after a crash: unfinished events back into delivery, then the runs a dead
        process left unfinished are taken over and ended (:meth:`_take_over`), then the lease
        loop starts. A store failure here is retried by the loop's rounds."""
        assert self.delivery is not None
        try:
            await self.delivery.recover()
        except StoreError as exc:
            # The events stay in the store: a session joining adopts its context's (section 5).
            # The leases must be kept all the same, or this node's runs would be taken over.
            self._lease_store_failed("recovering unfinished events", exc)
        if self.delivery.cluster is not None:
            self.delivery.cluster.spawn(self.delivery.poll_loop, "delivery-poll")
        await self._claim_round()
        self._lease_task = asyncio.get_running_loop().create_task(self._lease_loop(), name="runs-leases")
        self._lease_task.add_done_callback(self._lease_loop_done)

    # -- leases (section 6, "When a node dies") ------------------------------------------------

    async def _lease_loop(self) -> None:
        """Every ``lease_renew_interval``: renew this node's leases, take over expired ones,
        answer the cancels of runs held elsewhere that have ended."""
        assert self.leases is not None
        while True:
            await asyncio.sleep(self.leases.renew_interval)
            await self._renew_round()
            await self._claim_round()
            await self._answer_remote_cancels()

    def _lease_loop_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug: this node's leases now expire and other nodes take its runs over (the fence
            # stops them here), so the failure is loud but not fatal to the runs' users.
            log.error("the run lease loop failed; this node's runs will be taken over", exc_info=task.exception())

    def _lease_store_failed(self, what: str, exc: StoreError) -> None:
        # Expected when the store is down: the next round retries. Meanwhile the fence keeps a run
        # whose lease may have run out from appending (section 6).
        assert self._state is not None
        self._state.metrics.store_errors.labels(type=exc.code).inc()
        log.warning("run leases: %s failed: %s", what, exc)

    async def _renew_round(self) -> None:
        assert self.leases is not None
        try:
            renewal = await self.leases.renew()
        except StoreError as exc:
            self._lease_store_failed("renewal", exc)
            return
        for run_id in renewal.lost:
            self._lease_lost(run_id)
        for run_id in renewal.cancelled:
            await self._stored_cancel(run_id)

    async def _claim_round(self) -> None:
        """Take over what the startup claims name (until each has succeeded once), then every
        run whose lease expired."""
        assert self.leases is not None
        rounds = [*self._startup_claims, ("expired", FailureCode.NODE_LOST)]
        for scope, code in rounds:
            try:
                claimed = await self.leases.claim(scope)
            except StoreError as exc:
                self._lease_store_failed(f"claim ({scope})", exc)
                return
            if (scope, code) in self._startup_claims:
                self._startup_claims.remove((scope, code))
            for record in claimed:
                await self._take_over(record, code)

    async def _take_over(self, record: RunRecord, code: str) -> None:
        """End a run this node just claimed as its dead node would have (section 6): an open tool
        pair is closed, then ``agent_failed`` with ``code`` (``cancelled`` when a cancel was
        recorded for it), through the normal delivery path, so this node's sessions of the
        context get it and a resume anywhere redelivers it from the store."""
        assert self.leases is not None and self._store is not None and self._state is not None
        assert self.metrics is not None
        if record.run_id in self._runs:
            return  # already running here (a claim cannot name it: the claim excludes held runs)
        try:
            events = await self._store.run_events(record.context_id, record.run_id)
        except StoreError as exc:
            # Not ended: the lease this node now holds runs out and the run is claimed again.
            self.leases.release(record.run_id)
            self._lease_store_failed(f"take over {record.run_id}", exc)
            return
        kinds = [e.kind for e in events]
        ended = next((k for k in kinds if k in TERMINAL_KINDS), None)
        if ended is not None:
            # It ended, but the state write was lost with its process: record it, or every
            # takeover round would claim it again.
            self.leases.release(record.run_id)
            state = Run.COMPLETED if ended == "agent_completed" else Run.FAILED
            self._spawn(self._store.set_run_state(record.run_id, state.name), f"run-state-{record.run_id}")
            return
        run = self._restored(record, events)
        if record.cancel_requested:
            code = FailureCode.CANCELLED  # the user asked first: the run ends as cancelled
        self._runs[run.run_id] = run
        self.metrics.runs_active.inc()
        self.metrics.runs_taken_over.labels(code=code).inc()
        log.warning("run %s: taken over from node %s, ending it (%s)", run.run_id, record.owner_node, code)
        detail = _TAKEOVER_DETAIL.get(code, "the node running the run stopped; its lease expired")
        await self._end_here(run, self._fail(run, code, detail))

    def _restored(self, record: RunRecord, events: list[Any]) -> _Run:
        """A run rebuilt from its stored events, its machine where they left it."""
        assert self._state is not None
        kinds = [e.kind for e in events]
        state = Run.ACCEPTED if not kinds else Run.TOOL_RUNNING if kinds[-1] == "tool_executing" else Run.RUNNING
        steps = sum(1 for k in kinds if k in ("agent_thinking", "tool_executing"))
        runner = restored_runner(self._machine, state, {"cancel_requested": False, "steps": steps})
        machine = TracedMachine(
            self._machine,
            "run",
            record.run_id,
            self._state.audit,
            user=record.user_id,
            context_id=record.context_id,
            runner=runner,
        )
        run = _Run(record.run_id, record.context_id, record.user_id, record.request_id, "", [], machine)
        if state is Run.TOOL_RUNNING:
            data = events[-1].data
            run.open_call = (str(data.get("tool_call_id", "")), str(data.get("tool", "")))
        return run

    def _lease_lost(self, run_id: str) -> None:
        """Another node took ``run_id`` over (this one did not renew in time): stop it here
        without a step of its own; that node ends it."""
        run = self._runs.get(run_id)
        if run is None:
            return
        run.lease_lost = True
        log.warning("run %s: lease lost to another node, which ends the run", run_id)
        queue = self._queues.get(run.context_id)
        if queue is not None and run in queue:
            queue.remove(run)
            self._ended(run)
            return
        # Running: wake the driver (as a cancel would); its next append raises LeaseLost.
        self._interrupt(run)

    async def _stored_cancel(self, run_id: str) -> None:
        """A cancel another node recorded for a run this node holds: honour it as if it came
        from a socket here (section 4)."""
        run = self._runs.get(run_id)
        if run is None or run.cancel.is_set() or run.lease_lost:
            return
        await self._cancel(run, {"recorded": True})

    async def _answer_remote_cancels(self) -> None:
        """Answer the cancels of runs held elsewhere that have ended: the terminal event, adopted
        from the store into delivery here, or ``run_finished`` when it is no longer in delivery
        (the session had it before)."""
        assert self._store is not None and self.delivery is not None
        for run_id, pending in list(self._remote_cancels.items()):
            pending.sessions = [s for s in pending.sessions if not getattr(s, "closed", False)]
            if not pending.sessions:
                del self._remote_cancels[run_id]
                continue
            try:
                record = await self._store.find_run(run_id)
                if record is None or not record.finished:
                    continue
                await self.delivery.adopt(pending.context_id, pending.user)
            except StoreError as exc:
                self._lease_store_failed(f"answering the cancel of {run_id}", exc)
                return  # kept: the next round tries again
            del self._remote_cancels[run_id]
            if self.delivery.holds_terminal(pending.context_id, run_id):
                continue  # it reaches the sessions here like any event of the context
            finished = ErrorFrame(code=ErrorCode.RUN_FINISHED, detail=f"the run has ended ({record.state})")
            for session in pending.sessions:
                # A socket that cannot take the reply is already ending: a closed one, or a full
                # queue, which the shell itself closes slow_consumer (impl/session.py send). The
                # run's end is in the stream either way, so a resume still finds it.
                with contextlib.suppress(SendFailed):
                    await session.send(finished)

    async def stop(self, grace: float) -> None:
        """Section 6: finish or fail every run, then stop delivery (the store keeps the rest)."""
        self._stopping = True
        for context_id in list(self._queues):
            queue = self._queues.pop(context_id)
            while queue:
                run = queue.popleft()
                run.cancel_code = FailureCode.SHUTDOWN
                await self._finish_unstarted(run)
        running = [r.task for r in self._running.values() if r.task is not None]
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            if pending:
                for run in list(self._running.values()):
                    self._request_cancel(run, FailureCode.SHUTDOWN, {"why": "shutdown_grace elapsed"})
                _, pending = await asyncio.wait(pending, timeout=CANCEL_SETTLE_SECONDS)
                for task in pending:
                    log.error("run task %s did not end after cancel; cancelling it", task.get_name())
                    task.cancel()
        if self._lease_task is not None:
            # The runs have ended (or been cancelled): nothing is left to renew or take over.
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task
        self._remote_cancels.clear()
        if self._tasks:
            # Let the last run-state writes land; then stop whatever is left.
            _, left = await asyncio.wait(set(self._tasks), timeout=CANCEL_SETTLE_SECONDS)
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
        if self.delivery is not None:
            await self.delivery.close()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("runtime task %s failed", task.get_name(), exc_info=task.exception())

    # -- session observer (impl/session.py) ----------------------------------------------------

    async def on_session_ready(self, session: Session, resume_last_seq: int | None) -> None:
        if self.delivery is not None:
            await self.delivery.session_ready(session, resume_last_seq)

    def on_session_closed(self, session: Session) -> None:
        if self.delivery is not None:
            self.delivery.session_closed(session)

    # -- frames (impl/handlers.py) -------------------------------------------------------------

    async def on_ack(self, session: Session, frame: Ack) -> None:
        if self.delivery is None:
            return
        try:
            await self.delivery.ack(session, frame.seq)
        except StoreError as exc:
            await self._reply_store_error(session, exc, None)

    async def on_run_start(self, session: Session, frame: RunStart) -> None:
        key = (session.context_id, frame.request_id)
        existing = self._by_request.get(key)
        if existing is not None:
            await session.send(RunAccepted(request_id=frame.request_id, run_id=existing))
            return
        state, store = self._state, self._store
        if state is None or store is None or self.delivery is None or self.metrics is None:
            await session.send(
                ErrorFrame(code="over_capacity", request_id=frame.request_id, detail="runs are not ready")
            )
            return
        run_id = uuid.uuid4().hex
        machine = TracedMachine(
            self._machine,
            "run",
            run_id,
            state.audit,
            user=session.user,
            context_id=session.context_id,
            runner=Runner(self._machine, engine="declaration"),
        )
        tools = list(frame.tools) if frame.tools is not None else self.tools.names()
        leases = self.leases
        assert leases is not None
        # Marked before the write that grants it, so a takeover claim of this node never names it
        # (claims exclude the runs it holds); the fence counts from before that write.
        granted_at, expires = leases.stamp()
        leases.granting(run_id)
        try:
            await self._validate(session, frame, tools)
            record, created = await store.create_run(
                session.context_id, frame.request_id, session.user, time.time(), run_id=run_id,
                owner_node=leases.node_id, lease_expires=expires,
            )
        except RunRejected as exc:
            leases.release(run_id)
            machine.fire("validate_fail", {"code": exc.code, "request_id": frame.request_id})
            self.metrics.run_rejections.labels(code=exc.code).inc()
            await session.send(ErrorFrame(code=exc.code, request_id=frame.request_id, detail=exc.detail))
            return
        except StoreError as exc:
            leases.release(run_id)
            machine.fire("validate_fail", {"code": exc.code, "request_id": frame.request_id})
            await self._reply_store_error(session, exc, frame.request_id)
            return
        if not created:
            # The same request_id reached the store before (another socket, another node, or
            # before a restart): the same run_id, whatever became of the run since (section 4).
            leases.release(run_id)
            self._by_request[key] = record.run_id
            await session.send(RunAccepted(request_id=frame.request_id, run_id=record.run_id))
            return
        leases.hold(run_id, granted_at)
        machine.fire("validate_ok", {"request_id": frame.request_id})
        run = _Run(run_id, session.context_id, session.user, frame.request_id, frame.input, tools, machine)
        self._runs[run_id] = run
        self._by_request[key] = run_id
        self.metrics.runs_active.inc()
        self._queues.setdefault(run.context_id, deque()).append(run)
        try:
            await session.send(RunAccepted(request_id=frame.request_id, run_id=run_id))
        finally:
            # The run belongs to the context, not to this socket: it starts even if the reply
            # could not be queued (its events reach the other sessions or a resume).
            self._schedule(run.context_id)

    async def on_run_cancel(self, session: Session, frame: RunCancel) -> None:
        """Section 4: every run.cancel is answered.

        A run this node runs: the cancel is honoured here and the run's terminal event is the
        answer. A run of the context that this node does not run (another node holds it, or
        held it and died): the cancel is recorded in the store, the holder honours it at its
        next renewal (a node taking the run over ends it ``cancelled``), and once the run has
        ended this node hands its terminal event to its sessions of the context. Otherwise an
        ``error``: ``run_not_found`` (no such run, or another user's: section 3), ``run_finished``
        (it has ended), or the store failure's code.
        """
        run = self._runs.get(frame.run_id)
        if run is not None and run.context_id == session.context_id and not run.lease_lost:
            await self._cancel(run, {"session_id": session.session_id})
            return
        store = self._store
        if store is None:
            await session.send(ErrorFrame(code=ErrorCode.RUN_NOT_FOUND, detail="no such run"))
            return
        try:
            record = await store.find_run(frame.run_id)
            if record is not None and record.context_id == session.context_id and not record.finished:
                record = await store.record_run_cancel(frame.run_id)
        except StoreError as exc:
            await self._reply_store_error(session, exc, None)
            return
        if record is None or record.context_id != session.context_id:
            # Another user's run answers exactly like a run that does not exist (section 3).
            await session.send(ErrorFrame(code=ErrorCode.RUN_NOT_FOUND, detail="no such run"))
            return
        if record.finished:
            await session.send(ErrorFrame(code=ErrorCode.RUN_FINISHED, detail=f"the run has ended ({record.state})"))
            return
        pending = self._remote_cancels.setdefault(record.run_id, _RemoteCancel(record.context_id, record.user_id))
        if session not in pending.sessions:
            pending.sessions.append(session)

    async def _cancel(self, run: _Run, detail: Mapping[str, Any]) -> None:
        """Cancel a run this node runs (section 4): a waiting run ends at once, a running one at
        its next step."""
        queue = self._queues.get(run.context_id)
        if queue is not None and run in queue:
            queue.remove(run)
            self._request_cancel(run, FailureCode.CANCELLED, detail)
            await self._finish_unstarted(run)
            return
        self._request_cancel(run, FailureCode.CANCELLED, detail)

    async def _reply_store_error(self, session: Session, exc: StoreError, request_id: str | None) -> None:
        if self._state is not None:
            self._state.metrics.store_errors.labels(type=exc.code).inc()
        log.warning("store failed: %s", exc)
        with contextlib.suppress(SendFailed):
            await session.send(ErrorFrame(code=exc.code, request_id=request_id, detail=exc.operation))

    # -- validation ----------------------------------------------------------------------------

    async def _validate(self, session: Session, frame: RunStart, tools: list[str]) -> None:
        """Every prerequisite, before anything starts (section 4); raises RunRejected."""
        assert self._state is not None and self._store is not None
        settings = self._state.settings
        if self._stopping or self._state.draining:
            raise RunRejected("over_capacity", "the server is shutting down")
        if not frame.input.strip():
            raise RunRejected("invalid_input", "input is empty")
        if len(frame.input) > settings.run_input_max_chars:
            raise RunRejected("invalid_input", f"input longer than {settings.run_input_max_chars} characters")
        unknown = self.tools.unknown(tools)
        if unknown:
            raise RunRejected("unknown_tool", f"not registered: {', '.join(sorted(unknown)[:8])}")
        info = await self._store.find_context(session.context_id)
        if info is None or info.expired:
            raise RunRejected("context_expired", "the context has expired; reconnect for a new one")
        if len(self._runs) >= settings.max_active_runs:
            raise RunRejected("over_capacity", f"{settings.max_active_runs} runs active on this server")
        if len(self._queues.get(session.context_id, ())) >= settings.max_queued_runs_per_context:
            raise RunRejected("over_capacity", f"{settings.max_queued_runs_per_context} runs already waiting")
        if self._state.memory_exceeded():
            raise RunRejected("over_capacity", "the server is above its memory limit")

    # -- scheduling ----------------------------------------------------------------------------

    def _schedule(self, context_id: str) -> None:
        """Start the context's next waiting run if none is running (one at a time, in order)."""
        if context_id in self._running or self._stopping:
            return
        queue = self._queues.get(context_id)
        if not queue:
            self._queues.pop(context_id, None)
            return
        run = queue.popleft()
        self._running[context_id] = run
        run.task = self._spawn(self._drive(run), f"run-{run.run_id}")

    def _request_cancel(self, run: _Run, code: str, detail: Mapping[str, Any]) -> None:
        if run.machine.can("cancel"):
            run.cancel_code = code
            run.machine.fire("cancel", {**detail, "code": code})
            self._interrupt(run)

    @staticmethod
    def _interrupt(run: _Run) -> None:
        """Wake the run's driver: the agent's step is interrupted now (see _step); elsewhere the
        driver checks ``run.cancel`` before each step."""
        run.cancel.set()
        if run.in_agent and run.task is not None and not run.cancel_sent:
            run.cancel_sent = True
            run.task.cancel()

    async def _finish_unstarted(self, run: _Run) -> None:
        """A run cancelled before it started: exactly one agent_failed, no agent_started."""
        self._request_cancel(run, run.cancel_code, {"why": run.cancel_code})
        await self._end_here(
            run, self._emit(run, "agent_failed", {"code": run.cancel_code, "detail": "cancelled before start"})
        )

    def _ended(self, run: _Run) -> None:
        if self._runs.pop(run.run_id, None) is None:
            return
        assert self.metrics is not None
        if self.leases is not None:
            self.leases.release(run.run_id)
        self.metrics.runs_active.dec()
        state = run.machine.state
        self.metrics.runs.labels(outcome="lease_lost" if run.lease_lost else state.name.lower()).inc()
        if self._store is not None and state in (Run.COMPLETED, Run.FAILED) and not run.lease_lost:
            self._spawn(self._store.set_run_state(run.run_id, state.name), f"run-state-{run.run_id}")
        if self._running.get(run.context_id) is run:
            del self._running[run.context_id]
        self._schedule(run.context_id)

    # -- the driver ----------------------------------------------------------------------------

    async def _emit(self, run: _Run, kind: str, data: Mapping[str, Any]) -> None:
        """Fire ``kind`` on the run machine, then append and send the event it emits."""
        assert self.delivery is not None
        if self.leases is not None and not self.leases.valid(run.run_id):
            # The fence (section 6): the lease may have run out while this node stalled; renew
            # it before appending, and append nothing if another node has taken the run over.
            await self.leases.ensure(run.run_id)
        # Events already queued may have been refused by the store: then this step is not taken
        # (StoreError ends the run with agent_failed right after its last stored event).
        self.delivery.check_run(run.context_id, run.run_id)
        run.machine.fire(kind, {k: v for k, v in data.items() if k in ("code", "tool_call_id", "tool")})
        # Awaited until stored and sent: a terminal event (the run ends only then, and a refusal
        # still reaches _store_failed) and tool_executing (a tool's side effects never happen
        # before its call is on record). Other events are queued (see DeliveryService.publish).
        await self.delivery.publish(
            run.context_id, run.user, run.run_id, kind, {**data}, durable=kind in _DURABLE
        )

    async def _drive(self, run: _Run) -> None:
        await self._end_here(run, self._execute(run))

    async def _end_here(self, run: _Run, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (the run's steps, or its last one), then let the run go. A store failure
        ends it with agent_failed (``_store_failed``); a lease another node took (LeaseLost)
        ends it here with nothing more appended: that node ends it (section 6)."""
        try:
            try:
                await work
            except LeaseLost:
                raise
            except StoreError as exc:
                await self._store_failed(run, exc)
        except LeaseLost as exc:
            log.warning("run %s: stopped here, another node took it over: %s", run.run_id, exc)
            run.lease_lost = True
        finally:
            self._ended(run)

    async def _store_failed(self, run: _Run, exc: StoreError) -> None:
        """The stream cannot take the run's events. Try once more to record its end; if the store
        still refuses, tell the context's sessions directly (the error pipe is never silent)."""
        assert self._state is not None
        self._state.metrics.store_errors.labels(type=exc.code).inc()
        log.error("run %s: store failed: %s", run.run_id, exc)
        try:
            await self._fail(run, exc.code, f"store failed during {exc.operation}")
            return
        except LeaseLost:
            raise  # another node ends the run: nothing to tell from here
        except StoreError as again:
            log.error("run %s: agent_failed could not be stored either: %s", run.run_id, again)
        stream = self.delivery.streams.get(run.context_id) if self.delivery is not None else None
        for session in list(stream.sessions.values()) if stream is not None else []:
            with contextlib.suppress(SendFailed):
                await session.send(
                    ErrorFrame(code=exc.code, detail=f"run {run.run_id} failed: store unavailable")
                )

    async def _fail(self, run: _Run, code: str, detail: str) -> None:
        """End the run with agent_failed from wherever it is (closing an open tool pair first)."""
        m = run.machine
        if m.state is Run.TOOL_RUNNING and run.open_call is not None:
            call_id, tool = run.open_call
            run.open_call = None
            await self._emit(
                run,
                "tool_completed",
                {
                    "tool_call_id": call_id,
                    "tool": tool,
                    **ToolOutcome(False, code="cancelled", detail=code).as_data(),
                },
            )
        if m.state is Run.ACCEPTED and m.can("cancel"):
            m.fire("cancel", {"code": code})
        if m.can("agent_failed"):
            await self._emit(run, "agent_failed", {"code": code, "detail": detail})

    async def _execute(self, run: _Run) -> None:
        assert self._state is not None
        m = run.machine
        if not m.can("agent_started"):
            # A cancel won the race with the start (section 4): one agent_failed, no agent_started.
            await self._emit(
                run, "agent_failed", {"code": run.cancel_code, "detail": "cancelled before start"}
            )
            return
        await self._emit(run, "agent_started", {"request_id": run.request_id, "tools": run.tools})
        gen = self.agent.steps(AgentRequest(run.run_id, run.user, run.input, tuple(run.tools)))
        try:
            await self._steps(run, gen)
        finally:
            await self._close_agent(run, gen)

    async def _close_agent(self, run: _Run, gen: StepStream) -> None:
        try:
            await gen.aclose()
        except Exception:
            # The agent's cleanup raised after its run already ended with a terminal event:
            # nothing is left to report to the user, so it is logged with its traceback.
            log.exception("run %s: agent cleanup failed", run.run_id)

    async def _steps(self, run: _Run, gen: StepStream) -> None:
        m = run.machine
        outcome: ToolOutcome | None = None
        calls = 0
        while True:
            if run.cancel.is_set():
                await self._fail(run, run.cancel_code, "cancelled")
                return
            try:
                step = await self._step(run, gen, outcome)
            except _Cancelled:
                await self._fail(run, run.cancel_code, "cancelled")
                return
            except StopAsyncIteration:
                await self._fail(run, FailureCode.INTERNAL, "the agent ended without a final answer")
                return
            except AgentFailed as exc:
                await self._fail(run, exc.code, exc.detail)
                return
            except StoreError:
                raise
            except Exception as exc:
                # Conversion, not swallowing: a crash inside the agent ends the run with
                # agent_failed (internal), which the user receives; the traceback is logged.
                log.exception("run %s: the agent crashed", run.run_id)
                await self._fail(run, FailureCode.INTERNAL, type(exc).__name__)
                return
            outcome = None
            if isinstance(step, Thinking):
                if not m.can("agent_thinking"):
                    await self._fail(
                        run, FailureCode.STEP_LIMIT, f"more than {self._machine.params['max_steps']} steps"
                    )
                    return
                await self._emit(run, "agent_thinking", {"text": step.text})
            elif isinstance(step, ToolCall):
                if not m.can("tool_executing"):
                    await self._fail(
                        run, FailureCode.STEP_LIMIT, f"more than {self._machine.params['max_steps']} steps"
                    )
                    return
                calls += 1
                call_id = f"{run.run_id[:8]}-call-{calls}"
                run.open_call = (call_id, step.tool)
                await self._emit(
                    run,
                    "tool_executing",
                    {"tool_call_id": call_id, "tool": step.tool, "arguments": dict(step.arguments)},
                )
                outcome = await self._call_tool(run, step)
                run.open_call = None
                await self._emit(
                    run, "tool_completed", {"tool_call_id": call_id, "tool": step.tool, **outcome.as_data()}
                )
            elif isinstance(step, FinalAnswer):
                await self._emit(run, "agent_completed", {"answer": step.text})
                return
            else:
                await self._fail(run, FailureCode.INTERNAL, f"unknown step {type(step).__name__}")
                return

    async def _step(self, run: _Run, gen: StepStream, outcome: ToolOutcome | None) -> Any:
        """The agent's next step, awaited in the driver task itself; raises _Cancelled when the
        run is cancelled meanwhile.

        Racing each step against ``run.cancel`` (``_race``) costs two tasks and a wait per step,
        a large share of a run's CPU when steps are cheap. Instead ``_request_cancel`` cancels the
        driver task while it is suspended here: the agent sees CancelledError at its await, as
        with ``_race``, and the cancellation is taken back (``uncancel``) so that it does not
        leak into the driver's later awaits. A cancellation from anyone else (shutdown)
        propagates.
        """
        run.in_agent = True
        try:
            step = await gen.asend(outcome)
        except asyncio.CancelledError:
            if self._take_back_cancel(run):
                raise _Cancelled() from None
            raise
        finally:
            run.in_agent = False
        if self._take_back_cancel(run):
            # The agent swallowed our CancelledError and produced a step anyway: the cancel
            # came first, so the step is dropped (as _race drops a cancelled awaitable's result).
            raise _Cancelled()
        return step

    @staticmethod
    def _take_back_cancel(run: _Run) -> bool:
        """Undo the task cancellation _request_cancel made; True if no other one is pending."""
        if not run.cancel_sent:
            return False
        run.cancel_sent = False
        task = asyncio.current_task()
        return task is None or task.uncancel() == 0

    async def _race(self, run: _Run, awaitable: Any) -> Any:
        """Await ``awaitable`` unless the run is cancelled first (then raise _Cancelled)."""
        work = asyncio.ensure_future(awaitable)
        cancelled = asyncio.ensure_future(run.cancel.wait())
        try:
            await asyncio.wait({work, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await work
        raise _Cancelled()

    async def _call_tool(self, run: _Run, call: ToolCall) -> ToolOutcome:
        assert self._state is not None
        try:
            outcome: ToolOutcome = await self._race(
                run,
                execute(
                    self.tools,
                    call.tool,
                    call.arguments,
                    allowed=run.tools,
                    timeout=self._state.settings.tool_timeout,
                ),
            )
        except _Cancelled:
            return ToolOutcome(False, code="cancelled", detail=run.cancel_code)
        return outcome


__all__ = ["AgentRuntime", "RunRejected"]
