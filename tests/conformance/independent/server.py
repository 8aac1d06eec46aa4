"""An independent implementation of docs/protocol.md for the conformance kit's regression suite.

One asyncio process, state in memory: the plain ``websockets`` server serves ``/v1/ws`` and its
``process_request`` hook answers the HTTP endpoints (Transport: ``/healthz``, ``/readyz``,
``/metrics``, ``/v1/events``, ``/v1/escalations``). Tokens are checked with PyJWT (section 2).
It is written from the protocol page, not from the reference server, and imports nothing of it.

Run it as ``python -m independent.server --port N [--bugs a,b]`` (with ``tests/conformance`` on
``sys.path``), settings from the ``PIPEPROOF_*`` variables of the Settings table; or call
:func:`serve` in a thread or child process. ``--bugs`` switches on the defects of :mod:`.bugs`.

What the server does, by section of docs/protocol.md:

1. a socket is OPEN until its first frame, INITIALISING while the token and the context are
   resolved (pipelined frames wait in a bounded buffer), READY from then on: ``connection_ack`` is
   queued first, buffered frames are handled after it, one at a time, and every frame leaves
   through one ordered queue per socket;
2. HS256 tokens, one close reason per failure;
3. one context per user (a per-user lock around get-or-create), ``context_ttl`` expiry with a new
   epoch, the per-user and per-account limits;
4. runs of a context run one at a time (a queue), with the demo agent below;
5. a durable-in-memory stream per context: seqs 1, 2, 3..., fan-out to every READY session,
   cumulative acks, resends after the ack wait, escalation (``max_attempts``, ``no_session``,
   ``send_failed``), resume;
6. WebSocket pings every ``heartbeat_interval``, ``4408 heartbeat_timeout`` after two silent
   intervals, shutdown with ``1001 going_away``.

**The demo agent** (the protocol names it but does not define it; this is this server's own):
each line of a run's ``input`` is one step. ``/NAME {json}`` calls tool NAME (``tool_executing``,
then ``tool_completed``); the one tool is ``sleep`` (``{"seconds": S}``); an unknown tool completes
``ok: false`` (``unknown_tool``) and the run fails ``tool_error``. Any other line is thought about
(``agent_thinking``) and, when it is arithmetic, computed. The run ends ``agent_completed`` with
the last answer.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import logging
import math
import operator
import os
import random
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .bugs import Bug, parse

log = logging.getLogger("independent")

# Bounds of the Bad input table (docs/protocol.md, "Bad input").
SEQ_MAX = 2**31 - 1
ID_MAX = 128
TOKEN_MAX = 8192
TOOLS_MAX = 32
USER_MAX = 256
DEV_SECRET = "pipeproof-independent-dev-secret"
STORE_LATENCY = 0.02  # seconds between reading and writing a context: what a store round trip costs
TOOLS = frozenset({"sleep"})  # the registered tools (section 4)


# -- settings (docs/protocol.md, "Settings") ----------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The settings of the protocol's table this server honours (same names, same defaults)."""

    jwt_secret: str = DEV_SECRET
    jwt_audience: str = ""
    disabled_users: frozenset[str] = frozenset()
    init_timeout: float = 3.0
    preready_buffer_frames: int = 32
    preready_buffer_bytes: int = 262144
    error_budget: int = 10
    max_frame_bytes: int = 1048576
    context_ttl: float = 1800.0
    max_connections_per_user: int = 8
    max_connections_per_account: int = 256
    ack_timeout: float = 5.0
    ack_backoff: float = 2.0
    ack_timeout_max: float = 60.0
    ack_jitter: float = 0.1
    max_attempts: int = 5
    resume_window: float = 120.0
    heartbeat_interval: float = 15.0
    shutdown_grace: float = 10.0
    run_max_steps: int = 64
    run_input_max_chars: int = 16384
    tool_timeout: float = 30.0
    max_queued_runs_per_context: int = 8
    max_active_runs: int = 256

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read ``PIPEPROOF_<NAME>`` for every field; a bad value names the variable, never the value."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f"PIPEPROOF_{f.name.upper()}"
            raw = env.get(name)
            if raw is None:
                continue
            default = getattr(cls, f.name)
            try:
                values[f.name] = _convert(default, raw, zero_ok=f.name == "ack_jitter")
            except ValueError:
                raise SystemExit(f"{name}: not a valid value") from None
        s = cls(**values)
        if s.max_connections_per_user > s.max_connections_per_account:
            raise SystemExit("PIPEPROOF_MAX_CONNECTIONS_PER_USER: above PIPEPROOF_MAX_CONNECTIONS_PER_ACCOUNT")
        return s

    def ack_wait(self, attempt: int) -> float:
        """The wait for the ack of ``attempt`` (section 5): backoff, capped, jitter only upwards so
        that each wait is at least ``ack_timeout``."""
        base = min(self.ack_timeout * self.ack_backoff ** max(0, attempt - 1), self.ack_timeout_max)
        return base * (1.0 + random.uniform(0.0, self.ack_jitter))


