"""Delivery of one context's stream, sans I/O: every event ends ACKED or ESCALATED (PROTOCOL section 5).

Rules:
- :class:`DeliveryCore` owns, for one context stream on this node, the delivery machine of every
  unfinished event (model/delivery.py, declaration engine) and every decision about them: which
  event goes next and to which READY sessions, send or ``send_failed``, what a cumulative ack
  covers, when an ack wait or the no-session budget runs out, what a joining session receives;
- it owns no socket, task, store or clock: the shell (impl/delivery.py) feeds it what happened,
  with the current monotonic time as an argument, and carries out the :data:`Command` values it
  returns, in order; random jitter comes from an injected draw, so the core is deterministic;
- every transition is the machine's: the core asks ``can`` and fires, and reads what the fired
  transition declares (``Escalate(reason)`` says whether and why the event escalates). The real
  deadlines are the core's own bookkeeping, because the model's time is discrete: one model
  ``tick`` stands for "the deadline at hand has passed", so each expiry fires ``tick`` and then
  the timeout (``delivery_machine(max_attempts, ack_timeout=1, resume_window=1)``);
- an event whose machine reaches a terminal state leaves the core at once; the store write that
  records it is a command (an ack is the exception: the store commits it first, then
  :meth:`DeliveryCore.ack_stored` fires ``ack`` on what the store acked).

Waits. The ack of attempt ``k`` is awaited ``min(ack_timeout * ack_backoff ** (k - 1),
ack_timeout_max) * (1 + U(0, ack_jitter))`` seconds (:func:`ack_wait`). A PENDING event with no
READY session of its context spends its ``resume_window`` budget; the budget pauses while a session
is there and resumes when the last one leaves.

Audit. The core fires each machine through the :class:`EventMachine` the injected factory built
for it (the server's :class:`~pipeproof.impl.audit.TracedMachine`), so each transition is written
as an audit line when it happens, in the order the core fires them; :class:`PlainMachine` is the
unaudited default (tests read its :class:`Fired` records).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar

from pipeproof.errors import IllegalTransition
from pipeproof.model.expr import Value
from pipeproof.model.spec import Machine, Runner, Transition
from pipeproof.protocol import DeliveryState, Escalate, EscalationReason

NEVER: Final = float("inf")
"""The deadline of something that has none."""


class EventLike(Protocol):
    """What the core reads of a stored event (impl/store's ``EventRecord`` is one)."""

    @property
    def seq(self) -> int: ...

    @property
    def state(self) -> DeliveryState: ...

    @property
    def attempt(self) -> int: ...


R = TypeVar("R", bound=EventLike)


class EventMachine(Protocol):
    """One event's delivery machine as the core drives it (impl/audit.py's TracedMachine is one)."""

    @property
    def state(self) -> Any: ...

    @property
    def values(self) -> Mapping[str, Value]: ...

    def can(self, event: str, **inputs: Value) -> bool: ...

    def fire(self, event: str, detail: Mapping[str, Any] | None = None, **inputs: Value) -> Transition: ...


MachineFactory = Callable[[int, Runner], EventMachine]
"""``(seq, runner) -> EventMachine``: wraps the Runner the core made for event ``seq``."""


@dataclass(frozen=True, slots=True)
class Fired:
    """One transition a :class:`PlainMachine` made (what an audit line records, minus the clock)."""

    seq: int
    event: str
    source: str
    target: str
    detail: Mapping[str, Any]


class PlainMachine:
    """An :class:`EventMachine` without an audit log; ``sink`` collects what it fires, in order."""

    def __init__(self, seq: int, runner: Runner, sink: list[Fired] | None = None) -> None:
        self.seq = seq
        self.runner = runner
        self.sink = sink

    @property
    def state(self) -> enum.Enum:
        return self.runner.state

    @property
    def values(self) -> Mapping[str, Value]:
        return self.runner.values

    def can(self, event: str, **inputs: Value) -> bool:
        return self.runner.can(event, **inputs)

    def fire(self, event: str, detail: Mapping[str, Any] | None = None, **inputs: Value) -> Transition:
        transition = self.runner.fire(event, **inputs)
        if self.sink is not None:
            full = {**(detail or {}), "inputs": inputs} if inputs else dict(detail or {})
            self.sink.append(Fired(self.seq, event, transition.source.name, transition.target.name, full))
        return transition


def restored_runner(machine: Machine, state: enum.Enum, values: Mapping[str, Value]) -> Runner:
    """A declaration-engine Runner started at a stored configuration (recovery after a restart).

    ``values`` names every variable of ``machine``; a missing or unknown one is a bug here.
    """
    if set(values) != set(machine.var_names):
        raise ValueError(f"restoring {machine.name}: variables {sorted(values)} != {sorted(machine.var_names)}")
    return Runner(machine, engine="declaration", start=(state, tuple(values[n] for n in machine.var_names)))


# -- waits ------------------------------------------------------------------------------------------


class _TimingSource(Protocol):
    @property
    def ack_timeout(self) -> float: ...

    @property
    def ack_backoff(self) -> float: ...

    @property
    def ack_timeout_max(self) -> float: ...

    @property
    def ack_jitter(self) -> float: ...

    @property
    def resume_window(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Timings:
    """The real-time settings of section 5, in seconds (impl/settings.py documents each)."""

    ack_timeout: float
    ack_backoff: float = 2.0
    ack_timeout_max: float = 60.0
    ack_jitter: float = 0.1
    resume_window: float = 120.0

    @classmethod
    def of(cls, source: _TimingSource) -> Timings:
        """The timings of a settings object (anything with these five attributes)."""
        return cls(source.ack_timeout, source.ack_backoff, source.ack_timeout_max, source.ack_jitter,
                   source.resume_window)


def ack_wait(timings: Timings, attempt: int, draw: float) -> float:
    """Seconds to wait for the ack of ``attempt``: exponential backoff, capped, with jitter.

    ``draw`` is a sample of U(0, 1): the jitter factor is ``1 + ack_jitter * draw``, which is
    ``1 + U(0, ack_jitter)`` (``random.uniform(0, j)`` computes ``j * random()`` too).
    """
    base = min(timings.ack_timeout * timings.ack_backoff ** max(0, attempt - 1), timings.ack_timeout_max)
    return base * (1.0 + timings.ack_jitter * draw)


# -- commands (what the shell carries out, in order) --------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendEvent:
    """Offer event ``seq`` to the sessions now: ask :meth:`DeliveryCore.transmit` for it when this
    command's turn comes (it is None if the machine no longer sends it), write its frame, then
    report with :meth:`DeliveryCore.sent`."""

    seq: int


@dataclass(frozen=True, slots=True)
class CatchUp:
    """A joining session gets the attempt of ``seq`` already in flight (a late fan-out, no
    transition): ask :meth:`DeliveryCore.in_flight` when its turn comes, write that frame to
    ``session_id`` only."""

    seq: int
    session_id: str


@dataclass(frozen=True, slots=True)
class MarkSent:
    """Store: the event is SENT with ``attempt``."""

    seq: int
    attempt: int


@dataclass(frozen=True, slots=True)
class MarkPending:
    """Store: the event is PENDING again (its attempt count kept)."""

    seq: int


@dataclass(frozen=True, slots=True)
class EscalateEvent:
    """Store: the event is ESCALATED with ``reason``; count it and log it (section 5). The core
    has already let the event go."""

    seq: int
    reason: EscalationReason


Command = SendEvent | CatchUp | MarkSent | MarkPending | EscalateEvent


@dataclass(frozen=True, slots=True)
class Transmit(Generic[R]):
    """Write ``record``'s frame with ``attempt`` to each of ``sessions`` (session ids, join order)."""

    seq: int
    attempt: int
    sessions: tuple[str, ...]
    record: R


@dataclass(frozen=True, slots=True)
class AckThrough:
    """Store: ack every live event of the stream with seq <= ``through``; then report what the
    store acked with :meth:`DeliveryCore.ack_stored` (or :meth:`DeliveryCore.ack_failed`).

    ``asked`` and ``first`` are the seq the acking client named and what it covered (the audit
    detail names ``asked`` in the round that writes ``first``); ``detail`` is the rest of it."""

    through: int
    asked: int
    first: int
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Acked:
    """The machines acked after an ack write: their seqs, the seconds from append to ack of each,
    and the next write of the coalesced acks (None when every ack asked for is stored)."""

    seqs: tuple[int, ...]
    latencies: tuple[float, ...]
    next: AckThrough | None


# -- the core ---------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Tracked(Generic[R]):
    """One unfinished event: its record, its machine and its real-time deadlines."""

    record: R
    machine: EventMachine
    appended_at: float
    frame_attempt: int = 0  # the attempt of the last frame written (what a joining session catches up on)
    stored_sent: int = 0  # the attempt the store holds as SENT (0: the store does not say SENT)
    ack_due: float = NEVER  # awaiting the ack of its attempt until then (NEVER: not in flight)
    idle_spent: float = 0.0  # seconds spent with no live session (the resume_window budget)
    idle_from: float | None = None  # accruing since then (no session, not in flight), else None

    @property
    def seq(self) -> int:
        return self.record.seq


_NOTHING: Final[tuple[Command, ...]] = ()


@dataclass(eq=False)
class DeliveryCore(Generic[R]):
    """Delivery of one context's stream on this node (see module docstring).

    ``machine`` is the delivery machine (its ``max_attempts`` bounds the attempts); ``jitter``
    draws from U(0, 1) once per ack wait; ``machines`` wraps each event's Runner (audit).
    """

    machine: Machine
    timings: Timings
    jitter: Callable[[], float]
    machines: MachineFactory | None = None
    live: dict[int, Tracked[R]] = field(default_factory=dict)  # insertion order is seq order
    sessions: dict[str, None] = field(default_factory=dict)  # READY session ids, in join order
    ack_wanted: int = 0  # the highest seq a client asked to ack (clamped to what was delivered)
    ack_done: int = 0  # ... and the highest one whose ack write has committed
    acking: bool = False  # an ack write is in flight: events <= ack_wanted keep no deadline
    earliest: float = NEVER  # no deadline falls before this (exact after next_deadline())
    # Seqs this core took to ACKED or ESCALATED. Its machine's word on them is final (section 5:
    # a terminal state is never left), so a later restore from the store never tracks them again,
    # even if the store's write is late or (in a broken variant) never comes.
    ended: set[int] = field(default_factory=set)

    # -- queries -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.live)

    def append_sent(self) -> bool:
        """Whether the next append stores its events SENT with attempt 1: a session is there to
        take them (so the first send needs no second store write)."""
        return bool(self.sessions)

    def ack_wait(self, attempt: int) -> float:
        return ack_wait(self.timings, attempt, self.jitter())

    def transmit(self, seq: int) -> Transmit[R] | None:
        """The frame to write for ``seq`` to every READY session now, or None if its machine does
        not send it (acked, escalated, in flight, or out of attempts). Ask again after any await:
        only the answer given with nothing in between may be reported to :meth:`sent`."""
        entry = self.live.get(seq)
        if entry is None or not entry.machine.can("send"):
            return None
        return Transmit(seq, int(entry.machine.values["attempt"]) + 1, tuple(self.sessions), entry.record)

    def in_flight(self, seq: int, session_id: str) -> Transmit[R] | None:
        """The attempt of ``seq`` awaiting its ack, to write again to ``session_id`` (no
        transition), or None if it is no longer in flight (acked while the shell waited)."""
        entry = self.live.get(seq)
        if entry is None or entry.ack_due == NEVER or entry.frame_attempt == 0:
            return None
        return Transmit(seq, entry.frame_attempt, (session_id,), entry.record)

    def deadline(self, entry: Tracked[R]) -> float:
        """When ``entry``'s next timeout fires (NEVER: none is running)."""
        if self.acking and entry.record.seq <= self.ack_wanted:
            return NEVER  # a client acked it and the ack is being stored: its fate is the ack's
        if entry.ack_due != NEVER:
            return entry.ack_due
        if entry.idle_from is not None:
            return entry.idle_from + max(0.0, self.timings.resume_window - entry.idle_spent)
        return NEVER

    def next_deadline(self) -> float:
        """The earliest deadline of the stream (NEVER if none): call :meth:`tick` then."""
        due = min((self.deadline(e) for e in self.live.values()), default=NEVER)
        self.earliest = due
        return due

    # -- events in and out -------------------------------------------------------------------------

    def appended(self, records: Iterable[R], now: float) -> tuple[Command, ...]:
        """Events the store just committed (seq order): track them and send them.

        They are offered at once when a session is there, and so is one the append stored SENT
        although its session left meanwhile (the send then fails and the store hears PENDING).
        """
        out: list[Command] = []
        with_session = bool(self.sessions)
        for record in records:
            entry = self._track(record, Runner(self.machine, engine="declaration"), now)
            if record.state is DeliveryState.SENT:
                entry.stored_sent = record.attempt
            if not with_session:
                self._idle(entry, now)
            if with_session or entry.stored_sent:
                out.append(SendEvent(record.seq))
        return tuple(out)

    def restore(self, records: Iterable[R], now: float) -> list[R]:
        """Unfinished events read back from the store, which this node does not track: after a
        restart, or stored by another node (section 5: a resume redelivers whichever node it
        lands on). Returns those it took; a seq tracked here, or ended here, is left alone.

        A SENT one went out from a process that is not this one: it awaits its ack (a resume acks
        it), and is then resent or escalated. A PENDING one waits for a session for
        ``resume_window`` (or is offered at once, by the shell, when a session is there).
        """
        taken: list[R] = []
        top = next(reversed(self.live), 0)  # the highest seq tracked (live is in seq order)
        for record in records:
            if record.seq in self.live or record.seq in self.ended:
                continue
            sent = record.state is DeliveryState.SENT
            values: dict[str, Value] = {
                "attempt": record.attempt, "waited": 0, "idle": 0, "age": 0, "delivered": record.attempt > 0,
            }
            start = DeliveryState.SENT if sent else DeliveryState.PENDING
            entry = self._track(record, restored_runner(self.machine, start, values), now)
            taken.append(record)
            if sent:
                # The attempt in flight was written by another process (its socket is not ours):
                # its ack wait is over now, so the event goes back to PENDING and is resent as the
                # next attempt (or escalated at max_attempts), never as a copy of the old one, so
                # a joining session gets no catch-up of it (frame_attempt stays 0).
                entry.stored_sent = record.attempt
                self._await_ack(entry, now)
            elif not self.sessions:
                self._idle(entry, now)
        if taken and taken[0].seq < top:
            # Insertion order is seq order (acks and offers walk it so): an event of another node
            # may fall below the ones this node appended since.
            self.live = dict(sorted(self.live.items()))
        return taken

    def sent(self, transmit: Transmit[R], written: int, now: float) -> tuple[Command, ...]:
        """The frame of ``transmit`` was queued on ``written`` of its sessions: fire ``send``
        (any session took it: fan-out) or ``send_failed`` (none did).

        The store hears of it after the machine: ``MarkSent`` unless the append already stored
        this attempt SENT, and ``MarkPending`` when it did but no session took the frame (both
        sides then say PENDING with this attempt counted, as ``send_failed`` counts it).
        """
        seq, attempt = transmit.seq, transmit.attempt
        entry = self.live.get(seq)
        if entry is None:
            raise IllegalTransition(self.machine.name, "send", "untracked", f"event {seq} is not live on this node")
        if written:
            entry.machine.fire("send", {"attempt": attempt, "sessions": written})
            entry.frame_attempt = attempt
            entry.idle_from = None
            self._await_ack(entry, now + self.ack_wait(attempt))
            if entry.stored_sent >= attempt:
                return _NOTHING
            entry.stored_sent = attempt
            return (MarkSent(seq, attempt),)
        transition = entry.machine.fire("send_failed", {"attempt": attempt})
        settled = self._settle(entry, transition)
        if settled is not None:
            return settled
        out = _NOTHING
        if entry.stored_sent >= attempt:
            entry.stored_sent = 0
            out = (MarkPending(seq),)
        if not self.sessions and entry.idle_from is None:
            self._idle(entry, now)
        return out

    def tick(self, now: float) -> tuple[Command, ...]:
        """Fire every deadline due at ``now``.

        An ack wait that ran out fires ``tick`` then ``ack_timeout``: the machine escalates
        (``max_attempts``) or goes back to PENDING, and then every sendable event is offered
        again if a session is there (oldest first), else the event starts its no-session budget.
        A spent no-session budget fires ``tick`` then ``no_session_timeout`` (``no_session``).
        """
        has_session = bool(self.sessions)
        out: list[Command] = []
        resend = False
        for entry in list(self.live.values()):
            if self.deadline(entry) > now:
                continue
            m = entry.machine
            if entry.ack_due != NEVER:
                entry.ack_due = NEVER
                m.fire("tick", {"deadline": "ack_timeout"}, has_session=has_session)
                transition = m.fire("ack_timeout", {"attempt": m.values["attempt"]}, has_session=has_session)
                settled = self._settle(entry, transition)
                if settled is not None:
                    out.extend(settled)
                    continue
                entry.stored_sent = 0
                out.append(MarkPending(entry.record.seq))
                if has_session:
                    resend = True
                else:
                    self._idle(entry, now)
            else:
                m.fire("tick", {"deadline": "resume_window"}, has_session=has_session)
                idle_s = round(entry.idle_spent + now - (entry.idle_from if entry.idle_from is not None else now), 3)
                transition = m.fire("no_session_timeout", {"idle_s": idle_s}, has_session=has_session)
                out.extend(self._settle(entry, transition) or ())
        if resend:
            out.extend(self._offers())
        return tuple(out)

    # -- sessions ----------------------------------------------------------------------------------

    def session_joined(self, session_id: str, now: float) -> tuple[Command, ...]:
        """A READY session of the context joined (after its resume ack, if any, is stored).

        The no-session budgets pause; the session gets, in seq order, the attempt in flight of
        every event awaiting its ack (:class:`CatchUp`) and every sendable event (a send, to all
        sessions). The shell stops the round if the session leaves or refuses a frame.
        """
        if not self.sessions:
            for entry in self.live.values():
                if entry.idle_from is not None:
                    entry.idle_spent += now - entry.idle_from
                    entry.idle_from = None
        self.sessions[session_id] = None
        out: list[Command] = []
        for seq, entry in self.live.items():
            if entry.ack_due != NEVER and entry.frame_attempt > 0:
                out.append(CatchUp(seq, session_id))
            elif entry.machine.can("send"):
                out.append(SendEvent(seq))
        return tuple(out)

    def session_left(self, session_id: str, now: float) -> bool:
        """A session left (idempotent; False if it was not joined). When it was the last one,
        every event not in flight starts spending its no-session budget."""
        if self.sessions.pop(session_id, False) is False:
            return False
        if not self.sessions:
            for entry in self.live.values():
                if entry.ack_due == NEVER and entry.idle_from is None:
                    self._idle(entry, now)
        return True

    # -- acks --------------------------------------------------------------------------------------

    def ack(self, seq: int, session_id: str, *, resume: bool = False) -> AckThrough | None:
        """A cumulative ack through ``seq`` from a session of the context (``resume``: its
        connection_init's ``last_seq``).

        The model acks only delivered events, so the ack is clamped to the delivered prefix of the
        live events. Acks are coalesced: while a write is in flight this only raises
        ``ack_wanted``, and the rounds of that write cover it (:meth:`ack_stored`). Returns the
        write to make, or None when there is nothing new to ack or a write in flight covers it.
        """
        through = 0
        for s, entry in self.live.items():
            if s > seq or not entry.machine.can("ack"):
                break
            through = s
        if through <= self.ack_wanted:
            return None
        self.ack_wanted = through
        if self.acking:
            return None
        self.acking = True
        detail: dict[str, Any] = {"resume": True, "session_id": session_id} if resume else {"session_id": session_id}
        return AckThrough(through, seq, through, detail)

    def ack_stored(self, write: AckThrough, acked: Iterable[int], now: float) -> Acked:
        """``write`` committed and the store acked ``acked``: fire ``ack`` on those machines.

        Returns them and the next round: a write through ``ack_wanted`` if acks arrived during
        this one, else None (the stream is no longer acking)."""
        self.ack_done = max(self.ack_done, write.through)
        # Later rounds record acks that other frames asked for: they name their own target.
        detail = {**write.detail, "through": write.asked if write.through == write.first else write.through}
        seqs: list[int] = []
        latencies: list[float] = []
        for seq in acked:
            entry = self.live.get(seq)
            if entry is None:
                continue  # not live on this node (another node's, or already let go)
            self._settle(entry, entry.machine.fire("ack", detail))
            seqs.append(seq)
            latencies.append(now - entry.appended_at)
        following = None
        if self.ack_done < self.ack_wanted:
            following = AckThrough(self.ack_wanted, write.asked, write.first, write.detail)
        else:
            self._acks_settled(self.ack_wanted)
        return Acked(tuple(seqs), tuple(latencies), following)

    def acked_elsewhere(self, seqs: Iterable[int], now: float, detail: Mapping[str, Any]) -> Acked:
        """The store holds ``seqs`` ACKED by another node (a client acked them there: section 5,
        an ack counts from any session of the context): fire ``ack`` on those still live here.

        The store acks only delivered events, so each machine can take the ack; one that cannot
        (a race with an adoption that read the event before its first send was stored) is let go
        without a transition, and its seq is returned in neither list, so it is never sent again.
        """
        seqs_done: list[int] = []
        latencies: list[float] = []
        for seq in sorted(seqs):
            entry = self.live.get(seq)
            if entry is None:
                continue
            if not entry.machine.can("ack"):
                del self.live[seq]
                self.ended.add(seq)
                continue
            self._settle(entry, entry.machine.fire("ack", {**detail, "through": seq}))
            seqs_done.append(seq)
            latencies.append(now - entry.appended_at)
        return Acked(tuple(seqs_done), tuple(latencies), None)

    def ack_failed(self) -> None:
        """The ack write failed: what it asked for is not stored, so those events keep their
        deadlines (they are resent, and acked again by the client)."""
        wanted, self.ack_wanted = self.ack_wanted, self.ack_done
        self._acks_settled(wanted)

    # -- internals ---------------------------------------------------------------------------------

    def _track(self, record: R, runner: Runner, now: float) -> Tracked[R]:
        machine = self.machines(record.seq, runner) if self.machines is not None else PlainMachine(record.seq, runner)
        entry = Tracked(record, machine, now)
        self.live[record.seq] = entry
        return entry

    def _await_ack(self, entry: Tracked[R], due: float) -> None:
        entry.ack_due = due
        self.earliest = min(self.earliest, due)

    def _idle(self, entry: Tracked[R], now: float) -> None:
        entry.idle_from = now
        self.earliest = min(self.earliest, self.deadline(entry))

    def _settle(self, entry: Tracked[R], transition: Transition) -> tuple[Command, ...] | None:
        """Let a finished event go: an escalating transition (its declared ``Escalate``) becomes
        a store write; any terminal state leaves the core. None if the event is still live."""
        if isinstance(transition.emits, Escalate):
            del self.live[entry.record.seq]
            self.ended.add(entry.record.seq)
            return (EscalateEvent(entry.record.seq, transition.emits.reason),)
        if transition.target in self.machine.terminal:
            del self.live[entry.record.seq]
            self.ended.add(entry.record.seq)
            return _NOTHING
        return None

    def _offers(self) -> list[Command]:
        return [SendEvent(seq) for seq, entry in self.live.items() if entry.machine.can("send")]

    def _acks_settled(self, covered: int) -> None:
        """No ack write is in flight: events <= ``covered`` the store did not ack (no longer live
        there, or the write failed) have their deadlines back."""
        self.acking = False
        for seq, entry in self.live.items():
            if seq > covered:
                break
            self.earliest = min(self.earliest, self.deadline(entry))


__all__ = [
    "NEVER",
    "AckThrough",
    "Acked",
    "CatchUp",
    "Command",
    "DeliveryCore",
    "EscalateEvent",
    "EventLike",
    "EventMachine",
    "Fired",
    "MachineFactory",
    "MarkPending",
    "MarkSent",
    "PlainMachine",
    "SendEvent",
    "Timings",
    "Tracked",
    "Transmit",
    "ack_wait",
    "restored_runner",
]
