"""``pipeproof trace-check``: a JSONL audit log replayed against the model (DESIGN.md; PROTOCOL 1-5).

Each line is one transition of one machine instance (impl/audit.py):
``{"ts","machine","id","user","context_id","event","from","to","vars","detail"}``. The checker

* replays every instance ``(machine, id)`` through its declared machine: the line's event must be
  enabled in the instance's current configuration (guards evaluated on the known variables and
  the inputs logged under ``detail.inputs``), lead to ``to``, and leave ``vars`` as the model
  computes them;
* adopts an instance whose first line does not leave the machine's initial state (a window of a
  long log): it starts at the line's ``from`` with its variables unknown, the first line is
  checked structurally (such an edge exists), and the variables are taken from it from then on;
* checks what only the whole log shows: one live context per user at a time (section 3), each
  run's event kinds well ordered (section 4, ``well_ordered``), every ``deliver`` on a socket
  matching a ``send`` of that attempt in the socket's own context (no cross-user read), closes
  that are rows of the close-code table and never 1011, and urgency: a delivery deadline the log
  shows as due (``tick`` reached it) is acted upon within ``urgency`` seconds.

The first line the model does not allow is reported as a :class:`~.errors.Violation` with the
line number, the instance's earlier lines and the events allowed from its state. Unreadable input
raises :class:`~.errors.TraceUnreadable` (exit code 2).
"""

from __future__ import annotations

import enum
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeproof.model.connection import CONNECTION, HANDLE_EVENTS, TIMEOUT_EVENTS
from pipeproof.model.context import context_machine
from pipeproof.model.delivery import delivery_machine
from pipeproof.model.invariants import well_ordered
from pipeproof.model.run import AGENT_EVENTS, run_machine
from pipeproof.model.spec import Config, Machine, Transition
from pipeproof.protocol import CloseCode, CloseReason

from .errors import TraceUnreadable, Violation

REQUIRED = ("machine", "id", "event", "from", "to")

@dataclass(frozen=True)
class ModelParams:
    """The server's declared bounds, as its machines are parametrised (defaults: the protocol's)."""

    buffer_max: int = 32
    max_attempts: int = 5
    max_connections_per_user: int = 8
    max_steps: int = 64
    error_budget: int = 10

    def machines(self) -> dict[str, Machine]:
        # Delivery runs at ack_timeout=1, resume_window=1: one model tick is "the deadline at hand
        # passed" (pipeproof/core/delivery.py), which is how any server maps wall-clock time onto the model.
        return {
            "connection": CONNECTION.with_params(buffer_max=self.buffer_max, error_budget=self.error_budget),
            "context": context_machine(self.max_connections_per_user),
            "delivery": delivery_machine(self.max_attempts, 1, 1),
            "run": run_machine(self.max_steps),
        }


@dataclass
class Line:
    no: int
    raw: dict[str, Any]

    @property
    def machine(self) -> str:
        return str(self.raw["machine"])

    @property
    def id(self) -> str:
        return str(self.raw["id"])

    @property
    def event(self) -> str:
        return str(self.raw["event"])

    @property
    def detail(self) -> dict[str, Any]:
        d = self.raw.get("detail")
        return d if isinstance(d, dict) else {}

    @property
    def ts(self) -> float:
        ts = self.raw.get("ts")
        return float(ts) if isinstance(ts, int | float) else 0.0

    def show(self) -> str:
        vs = self.raw.get("vars") or {}
        shown = ",".join(f"{k}={v}" for k, v in vs.items()) if isinstance(vs, dict) else ""
        return (f"line {self.no}: {self.machine}[{self.id}] {self.event}: {self.raw['from']} -> {self.raw['to']}"
                + (f" ({shown})" if shown else ""))


@dataclass
class Instance:
    machine: Machine
    state: enum.Enum
    values: tuple[Any, ...] | None  # None: adopted mid-stream, variables not yet seen
    lines: list[Line] = field(default_factory=list)
    adopted: bool = False

    @property
    def config(self) -> Config | None:
        return None if self.values is None else (self.state, self.values)


@dataclass
class TraceReport:
    lines: int = 0
    instances: dict[str, int] = field(default_factory=dict)  # machine -> instances seen
    adopted: int = 0
    violation: Violation | None = None
    line_no: int | None = None

    @property
    def ok(self) -> bool:
        return self.violation is None