def _convert(default: Any, raw: str, zero_ok: bool = False) -> Any:
    if isinstance(default, frozenset):
        text = raw.strip()
        items = json.loads(text) if text.startswith("[") else [p.strip() for p in text.split(",")]
        return frozenset(str(i) for i in items if str(i))
    if isinstance(default, bool):
        raise ValueError(raw)
    if isinstance(default, int):
        number = int(raw)
        if number < 1:
            raise ValueError(raw)
        return number
    if isinstance(default, float):
        value = float(raw)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise ValueError(raw)
        return value
    return raw


# -- authentication (section 2) -----------------------------------------------------------------------


class AuthError(Exception):
    """A token refused with one code of section 2's table (close 4401/4403, HTTP 401/403)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code

    @property
    def close_code(self) -> int:
        return 4403 if self.code == "user_disabled" else 4401

    @property
    def http_status(self) -> int:
        return 403 if self.code == "user_disabled" else 401


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthError("token_malformed")
    return float(value)


def verify_token(token: Any, s: Settings, bugs: frozenset[Bug], now: float | None = None) -> tuple[str, str]:
    """The (user, account) of a valid token, or :class:`AuthError` with the section-2 code."""
    try:
        return _verify(token, s, time.time() if now is None else now)
    except AuthError as exc:
        if Bug.GENERIC_AUTH_ERROR in bugs and exc.code != "token_malformed":
            raise AuthError("token_malformed") from None
        raise


def _verify(token: Any, s: Settings, now: float) -> tuple[str, str]:
    if token is None or token == "":
        raise AuthError("token_missing")
    if not isinstance(token, str) or len(token) > TOKEN_MAX:
        raise AuthError("token_malformed")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AuthError("token_malformed") from None
    if header.get("alg") != "HS256":
        raise AuthError("token_bad_signature")  # another algorithm, `none` included
    try:
        claims: dict[str, Any] = jwt.decode(
            token, s.jwt_secret, algorithms=["HS256"],
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False},
        )
    except jwt.InvalidSignatureError:
        raise AuthError("token_bad_signature") from None
    except jwt.PyJWTError:
        raise AuthError("token_malformed") from None
    if "exp" not in claims:
        raise AuthError("token_malformed")
    exp, nbf, iat = (_time_claim(claims, n) for n in ("exp", "nbf", "iat"))
    account = claims.get("account", "default")
    if not isinstance(account, str) or not account or len(account) > USER_MAX or "\0" in account:
        raise AuthError("token_malformed")
    if exp is not None and now >= exp:
        raise AuthError("token_expired")
    if (nbf is not None and nbf > now) or (iat is not None and iat > now):
        raise AuthError("token_not_yet_valid")
    aud = claims.get("aud")
    if s.jwt_audience:
        if aud != s.jwt_audience and not (isinstance(aud, list) and s.jwt_audience in aud):
            raise AuthError("token_bad_audience")
    elif aud is not None:
        raise AuthError("token_bad_audience")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > USER_MAX or "\0" in sub:
        raise AuthError("user_unknown")
    if sub in s.disabled_users:
        raise AuthError("user_disabled")
    return sub, account


# -- streams, contexts and runs (sections 3, 4, 5) -------------------------------------------------------

PENDING, SENT, ACKED, ESCALATED = "PENDING", "SENT", "ACKED", "ESCALATED"


@dataclass
class Event:
    """One event of a context's stream and its delivery state (section 5, "States")."""

    seq: int
    event_id: str
    run_id: str
    kind: str
    data: dict[str, Any]
    state: str = PENDING
    attempt: int = 0  # writes so far, failed ones included
    delivered: bool = False  # written to a READY session at least once
    reason: str | None = None
    ack_due: float = math.inf  # while SENT: when the ack wait runs out
    idle_spent: float = 0.0  # the no-session budget used so far (resume_window is per event)
    idle_since: float | None = None  # counting no-session time since then
    abandoned: bool = False  # the bugs that let an event fall out of delivery

    def frame(self, attempt: int | None = None) -> dict[str, Any]:
        return {"type": "event", "seq": self.seq, "event_id": self.event_id, "run_id": self.run_id,
                "event": self.kind, "data": self.data, "attempt": self.attempt if attempt is None else attempt}

    def record(self) -> dict[str, Any]:
        out = {k: v for k, v in self.frame().items() if k != "type"}
        out["state"] = self.state
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclass
class Run:
    """One accepted run (section 4)."""

    run_id: str
    request_id: str
    ctx: Context
    text: str
    state: str = "QUEUED"  # QUEUED, RUNNING, FINISHED
    outcome: str = ""
    cancel: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Context:
    """A user's execution context: its stream, its READY sessions and its runs (sections 3-5)."""

    context_id: str
    epoch: int
    user: str
    account: str
    last_activity: float
    seq: int = 0
    events: dict[int, Event] = field(default_factory=dict)
    sessions: list[Session] = field(default_factory=list)  # READY, connection_ack queued
    holders: int = 0  # sockets resolved to this context and not yet gone (they keep it alive)
    requests: dict[str, str] = field(default_factory=dict)  # request_id -> run_id
    queue: deque[Run] = field(default_factory=deque)
    current: Run | None = None
    kick: asyncio.Event = field(default_factory=asyncio.Event)
    wake_runs: asyncio.Event = field(default_factory=asyncio.Event)
    skipped: bool = False  # Bug.SEQ_GAP: this stream skipped its number already
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class Server:
    """Everything the process knows: contexts, sockets, runs, counters."""

    def __init__(self, settings: Settings, bugs: frozenset[Bug] = frozenset()) -> None:
        self.s = settings
        self.bugs = bugs
        self.contexts: dict[str, Context] = {}  # every context ever created, by id
        self.current: dict[str, Context] = {}  # user -> the context init resolves to
        self.history: dict[str, list[Context]] = {}  # user -> every context of the user
        self.by_account: dict[str, Context] = {}  # account -> its most recently used context
        self.locks: dict[str, asyncio.Lock] = {}
        self.user_slots: dict[str, int] = {}
        self.account_slots: dict[str, int] = {}
        self.runs: dict[str, Run] = {}
        self.active_runs = 0
        self.sockets: set[Session] = set()
        self.closes: dict[tuple[int, str], int] = {}
        self.escalations = 0
        self.stopping = False

    def has(self, bug: Bug) -> bool:
        return bug in self.bugs

    # -- contexts (section 3) ---------------------------------------------------------------------------
    def _expired(self, ctx: Context, now: float) -> bool:
        busy = ctx.holders > 0 or ctx.current is not None or bool(ctx.queue)
        return not busy and now - ctx.last_activity >= self.s.context_ttl

    async def resolve_context(self, user: str, account: str) -> tuple[Context, bool]:
        """Atomic get-or-create of the user's live context; (context, created). The per-user lock
        makes it atomic: however many inits race, they all get the same context (section 3)."""
        if self.has(Bug.DUPLICATE_CONTEXT):
            return await self._get_or_create(user, account)
        lock = self.locks.setdefault(user, asyncio.Lock())
        async with lock:
            return await self._get_or_create(user, account)

    async def _get_or_create(self, user: str, account: str) -> tuple[Context, bool]:
        found = self.current.get(user)
        await asyncio.sleep(STORE_LATENCY)  # the read, then the write: a store round trip apart
        now = time.monotonic()
        if found is not None and not self._expired(found, now):
            found.last_activity = now
            found.holders += 1
            return found, False
        if found is not None and self.has(Bug.EXPIRED_CONTEXT_REUSED):
            ctx = Context(found.context_id, found.epoch, user, account, now)
        else:
            ctx = Context(uuid.uuid4().hex, 1 if found is None else found.epoch + 1, user, account, now)
        ctx.holders = 1
        self.contexts[ctx.context_id] = ctx
        self.current[user] = ctx
        self.history.setdefault(user, []).append(ctx)
        self.by_account[account] = ctx
        ctx.tasks.append(asyncio.create_task(self._delivery_loop(ctx)))
        ctx.tasks.append(asyncio.create_task(self._run_loop(ctx)))
        return ctx, True

    def route(self, ctx: Context) -> Context:
        """The stream an ack or an HTTP read of ``ctx``'s user applies to: its own (section 3,
        Isolation); Bug.CROSS_USER_ROUTE keys it by account instead."""
        if self.has(Bug.CROSS_USER_ROUTE):
            return self.by_account.get(ctx.account, ctx)
        return ctx

    # -- the stream (section 5) -------------------------------------------------------------------------
    def append(self, ctx: Context, run_id: str, kind: str, data: dict[str, Any]) -> Event:
        """Append first (the next seq, no gap), then send: the delivery loop writes it."""
        ctx.seq += 1
        if self.has(Bug.SEQ_GAP) and ctx.seq == 3 and not ctx.skipped:
            ctx.skipped = True
            ctx.seq += 1
        ev = Event(ctx.seq, uuid.uuid4().hex[:16], run_id, kind, data)
        ctx.events[ev.seq] = ev
        ctx.last_activity = time.monotonic()
        self.by_account[ctx.account] = ctx
        ctx.kick.set()
        return ev

    def ack(self, ctx: Context, through: int) -> None:
        """Cumulative ack: every delivered, unfinished event with seq <= through is ACKED (section 5)."""
        target = self.route(ctx)
        for ev in target.events.values():
            if ev.seq > through:
                break
            if ev.delivered and ev.state in (PENDING, SENT):
                ev.state, ev.ack_due, ev.idle_since = ACKED, math.inf, None
        target.kick.set()

    def _escalate(self, ev: Event, reason: str) -> None:
        ev.state, ev.reason, ev.ack_due, ev.idle_since = ESCALATED, reason, math.inf, None
        self.escalations += 1
        log.info("escalated seq %s: %s", ev.seq, reason)

    def _write(self, ctx: Context, ev: Event, now: float) -> None:
        """One attempt: written to every READY session of the context (fan-out)."""
        targets = [s for s in ctx.sessions if s.open]
        ev.attempt += 1
        if not targets:
            # A write that fails counts as an attempt and leaves the event PENDING (send_failed).
            if ev.attempt >= self._cap():
                self._escalate(ev, "send_failed")
            return
        frame = ev.frame()
        for session in targets:
            session.push(frame)
        ev.delivered = True
        ev.state = SENT
        wait = self.s.ack_wait(ev.attempt)
        ev.ack_due = now + (wait * 0.2 if self.has(Bug.EARLY_RESEND) else wait)

    def _cap(self) -> int:
        return self.s.max_attempts + (1 if self.has(Bug.RETRY_CAP_OFF_BY_ONE) else 0)

    def _step(self, ctx: Context, now: float) -> float:
        """Act on every deadline that is due; return the next one."""
        has_session = any(s.open for s in ctx.sessions)
        due = math.inf
        for ev in list(ctx.events.values()):
            if ev.state in (ACKED, ESCALATED) or ev.abandoned:
                continue
            if ev.state == SENT:
                if now < ev.ack_due:
                    due = min(due, ev.ack_due)
                    continue
                if ev.attempt >= self._cap():
                    if self.has(Bug.NO_ESCALATION):
                        ev.abandoned = True  # stays SENT for ever
                    else:
                        self._escalate(ev, "max_attempts")
                    continue
                ev.state = PENDING
            if has_session:
                if ev.idle_since is not None:
                    ev.idle_spent += now - ev.idle_since
                    ev.idle_since = None
                self._write(ctx, ev, now)
                if ev.state == SENT:
                    due = min(due, ev.ack_due)
                continue
            if self.has(Bug.SWALLOWED_SEND_FAILURE):
                ev.attempt += 1
                ev.state = ACKED  # the failed send is 'handled': the event is done
                continue
            if self.has(Bug.NO_SESSION_NEVER_NOTIFIED):
                ev.abandoned = True
                continue
            if ev.idle_since is None:
                ev.idle_since = now
            left = self.s.resume_window - ev.idle_spent - (now - ev.idle_since)
            if left <= 0:
                self._escalate(ev, "no_session")
            else:
                due = min(due, now + left)
        return due

    async def _delivery_loop(self, ctx: Context) -> None:
        while True:
            ctx.kick.clear()
            now = time.monotonic()
            due = self._step(ctx, now)
            timeout = None if due == math.inf else max(0.0, due - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.kick.wait(), timeout)

    def attach(self, ctx: Context, session: Session, resume: int | None) -> None:
        """A session became READY and its ack is queued: redeliver what it has not acked
        (section 5, Resume). A SENT event is a copy of the attempt in flight; a PENDING one is sent
        as the next attempt by the delivery loop."""
        for ev in ctx.events.values():
            if resume is not None and ev.seq <= resume:
                if self.has(Bug.RESEND_ACKED):
                    session.push(ev.frame())
                continue
            if ev.state == SENT and not ev.abandoned:
                session.push(ev.frame())
        ctx.sessions.append(session)
        ctx.kick.set()

    def detach(self, ctx: Context, session: Session) -> None:
        if session in ctx.sessions:
            ctx.sessions.remove(session)
        ctx.holders = max(0, ctx.holders - 1)
        ctx.last_activity = time.monotonic()  # attached until now: the keep-alive counted
        ctx.kick.set()

    # -- runs (section 4) -------------------------------------------------------------------------------
    def start_run(self, session: Session, frame: Mapping[str, Any]) -> dict[str, Any] | None:
        """``run.start``: the reply (run.accepted or error), or None for a schema violation."""
        ctx = session.ctx
        assert ctx is not None
        rid, text, tools = frame.get("request_id"), frame.get("input"), frame.get("tools")
        if not _valid_id(rid) or not isinstance(text, str):
            return None
        if tools is not None and (not isinstance(tools, list) or len(tools) > TOOLS_MAX
                                  or not all(_valid_id(t) for t in tools)):
            return None
        assert isinstance(rid, str)
        known = ctx.requests.get(rid)
        if known is not None:
            return {"type": "run.accepted", "request_id": rid, "run_id": known}
        if len(text) > self.s.run_input_max_chars:
            return {"type": "error", "request_id": rid, "code": "invalid_input", "detail": "input: too long"}
        unknown = [t for t in tools or [] if t not in TOOLS]
        if unknown and not self.has(Bug.LATE_VALIDATION):
            return {"type": "error", "request_id": rid, "code": "unknown_tool", "detail": "tools: not registered"}
        if len(ctx.queue) >= self.s.max_queued_runs_per_context or self.active_runs >= self.s.max_active_runs:
            return {"type": "error", "request_id": rid, "code": "over_capacity"}
        if unknown:
            text = "\n".join(f"/{t}" for t in unknown)  # Bug.LATE_VALIDATION: found out while running
        run = Run(uuid.uuid4().hex, rid, ctx, text)
        ctx.requests[rid] = run.run_id
        self.runs[run.run_id] = run
        self.active_runs += 1
        ctx.queue.append(run)
        ctx.wake_runs.set()
        return {"type": "run.accepted", "request_id": rid, "run_id": run.run_id}

    def cancel_run(self, session: Session, frame: Mapping[str, Any]) -> dict[str, Any] | None:
        """``run.cancel`` (section 4, Cancelling); None when the answer is the terminal event."""
        run_id = frame.get("run_id")
        if not _valid_id(run_id):
            return {"type": "error", "code": "invalid_message", "detail": "run_id: must be a valid id"}
        run = self.runs.get(str(run_id))
        if run is None or run.ctx.user != session.user:
            if run is not None and self.has(Bug.CANCEL_REVEALS_FOREIGN_RUN):
                return {"type": "error", "code": "forbidden", "detail": "not your run"}
            return {"type": "error", "code": "run_not_found", "detail": "no such run"}
        if run.state == "FINISHED":
            return {"type": "error", "code": "run_finished", "detail": f"the run has ended ({run.outcome})"}
        if run.state == "QUEUED":
            if self.has(Bug.CANCEL_LOST):
                return None
            # A cancel before the start always wins: one agent_failed, no agent_started.
            with contextlib.suppress(ValueError):
                run.ctx.queue.remove(run)
            self._finish(run, "agent_failed", {"code": "cancelled", "detail": "cancelled before it started"})
            return None
        run.cancel.set()
        return None

    def _finish(self, run: Run, kind: str, data: dict[str, Any]) -> None:
        self.append(run.ctx, run.run_id, kind, data)
        run.state, run.outcome = "FINISHED", "COMPLETED" if kind == "agent_completed" else "FAILED"
        self.active_runs -= 1

    async def _run_loop(self, ctx: Context) -> None:
        """The context's runs, one at a time in arrival order."""
        while True:
            while ctx.queue:
                run = ctx.queue.popleft()
                ctx.current = run
                try:
                    await self._execute(run)
                except Exception:
                    log.exception("run %s crashed", run.run_id)
                    if run.state != "FINISHED":
                        self._finish(run, "agent_failed", {"code": "internal", "detail": "the agent crashed"})
                finally:
                    ctx.current = None
                    ctx.last_activity = time.monotonic()
            ctx.wake_runs.clear()
            await ctx.wake_runs.wait()

    async def _execute(self, run: Run) -> None:
        """The demo agent (module docstring)."""
        ctx, rid = run.ctx, run.run_id
        run.state = "RUNNING"
        self.append(ctx, rid, "agent_started", {})
        answer = ""
        steps = 0
        for n, line in enumerate((x.strip() for x in run.text.splitlines() if x.strip()), start=1):
            if run.cancel.is_set():
                self._finish(run, "agent_failed", {"code": "cancelled", "detail": "cancelled"})
                return
            steps += 1
            if steps > self.s.run_max_steps:
                self._finish(run, "agent_failed", {"code": "step_limit", "detail": "too many steps"})
                return
            if not line.startswith("/"):
                self.append(ctx, rid, "agent_thinking", {"text": f"step {n}: thinking about the input"})
                answer = _answer(line)
                await asyncio.sleep(0)
                continue
            name, _, rest = line[1:].partition(" ")
            call_id = f"call-{n}"
            self.append(ctx, rid, "tool_executing", {"tool_call_id": call_id, "tool": name})
            ok, code = await self._tool(run, name, rest.strip())
            done_id = f"call-{n}-x" if self.has(Bug.UNPAIRED_TOOL) else call_id
            done: dict[str, Any] = {"tool_call_id": done_id, "ok": ok}
            if code:
                done["code"] = code
            self.append(ctx, rid, "tool_completed", done)
            if not ok:
                if run.cancel.is_set():
                    self._finish(run, "agent_failed", {"code": "cancelled", "detail": "cancelled"})
                elif self.has(Bug.SILENT_RUN_FAILURE):
                    run.state, run.outcome = "FINISHED", "FAILED"  # logged and dropped: nobody is told
                    self.active_runs -= 1
                    log.warning("run %s: tool %s failed", rid, name)
                else:
                    self._finish(run, "agent_failed", {"code": "tool_error", "detail": f"tool {name} failed: {code}"})
                return
        if run.cancel.is_set():
            self._finish(run, "agent_failed", {"code": "cancelled", "detail": "cancelled"})
            return
        if self.has(Bug.ORPHAN_TOOL_COMPLETED):
            self.append(ctx, rid, "tool_completed", {"tool_call_id": "call-orphan", "ok": True})
        self._finish(run, "agent_completed", {"answer": answer})

    async def _tool(self, run: Run, name: str, args: str) -> tuple[bool, str]:
        """Run a tool call: (ok, code). ``sleep`` waits, interrupted by a cancel."""
        if name not in TOOLS:
            return False, "unknown_tool"
        try:
            params = json.loads(args) if args else {}
        except json.JSONDecodeError:
            return False, "invalid_arguments"
        seconds = params.get("seconds") if isinstance(params, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            return False, "invalid_arguments"
        try:
            await asyncio.wait_for(run.cancel.wait(), min(float(seconds), self.s.tool_timeout))
        except TimeoutError:
            return (False, "tool_timeout") if seconds > self.s.tool_timeout else (True, "")
        return False, "cancelled"

    # -- HTTP (Transport) -------------------------------------------------------------------------------
    def http(self, request: Request) -> Response:
        url = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        if url.path == "/healthz":
            return _json(200, {"status": "alive"})
        if url.path == "/readyz":
            checks = {c: "ok" for c in ("config", "store_reachable", "schema_version", "store_writable", "audit_log")}
            if self.stopping:
                return _json(503, {"status": "not_ready", "checks": checks, "failing": "shutdown"})
            return _json(200, {"status": "ready", "checks": checks})
        if url.path == "/metrics":
            return _text(200, self.metrics())
        if url.path in ("/v1/events", "/v1/escalations"):
            return self._stream_page(url.path, query, request.headers.get("Authorization"))
        return _json(404, {"error": {"code": "not_found"}})

    def _stream_page(self, path: str, query: Mapping[str, str], authorization: str | None) -> Response:
        if authorization is None:
            token: str | None = None
        else:
            scheme, _, token = authorization.partition(" ")
            if scheme != "Bearer":
                return _json(401, {"error": {"code": "token_malformed"}})
        try:
            user, _ = verify_token(token, self.s, self.bugs)
        except AuthError as exc:
            return _json(exc.http_status, {"error": {"code": exc.code}})
        after, limit = _int_query(query.get("after", "0"), 0, SEQ_MAX), _int_query(query.get("limit", "100"), 1, 1000)
        if after is None or limit is None:
            return _json(400, {"error": {"code": "invalid_query", "detail": "after/limit: out of range"}})
        mine = self.history.get(user, [])
        wanted = query.get("context_id")
        if wanted is not None:
            ctx = next((c for c in reversed(mine) if c.context_id == wanted), None)
            if ctx is None:
                return _json(404, {"error": {"code": "context_not_found"}})
        else:
            ctx = self.current.get(user)
        if ctx is not None:
            ctx = self.route(ctx)
        events = [] if ctx is None else [e for e in ctx.events.values() if e.seq > after]
        if path == "/v1/escalations":
            events = [e for e in events if e.state == ESCALATED]
        page = events[:limit]
        key = "escalations" if path == "/v1/escalations" else "events"
        return _json(200, {"context_id": None if ctx is None else ctx.context_id,
                           key: [e.record() for e in page], "next_after": page[-1].seq if page else after})

    def metrics(self) -> str:
        ready = sum(1 for s in self.sockets if s.state == "READY")
        lines = ["# TYPE pipeproof_connections gauge", f'pipeproof_connections{{state="READY"}} {ready}',
                 f'pipeproof_connections{{state="OTHER"}} {len(self.sockets) - ready}',
                 "# TYPE pipeproof_closes_total counter"]
        lines += [f'pipeproof_closes_total{{code="{c}",reason="{r}"}} {n}' for (c, r), n in sorted(self.closes.items())]
        lines += ["# TYPE pipeproof_escalations_total counter", f"pipeproof_escalations_total {self.escalations}"]
        return "\n".join(lines) + "\n"


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= ID_MAX and "\0" not in value


def _int_query(raw: str, low: int, high: int) -> int | None:
    if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
        return None
    value = int(raw)
    return value if low <= value <= high else None


def _json(status: int, body: Any) -> Response:
    return _response(status, json.dumps(body).encode(), "application/json")


def _text(status: int, body: str) -> Response:
    return _response(status, body.encode(), "text/plain; version=0.0.4")


def _response(status: int, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close")])
    return Response(status, HTTPStatus(status).phrase, headers, body)


_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}


def _answer(line: str) -> str:
    """The demo agent's answer to one line: arithmetic is computed, anything else echoed."""
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](value(node.left), value(node.right)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(line)

    if len(line) <= 64:
        try:
            result = value(ast.parse(line, mode="eval").body)
            return str(int(result)) if result.is_integer() else str(result)
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError):
            pass
    return line[:200]


