"""The JSONL audit log: one line per state transition of every machine instance (DESIGN.md,
"trace-check"; PROTOCOL sections 1, 3, 5).

Line format (``pipeproof trace-check`` validates it against the model, so it is kept exactly)::

    {"ts": <unix float>, "machine": "connection"|"context"|"delivery"|"run",
     "id": "<session_id | context_id | context_id:seq | run_id>", "user": "<user or null>",
     "context_id": "<or null>", "event": "<model event>", "from": "<state>", "to": "<state>",
     "vars": {<the machine's variables after the transition>}, "detail": {<optional>}}

``detail`` carries what the model does not (close code and reason, the limit scope, the store
epoch...) and, under ``"inputs"``, the model inputs the event was fired with.

The bytes are exactly ``json.dumps(line, separators=(",", ":"), default=str)`` plus a newline;
``_encode_line`` builds them without the generic encoder for the shapes the server writes (the
log is on the hot path, about six lines per delivered event) and hands anything else to
``json.dumps``.

Durability contract. Lines are buffered in memory and written with one ``write`` per event-loop
turn, not one per line: the first line of a turn schedules :meth:`AuditWriter.flush` with
``loop.call_soon``. Without a running loop in the calling thread (CLI, sync tests, worker threads)
every line is written at once, as before. The socket sender calls :meth:`AuditWriter.flush` right
before it writes a data frame and does not write it when the flush raises, so no data frame
reaches a client before the lines of the transitions that produced it are in the OS; a ``kill -9``
can lose only lines of effects nobody outside saw. While the log is failing that holds for data
frames only: close frames are still written (a socket must be able to close) and the store keeps
changing, so a process killed during a failure episode loses the lines it held.

Failure contract (fail-safe). A transition that has happened in its machine is never undone
nor interrupted because its line cannot be written: :meth:`AuditWriter.record` and
:meth:`TracedMachine.fire` do not raise on a failed write. The line is kept, behind the lines
already held, in order, and every later flush retries them first (the loop-scheduled flush of each
turn that records a line, :meth:`AuditWriter.flush` called by anyone, the readiness check). The
failure is surfaced where acting on it is safe:

* :meth:`AuditWriter.flush` raises :class:`~pipeproof.errors.AuditWriteFailed` (``OSError``
  chained), so a caller about to make an effect visible (the socket sender, before a data frame)
  does not make it visible while the lines behind it are not in the log;
* :attr:`AuditWriter.failing` is True from a failed write until a write succeeds (readiness check
  ``audit_log``: ``/readyz`` answers 503 and new sockets are refused while it fails);
* the first failure of an episode is logged once at ERROR with its traceback, and the first
  write that succeeds after it once at WARNING (not one line per loop turn or per record);
* the backlog is bounded: while failing, a :meth:`AuditWriter.record` that finds
  :attr:`AuditWriter.BACKLOG_MAX` lines held retries the write once and, if it still fails,
  raises :class:`~pipeproof.errors.AuditWriteFailed` and drops that line. This is the last
  resort, chosen over unbounded memory: the log then has a gap trace-check reports, and the caller
  is interrupted half-way exactly as the fail-safe policy otherwise avoids.

:class:`AuditWriter` is the only place that writes the log. :class:`TracedMachine` is the only way
the server fires a model event: it calls :meth:`pipeproof.model.spec.Runner.fire` and hands the
returned transition to the writer, so the log cannot miss a transition the server made.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import IO, Any, Literal

from pipeproof.errors import AuditWriteFailed, IllegalTransition
from pipeproof.model.expr import Value
from pipeproof.model.spec import Machine, Runner, Transition

log = logging.getLogger("pipeproof.audit")

MachineName = Literal["connection", "context", "delivery", "run"]

TransitionListener = Callable[["TracedMachine", Transition], None]
"""Called after every successful fire (metrics gauges); must not raise."""

# The reference encoding every line must match byte for byte (built once: json.dumps with
# non-default arguments builds a new encoder per call).
_json_line = json.JSONEncoder(separators=(",", ":"), default=str).encode

# A text-mode file turns "\n" into os.linesep; the owned log is written in binary, so it does the
# same itself (JSON text never holds a raw newline, only the line ends are translated).
_EOL = os.linesep

_CACHE_MAX = 4096
# Encoded names (machines, events, states, ids, var and detail keys) recur on every line; a dict
# hit is cheaper than escaping again. Cleared when full so unique ids cannot grow it without bound.
_names: dict[object, str] = {None: "null"}
_keys: dict[object, str] = {}


class _Unusual(Exception):
    """A value the fast encoder does not handle; the whole line goes through ``json.dumps``."""


def _name_miss(value: object) -> str:
    if type(value) is not str:
        raise _Unusual
    encoded = encode_basestring_ascii(value)
    if len(_names) >= _CACHE_MAX:
        _names.clear()
        _names[None] = "null"
    _names[value] = encoded
    return encoded


def _key_miss(key: object) -> str:
    if type(key) is not str:
        # json turns int/float/bool/None keys into strings; rare enough to leave to it.
        raise _Unusual
    encoded = encode_basestring_ascii(key) + ":"
    if len(_keys) >= _CACHE_MAX:
        _keys.clear()
    _keys[key] = encoded
    return encoded


def _value(value: Any) -> str:
    # Exact types only: json treats subclasses in ways this does not mirror (the fallback does).
    kind = type(value)
    if kind is str:
        return encode_basestring_ascii(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)  # what json's int.__repr__ gives, for an exact int
    if value is None:
        return "null"
    if kind is float:
        if value - value == 0.0:
            return repr(value)  # json's own float encoding, for a finite exact float
        raise _Unusual  # NaN and infinities: json spells them its own way
    if kind is dict:
        return _object(value)
    if kind is list or kind is tuple:
        return "[" + ",".join([_value(item) for item in value]) + "]"
    raise _Unusual


def _object(obj: dict[Any, Any]) -> str:
    if not obj:
        return "{}"
    keys = _keys
    out = ""
    # One f-string append per item: cheaper than a list and a join for the few items a line has.
    for key, value in obj.items():
        kind = type(value)
        if kind is int:
            out += f",{keys.get(key) or _key_miss(key)}{value}"
        elif kind is bool:
            out += f",{keys.get(key) or _key_miss(key)}{'true' if value else 'false'}"
        else:
            out += f",{keys.get(key) or _key_miss(key)}{_value(value)}"
    return "{" + out[1:] + "}"


def _encode_line(
    ts: float,
    machine: str,
    instance_id: str,
    user: str | None,
    context_id: str | None,
    event: str,
    source: str,
    target: str,
    values: dict[str, Any],
    detail: dict[str, Any],
) -> str:
    """One audit line with its newline: the bytes ``json.dumps(line, separators=(",", ":"),
    default=str)`` gives, built from cached names and an f-string; anything unusual (a non-finite
    or non-float ``ts``, a value type outside str/int/bool/None/finite float/dict/list/tuple, a
    non-str key, circular or very deep nesting) falls back to that very call."""
    try:
        if type(ts) is not float or ts - ts != 0.0:
            raise _Unusual
        names = _names
        return (
            f'{{"ts":{ts!r},"machine":{names.get(machine) or _name_miss(machine)},'
            f'"id":{names.get(instance_id) or _name_miss(instance_id)},'
            f'"user":{names.get(user) or _name_miss(user)},'
            f'"context_id":{names.get(context_id) or _name_miss(context_id)},'
            f'"event":{names.get(event) or _name_miss(event)},'
            f'"from":{names.get(source) or _name_miss(source)},"to":{names.get(target) or _name_miss(target)},'
            f'"vars":{_object(values)},"detail":{_object(detail)}}}\n'
        )
    except (_Unusual, TypeError, RecursionError):
        # TypeError: an unhashable name; RecursionError: nesting json reports (or refuses) itself.
        line = {
            "ts": ts,
            "machine": machine,
            "id": instance_id,
            "user": user,
            "context_id": context_id,
            "event": event,
            "from": source,
            "to": target,
            "vars": values,
            "detail": detail,
        }
        return _json_line(line) + "\n"


class AuditWriter:
    """Writes audit lines to a file (appended), stdout, a caller's text stream, or nowhere (``"off"``).

    Lines are buffered and written once per event-loop turn (see the module docstring): the first
    :meth:`record` of a turn schedules :meth:`flush` with ``loop.call_soon``; without a running loop
    in the calling thread, :meth:`record` writes at once. The buffer is also written inline when it
    holds more than :attr:`MAX_LINES` lines or :attr:`MAX_BYTES` characters, so memory stays bounded
    when a turn records a burst. :meth:`flush` writes everything buffered with one write; callers
    that are about to let the outside world see an effect (the socket sender, before a frame) call it
    so the log is in the OS first.

    A failed write never makes :meth:`record` raise (the transition it describes has happened):
    the line is kept, in order, behind the lines already held, and :attr:`failing` turns True.
    While failing, lines are buffered and retried once per loop turn by the scheduled flush (the
    ``MAX_LINES`` / ``MAX_BYTES`` inline flush is skipped: a write per record would retry the whole
    backlog per record); without a running loop each :meth:`record` retries at once. :meth:`flush`
    always retries and raises :class:`~pipeproof.errors.AuditWriteFailed` (``OSError`` chained)
    while the write fails; the first write that succeeds writes everything held, in order, and
    clears :attr:`failing`. An episode is logged once at ERROR when it starts (with the traceback)
    and once at WARNING when it ends. Last resort: while failing with :attr:`BACKLOG_MAX` lines
    held, :meth:`record` retries once and, if that fails, raises
    :class:`~pipeproof.errors.AuditWriteFailed` without keeping its line, so memory stays bounded.

    The log file the writer opens itself is written unbuffered in binary, so after a failed or
    partial write it knows exactly which bytes reached the OS and retries only the rest; those held
    bytes are retried on their own before the lines buffered since (a retry while failing is one
    write attempt, not a copy of the whole backlog), so the flush that ends an episode may take two
    writes. With stdout or a caller's text stream, lines are kept when ``write`` raises; once
    ``write`` returned they belong to the stream, whose own buffer retries them if its ``flush``
    fails (the backlog cap does not count them).

    Thread-safe: one lock covers appending a line, and swapping out and writing the buffer, so
    concurrent writers never interleave or reorder bytes.
    """

    MAX_LINES = 512
    MAX_BYTES = 256 * 1024
    BACKLOG_MAX = 100_000
    """Lines held while failing beyond which :meth:`record` raises and drops its line (last resort:
    about 30 MB of typical lines; memory stays bounded however long the disk stays full)."""

    def __init__(self, target: Literal["stdout", "off"] | Path | IO[str]) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._raw: io.FileIO | None = None
        self._stream: IO[str] | None = None
        if isinstance(target, Path):
            target.parent.mkdir(parents=True, exist_ok=True)
            self._raw = target.open("ab", buffering=0)
            self._label = str(target)
        elif target == "stdout":
            self._stream = sys.stdout
            self._label = "stdout"
        elif target == "off":
            self._label = "off"
        elif isinstance(target, str):
            raise ValueError(f"audit target must be 'stdout', 'off', a Path or a text stream, not {target!r}")
        else:
            self._stream = target
            self._label = str(getattr(target, "name", "") or "stream")
        self._on = self._raw is not None or self._stream is not None
        self._lines: list[str] = []
        self._size = 0
        # Bytes of a failed flush of the owned file not yet in the OS, written before any buffered
        # line, and how many line ends they hold (the backlog the cap counts, kept without a scan).
        self._head = b""
        self._head_lines = 0
        self._failed = False
        # The loop a flush is scheduled on (None: none pending), so a turn schedules one, not one per line.
        self._scheduled: asyncio.AbstractEventLoop | None = None

    @property
    def enabled(self) -> bool:
        return self._on

    @property
    def failing(self) -> bool:
        """True from a failed write until a write succeeds (readiness check ``audit_log``)."""
        return self._failed

    @property
    def pending(self) -> int:
        """Lines held for the next flush (buffered, or of a failed flush not yet in the OS)."""
        return self._head_lines + len(self._lines)

    def record(
        self,
        machine: str,
        instance_id: str,
        transition: Transition,
        values: Mapping[str, Value],
        *,
        user: str | None,
        context_id: str | None,
        detail: Mapping[str, Any] | None = None,
        ts: float | None = None,
    ) -> dict[str, Any]:
        """Buffer one line for ``transition`` and return the record (tests read it back).

        Does not raise because the log cannot be written: the line is kept for the next flush and
        :attr:`failing` says so. Raises :class:`~pipeproof.errors.AuditWriteFailed` only as the
        last resort, when :attr:`BACKLOG_MAX` lines are held and a retry fails (the line is then
        dropped).
        """
        when = time.time() if ts is None else ts
        # ``_name_`` is what Enum's ``name`` property returns, read without the property's cost.
        event, source, target = transition.event, transition.source._name_, transition.target._name_
        copied = dict(values)
        extra = dict(detail) if detail else {}
        if self._on:
            self._append(
                _encode_line(when, machine, instance_id, user, context_id, event, source, target, copied, extra)
            )
        return {
            "ts": when,
            "machine": machine,
            "id": instance_id,
            "user": user,
            "context_id": context_id,
            "event": event,
            "from": source,
            "to": target,
            "vars": copied,
            "detail": extra,
        }

    def _record_owned(
        self,
        machine: str,
        instance_id: str,
        transition: Transition,
        values: Mapping[str, Value],
        user: str | None,
        context_id: str | None,
        detail: Mapping[str, Any] | None,
    ) -> None:
        """:meth:`record` for :class:`TracedMachine`: ``values`` and ``detail`` are fresh and encoded
        at once, so neither is copied, and no record is built for a caller that never reads it."""
        if not self._on:
            return
        # The encoder reads exact dicts (what record()'s copies are); anything else is copied.
        copied: dict[str, Any] = values if type(values) is dict else dict(values)
        extra: dict[str, Any] = {} if not detail else detail if type(detail) is dict else dict(detail)
        self._append(
            _encode_line(
                time.time(),
                machine,
                instance_id,
                user,
                context_id,
                transition.event,
                transition.source._name_,
                transition.target._name_,
                copied,
                extra,
            )
        )

    def _append(self, text: str) -> None:
        with self._lock:
            lines = self._lines
            if self._failed and self._head_lines + len(lines) >= self.BACKLOG_MAX:
                full = True
            else:
                full = False
                lines.append(text)
                self._size += len(text)
                # While failing the backlog is retried once per turn, not per record: an inline
                # retry per line would cost a write attempt (a join, for a stream) per transition.
                now = not self._failed and (len(lines) > self.MAX_LINES or self._size > self.MAX_BYTES)
        if full:
            self._append_over_cap(text)
            return
        if now:
            self._flush_quietly()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._flush_quietly()
            return
        if loop is not self._scheduled:
            self._scheduled = loop
            loop.call_soon(self._flush_soon, loop)

    def _append_over_cap(self, text: str) -> None:
        """The last resort (module docstring): retry once, then raise and drop ``text``."""
        try:
            self.flush()
        except AuditWriteFailed as exc:
            raise AuditWriteFailed(
                self._label,
                exc.pending,
                f"{exc.detail}; backlog full ({self.BACKLOG_MAX} lines held), this line was dropped",
            ) from exc.__cause__
        self._append(text)  # written: the backlog is empty again

    def _flush_quietly(self) -> None:
        # The transition behind the line has happened; a failure is kept (failing, the lines
        # held), logged once per episode by flush, and raised to callers of flush, not here.
        with contextlib.suppress(AuditWriteFailed):
            self.flush()

    def _flush_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._scheduled is loop:
            self._scheduled = None
        self._flush_quietly()

    def flush(self) -> None:
        """Write every line held with one write (and flush a text stream).

        Nearly free when nothing is held. Raises :class:`~pipeproof.errors.AuditWriteFailed`
        (``OSError`` chained) when the write fails; the unwritten lines stay held, in order, and
        the next flush retries them first. The write that fails first after a success is logged
        at ERROR with its traceback, the write that succeeds first after a failure at WARNING.
        """
        if not self._lines and not self._failed:
            return
        error: AuditWriteFailed | None = None
        with self._lock:
            was_failing = self._failed
            try:
                if self._raw is not None:
                    self._flush_raw(self._raw)
                elif self._stream is not None:
                    self._flush_stream(self._stream)
            except AuditWriteFailed as exc:
                error = exc
            now_failing = self._failed
        # Logged outside the lock: a handler must not be able to stall every transition.
        if error is not None:
            if not was_failing:
                log.error(
                    "audit log %s: write failed; transitions go on with their lines held in order and "
                    "retried, data frames are not sent and readiness fails until a write succeeds",
                    self._label,
                    exc_info=error,
                )
            raise error
        if was_failing and not now_failing:
            log.warning("audit log %s writable again: the lines held were written", self._label)

    def _flush_raw(self, raw: io.FileIO) -> None:
        if self._head:
            # Held bytes first, on their own: while the disk stays full a retry is one failed
            # write, and the lines buffered since stay as they are (not copied behind the bytes).
            self._write_head(raw)
        if not self._lines:
            self._failed = False
            return
        text = "".join(self._lines)
        if _EOL != "\n":
            text = text.replace("\n", _EOL)
        self._head = text.encode("utf-8")
        self._head_lines = len(self._lines)
        self._lines = []
        self._size = 0
        self._write_head(raw)
        self._failed = False

    def _write_head(self, raw: io.FileIO) -> None:
        """Write ``_head`` to the OS; on failure keep exactly the bytes that did not reach it."""
        data = self._head
        done = 0
        try:
            with memoryview(data) as view:
                while done < len(data):
                    # FileIO.write is one os.write: it reports how much reached the OS, or raises
                    # having written nothing, so a retry never repeats or skips a byte.
                    written = raw.write(view[done:])
                    if not written:
                        raise OSError(f"the audit log accepted none of {len(data) - done} bytes")
                    done += written
        except OSError as exc:
            if done:
                self._head_lines -= data.count(b"\n", 0, done)
                self._head = data[done:]
            self._failed = True
            raise AuditWriteFailed(self._label, self.pending, str(exc)) from exc
        self._head = b""
        self._head_lines = 0

    def _flush_stream(self, stream: IO[str]) -> None:
        if self._lines:
            try:
                stream.write("".join(self._lines))
            except OSError as exc:
                self._failed = True
                raise AuditWriteFailed(self._label, len(self._lines), str(exc)) from exc
            self._lines = []
            self._size = 0
        try:
            stream.flush()
        except OSError as exc:
            self._failed = True
            raise AuditWriteFailed(self._label, 0, f"{exc} (the stream holds the lines and retries them)") from exc
        self._failed = False

    def close(self) -> None:
        """Flush, then close the file the writer opened (stdout and a caller's stream stay open).

        If the final flush fails, :class:`~pipeproof.errors.AuditWriteFailed` is raised and the
        file is closed anyway: shutdown cannot wait for the disk, and the error says how many lines
        were not written.
        """
        try:
            self.flush()
        finally:
            with self._lock:
                if self._raw is not None:
                    self._raw.close()
                self._raw = None
                self._stream = None
                self._on = False
                self._lines = []
                self._size = 0
                self._head = b""
                self._head_lines = 0
                self._failed = False


class TracedMachine:
    """One live machine instance (a socket, a context...) whose every transition is audited.

    ``fire`` raises :class:`~pipeproof.errors.IllegalTransition` exactly like ``Runner.fire``;
    nothing is written for a refused event (it did not happen), and the caller decides the
    documented close code.
    """

    def __init__(
        self,
        machine: Machine,
        name: MachineName,
        instance_id: str,
        audit: AuditWriter,
        *,
        user: str | None = None,
        context_id: str | None = None,
        listener: TransitionListener | None = None,
        runner: Runner | None = None,
    ) -> None:
        self.machine = machine
        self.name = name
        self.instance_id = instance_id
        # ``runner``: a Runner restored at a stored configuration, else a fresh one. The
        # declaration engine fires the machine's compiled transitions (~50x cheaper per transition
        # than python-statemachine, which costs ~0.5 ms per instance and fire) and refuses exactly
        # what the declaration refuses, so the audit log is the same line for line.
        self.runner = runner if runner is not None else Runner(machine, engine="declaration")
        self.audit = audit
        self.user = user
        self.context_id = context_id
        self._listener = listener

    @property
    def state(self) -> Any:
        return self.runner.state

    @property
    def values(self) -> Mapping[str, Value]:
        return self.runner.values

    def can(self, event: str, **inputs: Value) -> bool:
        return self.runner.can(event, **inputs)

    def fire(self, event: str, detail: Mapping[str, Any] | None = None, **inputs: Value) -> Transition:
        """Fire ``event`` through the Runner and record the transition.

        A log that cannot be written does not make this raise (the transition has happened; its
        line is held for the next flush, see :attr:`AuditWriter.failing`), except as the
        writer's last resort: :class:`~pipeproof.errors.AuditWriteFailed` when its backlog is
        full, the transition made and its line dropped.
        """
        transition = self.runner.fire(event, **inputs)
        full = detail
        if inputs:
            # The model's inputs (e.g. account_full) are part of the step: trace-check replays them.
            full = {**detail, "inputs": inputs} if detail else {"inputs": inputs}
        # Runner.values is a fresh dict and ``full`` is encoded before this returns: no copies.
        self.audit._record_owned(
            self.name, self.instance_id, transition, self.runner.values, self.user, self.context_id, full
        )
        if self._listener is not None:
            self._listener(self, transition)
        return transition

    def is_terminal(self) -> bool:
        return self.runner.state in self.machine.terminal


__all__ = ["AuditWriter", "IllegalTransition", "MachineName", "TracedMachine", "TransitionListener"]