def read_lines(source: Iterable[str]) -> Iterator[Line]:
    """Parse JSONL; blank lines are skipped; anything else unreadable raises TraceUnreadable."""
    for no, text in enumerate(source, start=1):
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceUnreadable(no, f"not JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(raw, dict):
            raise TraceUnreadable(no, f"a line must be a JSON object, not {type(raw).__name__}")
        missing = [k for k in REQUIRED if not isinstance(raw.get(k), str)]
        if missing:
            raise TraceUnreadable(no, f"missing or non-string field(s): {', '.join(missing)}")
        if "vars" in raw and not isinstance(raw["vars"], dict):
            raise TraceUnreadable(no, "field 'vars' must be an object")
        yield Line(no, raw)


def _property(machine: Machine, event: str, source: str, target: str) -> str:
    """The property a refused line breaks: the invariants the model attaches to that edge, else
    the machine's main property (docs/conformance.md, "which property a line breaks")."""
    name = machine.name
    if name == "connection":
        if event in HANDLE_EVENTS:
            return "no_message_before_ready"
        if event in TIMEOUT_EVENTS:
            return "timeouts_close_the_socket"
        return {"send_ack": "ready_before_ack", "deliver": "ready_before_ack"}.get(event, "model_transition")
    if name == "delivery":
        if source in ("ACKED", "ESCALATED"):
            return "acked_never_resent" if event == "send" else "monotonic_event_state"
        if event in ("send", "send_failed"):
            return "attempts_bounded" if target in ("SENT", "PENDING") else "every_event_acked_or_escalated"
        return "every_event_acked_or_escalated"
    if name == "context":
        if event == "create":
            return "one_context_per_user"
        if event == "attach" and source == "EXPIRED":
            return "expired_context_never_reused"
        return "connection_limits_respected" if event in ("attach", "reject_limit") else "model_transition"
    if name == "run":
        if event == "agent_started" and source == "ACCEPTED":
            return "cancel_before_start_wins"
        return "run_events_well_ordered"
    return "model_transition"


def allowed_from(machine: Machine, state: enum.Enum, values: tuple[Any, ...] | None,
                 inputs: Mapping[str, Any]) -> list[str]:
    """The events the model allows from a configuration (all edges when the variables are unknown)."""
    out: list[str] = []
    for t in machine.transitions_from(state):
        if values is not None and not _guard_holds(machine, (state, values), t, inputs):
            continue
        out.append(f"{t.event} -> {t.target.name}" + (f" [{t.emits}]" if t.emits else ""))
    return out


def _input_choices(machine: Machine, inputs: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    # An input the log did not record may have had either value: the line is allowed if some value works.
    missing = [n for n in machine.inputs if n not in inputs]
    for combo in itertools.product((False, True), repeat=len(missing)):
        yield {**inputs, **dict(zip(missing, combo, strict=True))}


def _guard_holds(machine: Machine, config: Config, t: Transition, inputs: Mapping[str, Any]) -> bool:
    return any(machine.evaluate_guard(config, t, i) for i in _input_choices(machine, inputs))


class TraceChecker:
    """Feed lines one at a time (:meth:`feed`), then :meth:`finish`; or use :func:`check_lines`."""

    def __init__(self, params: ModelParams | None = None, *, window: bool = False, urgency: float = 2.0) -> None:
        self.params = params or ModelParams()
        self.machines = self.params.machines()
        self.window = window
        self.urgency = urgency
        self.instances: dict[tuple[str, str], Instance] = {}
        self.report = TraceReport()
        self.live_contexts: dict[str, set[str]] = {}  # user -> LIVE context instances
        self.run_kinds: dict[str, list[str]] = {}
        self.sent: dict[tuple[str, int], set[int]] = {}  # (context_id, seq) -> attempts sent
        self.delivers: list[tuple[Line, str, int, int]] = []  # (line, context_id, seq, attempt)
        self.due: dict[tuple[str, str], Line] = {}  # delivery instances whose deadline is due
        self.last_ts = 0.0

    # -- per line ----------------------------------------------------------------------------------
    def feed(self, line: Line) -> None:
        self.report.lines += 1
        machine = self.machines.get(line.machine)
        if machine is None:
            raise TraceUnreadable(line.no, f"unknown machine {line.machine!r}")
        try:
            source = machine.states[line.raw["from"]]
            target = machine.states[line.raw["to"]]
        except KeyError as exc:
            raise TraceUnreadable(line.no, f"unknown {line.machine} state {exc.args[0]!r}") from None
        self._check_urgency(line)
        key = (line.machine, line.id)
        inst = self.instances.get(key)
        if inst is None:
            inst = self._new_instance(machine, line, source)
            self.instances[key] = inst
            self.report.instances[line.machine] = self.report.instances.get(line.machine, 0) + 1
        self._step(inst, line, source, target)
        inst.lines.append(line)
        self.last_ts = max(self.last_ts, line.ts)
        self._cross(inst, line)

    def _new_instance(self, machine: Machine, line: Line, source: enum.Enum) -> Instance:
        if source is machine.initial and not self.window:
            return Instance(machine, machine.initial, machine.initial_config()[1])
        self.report.adopted += 1
        return Instance(machine, source, None, adopted=True)

    def _fail(self, prop: str, line: Line, inst: Instance | None, why: str, allowed: Sequence[str]) -> Violation:
        prior = [ln.show() for ln in inst.lines[-6:]] if inst is not None else []
        v = Violation(prop, why, allowed, where=line.show(), context=prior)
        self.report.violation = v
        self.report.line_no = line.no
        return v

    def _step(self, inst: Instance, line: Line, source: enum.Enum, target: enum.Enum) -> None:
        m = inst.machine
        inputs = line.detail.get("inputs") or {}
        if not isinstance(inputs, dict):
            raise TraceUnreadable(line.no, "detail.inputs must be an object")
        if line.event not in m.events:
            raise self._fail("model_transition", line, inst, f"event {line.event!r} is not declared by {m.name}",
                             allowed_from(m, inst.state, inst.values, inputs))
        if source is not inst.state:
            raise self._fail(_property(m, line.event, inst.state.name, target.name), line, inst,
                             f"line says from {source.name}, but the instance is in {inst.state.name}",
                             allowed_from(m, inst.state, inst.values, inputs))
        edges = [t for t in m.transitions_from(source, line.event) if t.target is target]
        logged = line.raw.get("vars") or {}
        if inst.values is None:
            # Adopted: the variables are unknown, so only the edge's existence can be checked.
            if not edges:
                raise self._fail(_property(m, line.event, source.name, target.name), line, inst,
                                 f"{line.event} does not lead from {source.name} to {target.name}",
                                 allowed_from(m, source, None, inputs))
            values = tuple(logged.get(n, v.initial) for n, v in zip(m.var_names, m.variables, strict=True))
            inst.state, inst.values = target, values
            return
        config = (inst.state, inst.values)
        results: list[tuple[Any, ...]] = []
        for t in edges:
            for i in _input_choices(m, inputs):
                if m.evaluate_guard(config, t, i):
                    results.append(m.apply(config, t, i)[1])
                    break
        if not results:
            raise self._fail(_property(m, line.event, source.name, target.name), line, inst,
                             f"{line.event} is not enabled in {m.describe(config)}"
                             + ("" if any(t.target is target for t in m.transitions_from(source, line.event))
                                else f" or does not lead to {target.name}"),
                             allowed_from(m, source, inst.values, inputs))
        matching = [r for r in results if all(logged.get(n, r[k]) == r[k] for k, n in enumerate(m.var_names))]
        if not matching:
            expect = ", ".join(f"{n}={v}" for n, v in zip(m.var_names, results[0], strict=True))
            raise self._fail(_property(m, line.event, source.name, target.name), line, inst,
                             f"vars {logged} after {line.event}, the model computes {expect}",
                             allowed_from(m, source, inst.values, inputs))
        inst.state, inst.values = target, matching[0]

    # -- cross-machine ---------------------------------------------------------------------------
    def _cross(self, inst: Instance, line: Line) -> None:
        m = inst.machine
        user = str(line.raw.get("user") or "")
        if m.name == "context":
            live = self.live_contexts.setdefault(user, set())
            if inst.state.name == "LIVE":
                live.add(line.id)
            else:
                live.discard(line.id)
            if len(live) > 1:
                raise self._fail("one_context_per_user", line, inst,
                                 f"user {user!r} has {len(live)} live contexts: {sorted(live)}",
                                 ["attach to the live context", "create only after it expired"])
        elif m.name == "run" and line.event in AGENT_EVENTS:
            kinds = self.run_kinds.setdefault(line.id, [])
            kinds.append(line.event)
            why = "" if inst.adopted else well_ordered(tuple(kinds))
            if why:
                raise self._fail("run_events_well_ordered", line, inst, f"run {line.id}: {why}", [])
        elif m.name == "delivery":
            ctx, _, seq = line.id.rpartition(":")
            if line.event == "send" and seq.isdigit():
                attempt = line.detail.get("attempt", (line.raw.get("vars") or {}).get("attempt"))
                if isinstance(attempt, int):
                    self.sent.setdefault((ctx, int(seq)), set()).add(attempt)
            self._track_due(inst, line)
        elif m.name == "connection":
            self._check_close(inst, line)
            if line.event == "deliver":
                dseq, dattempt = line.detail.get("seq"), line.detail.get("attempt")
                dctx = line.raw.get("context_id")
                if isinstance(dseq, int) and isinstance(dattempt, int) and isinstance(dctx, str):
                    self.delivers.append((line, dctx, dseq, dattempt))

    def _check_close(self, inst: Instance, line: Line) -> None:
        if line.raw["to"] != "CLOSED":
            return
        d = line.detail
        code, reason = d.get("code"), d.get("reason")
        closes = [t.close for t in inst.machine.transitions_from(inst.machine.states[line.raw["from"]], line.event)
                  if t.target.name == "CLOSED" and t.close is not None]
        if code is None:
            # No close recorded: fine for an edge that sends none (the peer left, a write failed);
            # an edge that sends one must say which, unless the model fixes it.
            fixed = [c.reason for c in closes if c.reason is not None]
            if not closes or not fixed:
                return
            code, reason = int(fixed[0].code), fixed[0].value
        if code == CloseCode.INTERNAL_ERROR:
            bug = CloseReason.INTERNAL_ERROR.describe()
            raise self._fail("no_1011", line, inst, f"the socket was closed with {bug} (a server bug)",
                             CloseReason.table())
        if not isinstance(code, int) or not isinstance(reason, str) or not CloseReason.documented(code, reason):
            raise self._fail("close_codes_documented", line, inst, f"close {code} {reason} is not in the table",
                             CloseReason.table())
        if not any(c.allows(code, reason) for c in closes):
            raise self._fail("close_codes_documented", line, inst,
                             f"{line.event} closed {code} {reason}: that edge sends "
                             + (" or ".join(str(c) for c in closes) if closes else "no close frame"),
                             allowed_from(inst.machine, inst.machine.states[line.raw["from"]], None, {}))

    def _track_due(self, inst: Instance, line: Line) -> None:
        key = ("delivery", line.id)
        self.due.pop(key, None)
        if inst.values is None or inst.state in inst.machine.terminal:
            return
        names = inst.machine.var_names
        v = dict(zip(names, inst.values, strict=True))
        p = inst.machine.params
        if (inst.state.name == "SENT" and v["waited"] >= p["ack_timeout"]) or (
            inst.state.name == "PENDING" and v["idle"] >= p["resume_window"]
        ):
            self.due[key] = line

    def _check_urgency(self, line: Line) -> None:
        # Model deadlines are urgent (model/delivery.py): once a tick made one due, the timeout (or
        # an ack) must follow; a log that runs on for `urgency` seconds without it shows a stuck event.
        for key, since in list(self.due.items()):
            if line.ts - since.ts > self.urgency:
                inst = self.instances[key]
                shown = inst.machine.describe(inst.config) if inst.config is not None else inst.state.name
                raise self._fail("every_event_acked_or_escalated", since, inst,
                                 f"event {key[1]} reached its deadline ({shown})"
                                 f" and nothing happened for {line.ts - since.ts:.2f}s (until line {line.no})",
                                 allowed_from(inst.machine, inst.state, inst.values, {}))

    def finish(self) -> TraceReport:
        if self.report.violation is not None:
            return self.report
        self._check_urgency(Line(self.report.lines + 1, {"ts": self.last_ts, "machine": "", "id": "",
                                                           "event": "end of log", "from": "", "to": ""}))
        for line, ctx, seq, attempt in self.delivers:
            attempts = self.sent.get((ctx, seq))
            known = ("delivery", f"{ctx}:{seq}") in self.instances
            if attempts is None and (self.window and not known):
                continue
            inst = self.instances.get(("delivery", f"{ctx}:{seq}"))
            if attempts is None or (attempt not in attempts and not (inst is not None and inst.adopted)):
                raise self._fail("no_cross_user_read", line, self.instances.get(("connection", line.id)),
                                 f"session {line.id} (context {ctx}) was written seq {seq} attempt {attempt}, "
                                 f"which its context's stream never sent (sent attempts: {sorted(attempts or [])})",
                                 ["deliver events of the session's own context only"])
        return self.report


def check_lines(lines: Iterable[Line], params: ModelParams | None = None, *, window: bool = False,
                urgency: float = 2.0) -> TraceReport:
    """Replay ``lines``; the report carries the first violation (``TraceUnreadable`` propagates)."""
    checker = TraceChecker(params, window=window, urgency=urgency)
    try:
        for line in lines:
            checker.feed(line)
        return checker.finish()
    except Violation:
        return checker.report


def check_file(path: Path, params: ModelParams | None = None, *, window: bool = False,
               urgency: float = 2.0) -> TraceReport:
    try:
        with path.open(encoding="utf-8") as f:
            return check_lines(read_lines(f), params, window=window, urgency=urgency)
    except UnicodeDecodeError as exc:
        raise TraceUnreadable(0, f"not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise TraceUnreadable(0, f"cannot read {path}: {exc.strerror}") from None


__all__ = ["Line", "ModelParams", "TraceChecker", "TraceReport", "allowed_from", "check_file",
           "check_lines", "read_lines"]