# -- one socket (sections 1, 2, 6) ----------------------------------------------------------------------

_CLOSE = object()


class Session:
    """One WebSocket: its state (OPEN, INITIALISING, READY, CLOSED), the pre-READY buffer, the
    handled-in-order queue of READY frames and the one ordered outgoing queue (section 1)."""

    def __init__(self, server: Server, ws: ServerConnection) -> None:
        self.server = server
        self.s = server.s
        self.ws = ws
        self.session_id = uuid.uuid4().hex
        self.state = "OPEN"
        self.user = ""
        self.account = ""
        self.ctx: Context | None = None
        self.slot = False
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.buffer: list[str | bytes] = []
        self.buffer_bytes = 0
        self.inbox: deque[str | bytes] = deque()
        self.inbox_ready = asyncio.Event()
        self.errors = 0
        self.last_seen = time.monotonic()
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def open(self) -> bool:
        return self.state in ("INITIALISING", "READY") and self.ws.state.name == "OPEN"

    def has(self, bug: Bug) -> bool:
        return self.server.has(bug)

    def push(self, frame: Mapping[str, Any]) -> None:
        """Queue a frame behind every earlier one (one ordered queue: nothing overtakes the ack)."""
        if self.state != "CLOSED":
            self.outbox.put_nowait(json.dumps(frame))

    def close(self, code: int, reason: str) -> None:
        """Decide to close: nothing more is handled or queued; the writer sends the close frame
        after what is already queued."""
        if self.state == "CLOSED":
            return
        self.state = "CLOSED"
        self.server.closes[(code, reason)] = self.server.closes.get((code, reason), 0) + 1
        self._release()
        self.outbox.put_nowait((_CLOSE, code, reason))

    def _release(self) -> None:
        if self.ctx is not None:
            self.server.detach(self.ctx, self)
            self.ctx = None
        if self.slot:
            self.slot = False
            self.server.user_slots[self.user] -= 1
            self.server.account_slots[self.account] -= 1

    async def writer(self) -> None:
        while True:
            item = await self.outbox.get()
            try:
                if isinstance(item, tuple) and item[0] is _CLOSE:
                    await self.ws.close(item[1], item[2])
                    return
                if item is None:
                    return
                await self.ws.send(item)
            except ConnectionClosed:
                return

    # -- the socket's life ------------------------------------------------------------------------------
    async def run(self) -> None:
        self.server.sockets.add(self)
        writer = asyncio.create_task(self.writer())
        try:
            await self._serve()
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("socket %s crashed", self.session_id)
            self.close(1011, "internal_error")  # the server's own bug: counted and logged
        finally:
            if self.state != "CLOSED":
                self.state = "CLOSED"  # the peer went away (peer_close): no close frame of ours
                self._release()
                self.outbox.put_nowait(None)
            for task in self.tasks:
                task.cancel()
            try:
                await asyncio.wait_for(writer, self.s.shutdown_grace + 1.0)
            except TimeoutError:
                writer.cancel()
            self.server.sockets.discard(self)

    async def _serve(self) -> None:
        if self.server.stopping:
            self.close(1001, "going_away")
            return
        try:
            first = await asyncio.wait_for(self.ws.recv(), self.s.init_timeout)
        except TimeoutError:
            self.close(4408, "init_timeout")
            return
        self.last_seen = time.monotonic()
        frame = _parse(first)
        if frame is None or frame.get("type") != "connection_init":
            if self.has(Bug.CLOSE_1011_ON_BAD_FRAME):
                self.close(1011, "internal_error")
            else:
                self.close(4401, "init_required")
            return
        self.state = "INITIALISING"
        self.tasks.append(asyncio.create_task(self._initialise(frame)))
        async for message in self.ws:
            self.last_seen = time.monotonic()
            if self.state == "CLOSED":
                break
            self._received(message)

    def _received(self, message: str | bytes) -> None:
        """A frame after connection_init: buffered before READY, queued in READY (section 1)."""
        frame = _parse(message)
        if len(message) > self.s.max_frame_bytes:
            self.close(1009, "message_too_big")
            return
        if frame is not None and frame.get("type") == "connection_init":
            self.close(4429, "duplicate_init")  # nothing buffered is handled
            return
        if self.state == "INITIALISING":
            if self._early_reply(frame):
                return
            size = len(message)
            full = len(self.buffer) >= self.s.preready_buffer_frames
            if full or self.buffer_bytes + size > self.s.preready_buffer_bytes:
                self.close(4429, "preready_buffer_full")
                return
            self.buffer.append(message)
            self.buffer_bytes += size
            return
        self.inbox.append(message)
        self.inbox_ready.set()

    def _early_reply(self, frame: dict[str, Any] | None) -> bool:
        """The ack-before-READY bugs: a pipelined frame answered while still INITIALISING."""
        kind = None if frame is None else frame.get("type")
        if self.has(Bug.ACK_BEFORE_READY) and kind == "ack":
            self.push({"type": "error", "code": "not_ready", "detail": "the connection is not ready"})
            return True
        if self.has(Bug.ACK_BEFORE_READY_ECHO):
            reply: dict[str, Any] = {"type": "error", "code": "not_ready", "detail": "the connection is not ready"}
            if frame is not None and isinstance(frame.get("request_id"), str):
                reply["request_id"] = frame["request_id"]
            self.push(reply)
            return True
        return False

    async def _initialise(self, frame: dict[str, Any]) -> None:
        """INITIALISING: the token, the limits, the context; then READY, then connection_ack, then
        the buffered frames (section 1: READY comes before the ack)."""
        resume = frame.get("resume")
        resume_seq: int | None = None
        if self.has(Bug.CONNECTION_ACK_BEFORE_AUTH):
            self.push({"type": "connection_ack", "session_id": self.session_id, "context_id": "pending",
                       "epoch": 1, "heartbeat_ms": int(self.s.heartbeat_interval * 1000), "recovered": False,
                       "last_seq": 0})
        try:
            if resume is not None:
                last = resume.get("last_seq") if isinstance(resume, dict) else None
                if isinstance(last, bool) or not isinstance(last, int) or not 0 <= last <= SEQ_MAX:
                    raise AuthError("token_malformed")  # a connection_init that violates the schema
                resume_seq = last
            if "token" not in frame:
                raise AuthError("token_missing")
            self.user, self.account = verify_token(frame["token"], self.s, self.server.bugs)
        except AuthError as exc:
            self.close(exc.close_code, exc.code)  # buffered frames are discarded unhandled
            return
        srv = self.server
        users, accounts = srv.user_slots.get(self.user, 0), srv.account_slots.get(self.account, 0)
        if (users >= self.s.max_connections_per_user and not self.has(Bug.NO_USER_LIMIT)) or (
                accounts >= self.s.max_connections_per_account and not self.has(Bug.NO_ACCOUNT_LIMIT)):
            self.close(4429, "connection_limit")
            return
        srv.user_slots[self.user] = users + 1  # the slot is reserved as soon as the token is accepted
        srv.account_slots[self.account] = accounts + 1
        self.slot = True
        ctx, created = await srv.resolve_context(self.user, self.account)
        if self.state == "CLOSED":
            srv.detach(ctx, self)
            return
        self.ctx = ctx
        if resume_seq is not None:
            srv.ack(ctx, resume_seq)  # a resume first acks every event through last_seq
        if self.has(Bug.HANDLE_BEFORE_READY):
            for message in self.buffer:
                await self._handle(message)
            self.buffer.clear()
        self.state = "READY"  # auth_ok: READY first...
        self.last_seen = time.monotonic()  # silence is counted from READY
        if not self.has(Bug.CONNECTION_ACK_BEFORE_AUTH):
            self.push({"type": "connection_ack", "session_id": self.session_id, "context_id": ctx.context_id,
                       "epoch": ctx.epoch, "heartbeat_ms": int(self.s.heartbeat_interval * 1000),
                       "recovered": resume_seq is not None and not created, "last_seq": ctx.seq})
        srv.attach(ctx, self, resume_seq)  # ...then the ack, then redelivery and the buffered frames
        self.inbox.extendleft(reversed(self.buffer))
        self.buffer.clear()
        self.inbox_ready.set()
        self.tasks.append(asyncio.create_task(self._worker()))
        self.tasks.append(asyncio.create_task(self._heartbeat()))

    async def _worker(self) -> None:
        """READY: frames handled one at a time, in arrival order."""
        while self.state == "READY":
            while self.inbox and self.state == "READY":
                await self._handle(self.inbox.popleft())
            self.inbox_ready.clear()
            await self.inbox_ready.wait()

    async def _handle(self, message: str | bytes) -> None:
        frame = _parse(message)
        reply: dict[str, Any] | None
        kind = None if frame is None else frame.get("type")
        if frame is None or not isinstance(kind, str):
            reply = None
        elif kind == "ack":
            seq = frame.get("seq")
            if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= SEQ_MAX:
                reply = None
            else:
                assert self.ctx is not None
                self.server.ack(self.ctx, seq)
                return
        elif kind == "run.start":
            reply = self.server.start_run(self, frame)
        elif kind == "run.cancel":
            reply = self.server.cancel_run(self, frame)
            if reply is None:
                return
        else:
            reply = None
        if reply is None:
            self._invalid(kind)
            return
        self.push(reply)

    def _invalid(self, kind: Any) -> None:
        """A malformed frame: error invalid_message, and past error_budget 4400 (section 1)."""
        if self.has(Bug.CLOSE_1011_ON_BAD_FRAME):
            self.close(1011, "internal_error")
            return
        if self.errors >= self.s.error_budget:
            self.close(4400, "invalid_message")
            return
        self.errors += 1
        what = "unknown frame type" if isinstance(kind, str) else "type: a string is required"
        if kind in ("ack", "run.start", "run.cancel"):
            what = f"{kind}: a field violates the schema"
        self.push({"type": "error", "code": "invalid_message", "detail": what})

    async def _heartbeat(self) -> None:
        """Section 6: a ping every heartbeat_interval; two silent intervals close 4408."""
        interval = self.s.heartbeat_interval
        while self.state == "READY":
            await asyncio.sleep(interval)
            if self.state != "READY":
                return
            if self.ctx is not None:
                self.ctx.last_activity = time.monotonic()  # the keep-alive of an attached context
            if time.monotonic() - self.last_seen >= 2 * interval:
                if self.has(Bug.HEARTBEAT_SUPPRESSED):
                    continue
                self.close(4408, "heartbeat_timeout")
                return
            try:
                pong = await self.ws.ping()
            except ConnectionClosed:
                return
            asyncio.ensure_future(pong).add_done_callback(self._pong)

    def _pong(self, _: Any) -> None:
        self.last_seen = time.monotonic()


def _parse(message: str | bytes) -> dict[str, Any] | None:
    """One JSON object with a string ``type``, or None (bad JSON, not UTF-8, too deep, no type)."""
    try:
        text = message.decode("utf-8") if isinstance(message, bytes) else message
        value = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        return None
    return value


# -- serving -----------------------------------------------------------------------------------------------


async def serve_async(port: int, settings: Settings, bugs: frozenset[Bug] = frozenset(), host: str = "127.0.0.1",
                      stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT in the main thread), then shut down: every
    socket is closed ``1001 going_away`` within ``shutdown_grace`` (section 6)."""
    server = Server(settings, bugs)
    stop = stop or asyncio.Event()

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/v1/ws" and request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        return server.http(request)

    async def handler(ws: ServerConnection) -> None:
        await Session(server, ws).run()

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    async with ws_serve(handler, host, port, process_request=process_request, ping_interval=None,
                        max_size=4 * settings.max_frame_bytes, close_timeout=1.0, compression=None,
                        server_header=None) as ws_server:
        await stop.wait()
        server.stopping = True
        for session in list(server.sockets):
            session.close(1001, "going_away")
        deadline = time.monotonic() + settings.shutdown_grace
        while server.sockets and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ws_server.close()


def serve(port: int, settings: Settings, bugs: frozenset[Bug] = frozenset(), host: str = "127.0.0.1") -> None:
    """Run the server in this thread until SIGTERM/SIGINT (a child process's entry point)."""
    asyncio.run(serve_async(port, settings, bugs, host))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m independent.server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=os.environ.get("PIPEPROOF_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PIPEPROOF_PORT", "8765")))
    parser.add_argument("--bugs", default="", help="comma-separated bug switches (independent/bugs.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    settings = Settings.from_env(os.environ)
    serve(args.port, settings, parse(args.bugs), args.host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
