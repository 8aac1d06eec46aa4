"""The sans-I/O delivery core (src/pipeproof/core/delivery.py; PROTOCOL section 5), driven directly:
no server, no event loop, no store. Time is a number passed in; jitter is a fixed draw.

Each behaviour is a scenario function that asserts what the core decides (the commands, the frames
a shell would write, the transitions fired); ``test_*`` runs it on :class:`DeliveryCore`, and
``test_each_scenario_catches_its_broken_core`` runs it on a core broken in exactly that decision and
requires it to fail, so no scenario passes for a core that gets its decision wrong.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeproof.core import delivery as core_module
from pipeproof.core.delivery import (
    NEVER,
    Acked,
    AckThrough,
    CatchUp,
    Command,
    DeliveryCore,
    EscalateEvent,
    Fired,
    MarkPending,
    MarkSent,
    PlainMachine,
    SendEvent,
    Timings,
    Tracked,
    Transmit,
    ack_wait,
)
from pipeproof.model.delivery import delivery_machine
from pipeproof.model.spec import Runner, Transition
from pipeproof.protocol import DeliveryState, EscalationReason

P, S = DeliveryState.PENDING, DeliveryState.SENT
# ack waits of 1 s, doubling, capped at 3 s; the fixed draw 0.5 of U(0, 1) with ack_jitter 0.2
# makes every wait 1.1 times its base.
TIMINGS = Timings(ack_timeout=1.0, ack_backoff=2.0, ack_timeout_max=3.0, ack_jitter=0.2, resume_window=10.0)
JITTER = 1.1


@dataclass(frozen=True)
class Ev:
    """A stored event as the core reads it (impl/store's EventRecord has these three fields)."""

    seq: int
    state: DeliveryState = P
    attempt: int = 0


Core = DeliveryCore[Ev]
CoreClass = Callable[..., Core]


class Shell:
    """What impl/delivery.py does with the core's commands, synchronously: every session takes
    each frame unless it is in ``refusing``; store writes are recorded in order."""

    def __init__(self, cls: CoreClass = DeliveryCore, *, max_attempts: int = 3, timings: Timings = TIMINGS) -> None:
        self.fired: list[Fired] = []
        self.core: Core = cls(
            delivery_machine(max_attempts, 1, 1), timings, lambda: 0.5,
            lambda seq, runner: PlainMachine(seq, runner, self.fired),
        )
        self.frames: list[tuple[int, int, str]] = []  # (seq, attempt, session) in write order
        self.store: list[Command] = []
        self.refusing: set[str] = set()

    def run(self, commands: Iterable[Command], now: float) -> None:
        for command in commands:
            if isinstance(command, SendEvent):
                plan = self.core.transmit(command.seq)
                if plan is None:
                    continue
                took = [s for s in plan.sessions if s not in self.refusing]
                self.frames += [(plan.seq, plan.attempt, s) for s in took]
                self.run(self.core.sent(plan, len(took), now), now)
            elif isinstance(command, CatchUp):
                late = self.core.in_flight(command.seq, command.session_id)
                if late is not None:
                    self.frames.append((late.seq, late.attempt, command.session_id))
            else:
                self.store.append(command)

    def append(self, now: float, *events: Ev) -> None:
        self.run(self.core.appended(events, now), now)

    def join(self, session_id: str, now: float) -> None:
        self.run(self.core.session_joined(session_id, now), now)

    def tick(self, now: float) -> None:
        self.run(self.core.tick(now), now)

    def ack(self, seq: int, session_id: str, now: float, *, resume: bool = False) -> list[int]:
        """An ack, with a store that acks every live event through the target."""
        write = self.core.ack(seq, session_id, resume=resume)
        done: list[int] = []
        while write is not None:
            result = self.core.ack_stored(write, [s for s in self.core.live if s <= write.through], now)
            done += result.seqs
            write = result.next
        return done

    def events(self, seq: int) -> list[str]:
        return [f.event for f in self.fired if f.seq == seq]


def state(shell: Shell, seq: int) -> Any:
    return shell.core.live[seq].machine.state


# -- scenarios ----------------------------------------------------------------------------------------


def first_send_and_fan_out(cls: CoreClass) -> None:
    sh = Shell(cls)
    assert sh.core.append_sent() is False
    sh.join("a", 0.0)
    sh.join("b", 0.0)
    assert sh.core.append_sent() is True  # stored SENT with attempt 1: no second write
    assert sh.core.appended([Ev(1, S, 1)], 0.0) == (SendEvent(1),)
    assert sh.core.transmit(1) == Transmit(1, 1, ("a", "b"), Ev(1, S, 1))
    sh.run([SendEvent(1)], 0.0)
    assert sh.frames == [(1, 1, "a"), (1, 1, "b")]
    assert sh.store == []
    assert sh.fired == [Fired(1, "send", "PENDING", "SENT", {"attempt": 1, "sessions": 2})]
    assert sh.core.next_deadline() == pytest.approx(1.0 * JITTER)
    # Appended PENDING (no session at the append, one by the send): the store is told SENT.
    sh.append(0.5, Ev(2))
    assert sh.frames[2:] == [(2, 1, "a"), (2, 1, "b")]
    assert sh.store == [MarkSent(2, 1)]
    # The oldest sendable event goes first: a session joining gets them in seq order.
    sh.core.session_left("a", 1.0)
    sh.core.session_left("b", 1.0)
    sh.append(1.0, Ev(3), Ev(4))
    assert sh.frames[4:] == []  # nobody to take them: they wait, PENDING
    sh.join("c", 2.0)
    assert sh.frames[4:] == [(1, 1, "c"), (2, 1, "c"), (3, 1, "c"), (4, 1, "c")]


def acks_are_cumulative_and_clamped(cls: CoreClass) -> None:
    sh = Shell(cls)
    sh.join("a", 0.0)
    sh.append(0.0, Ev(1, S, 1), Ev(2, S, 1))
    sh.refusing.add("a")
    sh.append(0.0, Ev(3, S, 1))  # the session refused it: PENDING, never delivered
    assert sh.store == [MarkPending(3)]
    sh.refusing.clear()
    sh.append(0.0, Ev(4, S, 1))
    # An ack naming more than was delivered covers the delivered prefix only: the model's ack
    # needs ``delivered``, and event 3 never reached a client.
    write = sh.core.ack(10, "a")
    assert write == AckThrough(2, 10, 2, {"session_id": "a"})
    result = sh.core.ack_stored(write, [1, 2], 0.25)
    assert result.seqs == (1, 2) and result.next is None
    assert result.latencies == (0.25, 0.25)
    assert [f for f in sh.fired if f.event == "ack"] == [
        Fired(1, "ack", "SENT", "ACKED", {"session_id": "a", "through": 10}),
        Fired(2, "ack", "SENT", "ACKED", {"session_id": "a", "through": 10}),
    ]
    assert list(sh.core.live) == [3, 4]
    assert sh.core.ack(2, "a") is None  # nothing new
    assert sh.ack(4, "a", 1.0) == []  # still clamped: 3 is first and undelivered
    # Coalesced: an ack arriving while a write is in flight only raises what the next round covers.
    sh.join("b", 1.0)  # 3 is sent to a and b now
    first = sh.core.ack(3, "b")
    assert first == AckThrough(3, 3, 3, {"session_id": "b"})
    assert sh.core.ack(4, "a") is None
    result = sh.core.ack_stored(first, [3], 1.5)
    assert result.seqs == (3,) and result.next == AckThrough(4, 3, 3, {"session_id": "b"})
    last = sh.core.ack_stored(result.next, [4], 1.5)
    assert last.seqs == (4,) and last.next is None and not sh.core.acking
    # The second round names its own target.
    assert [f.detail for f in sh.fired if f.event == "ack"][2:] == [
        {"session_id": "b", "through": 3}, {"session_id": "b", "through": 4},
    ]
    assert not sh.core.live


def resend_with_backoff_and_jitter(cls: CoreClass) -> None:
    sh = Shell(cls)
    sh.join("a", 0.0)
    sh.append(0.0, Ev(1, S, 1))
    assert sh.core.next_deadline() == pytest.approx(1.1)
    sh.tick(1.09)
    assert sh.frames == [(1, 1, "a")] and sh.store == []  # not due yet
    assert sh.core.tick(1.1) == (MarkPending(1), SendEvent(1))
    sh.run([SendEvent(1)], 1.1)
    assert sh.frames[-1] == (1, 2, "a")  # the same seq, attempt + 1
    assert sh.store == [MarkSent(1, 2)]
    assert sh.core.next_deadline() == pytest.approx(1.1 + 2.0 * JITTER)  # backoff: 1 s, then 2 s
    sh.tick(sh.core.next_deadline())
    assert sh.frames[-1] == (1, 3, "a")
    assert sh.core.next_deadline() == pytest.approx(1.1 + 2.2 + 3.0 * JITTER)  # 4 s capped at 3 s
    assert sh.fired[:4] == [
        Fired(1, "send", "PENDING", "SENT", {"attempt": 1, "sessions": 1}),
        Fired(1, "tick", "SENT", "SENT", {"deadline": "ack_timeout", "inputs": {"has_session": True}}),
        Fired(1, "ack_timeout", "SENT", "PENDING", {"attempt": 1, "inputs": {"has_session": True}}),
        Fired(1, "send", "PENDING", "SENT", {"attempt": 2, "sessions": 1}),
    ]


def escalation_with_max_attempts(cls: CoreClass) -> None:
    sh = Shell(cls, max_attempts=2)
    sh.join("a", 0.0)
    sh.append(0.0, Ev(1, S, 1))
    sh.tick(1.1)
    assert sh.frames == [(1, 1, "a"), (1, 2, "a")]
    # The last attempt's ack wait ends: the machine escalates, exactly once, with its reason.
    assert sh.core.tick(1.1 + 2.2) == (EscalateEvent(1, EscalationReason.MAX_ATTEMPTS),)
    assert not sh.core.live and sh.core.next_deadline() == NEVER
    assert sh.events(1) == ["send", "tick", "ack_timeout", "send", "tick", "ack_timeout"]
    assert sh.fired[-1].target == "ESCALATED"
    assert sh.core.tick(100.0) == ()
    assert sh.ack(1, "a", 100.0) == []  # a late ack of an escalated event acks nothing


def escalation_with_no_session(cls: CoreClass) -> None:
    sh = Shell(cls)
    sh.append(0.0, Ev(1))
    assert sh.core.next_deadline() == 10.0
    # A session that cannot take it pauses the budget (4 s spent), and its leaving resumes it.
    sh.refusing.add("a")
    sh.join("a", 4.0)
    assert state(sh, 1) is P and sh.core.next_deadline() == NEVER
    sh.core.session_left("a", 6.0)
    assert sh.core.next_deadline() == 12.0
    assert sh.core.tick(11.9) == ()
    assert sh.core.tick(12.0) == (EscalateEvent(1, EscalationReason.NO_SESSION),)
    assert sh.fired[-2:] == [
        Fired(1, "tick", "PENDING", "PENDING", {"deadline": "resume_window", "inputs": {"has_session": False}}),
        Fired(1, "no_session_timeout", "PENDING", "ESCALATED", {"idle_s": 10.0, "inputs": {"has_session": False}}),
    ]
    assert not sh.core.live


def escalation_with_send_failed(cls: CoreClass) -> None:
    sh = Shell(cls, max_attempts=2)
    sh.refusing |= {"a", "b"}
    sh.join("a", 0.0)
    sh.append(0.0, Ev(1, S, 1))
    assert sh.store == [MarkPending(1)]  # stored SENT, taken by nobody: PENDING, attempt counted
    assert state(sh, 1) is P and sh.core.live[1].machine.values["attempt"] == 1
    sh.store.clear()
    commands = sh.core.session_joined("b", 1.0)
    assert commands == (SendEvent(1),)
    plan = sh.core.transmit(1)
    assert plan is not None and plan.attempt == 2 and plan.sessions == ("a", "b")
    assert sh.core.sent(plan, 0, 1.0) == (EscalateEvent(1, EscalationReason.SEND_FAILED),)
    assert sh.events(1) == ["send_failed", "send_failed"] and sh.fired[-1].target == "ESCALATED"
    assert not sh.core.live and sh.frames == []


def ack_racing_a_resend(cls: CoreClass) -> None:
    sh = Shell(cls)
    sh.join("a", 0.0)
    sh.append(0.0, Ev(1, S, 1), Ev(2, S, 1))
    resend = sh.core.tick(1.1)
    assert resend == (MarkPending(1), MarkPending(2), SendEvent(1), SendEvent(2))
    # The shell waits for room before writing event 1; the client's ack lands meanwhile.
    assert sh.core.transmit(1) is not None
    assert sh.ack(1, "a", 1.2) == [1]
    assert sh.core.transmit(1) is None  # acked: never written again
    sh.run(resend, 1.2)
    assert sh.frames == [(1, 1, "a"), (2, 1, "a"), (2, 2, "a")]
    # A joining session does not catch up on an acked event either.
    catch_up = sh.core.session_joined("b", 1.3)
    assert catch_up == (CatchUp(2, "b"),)
    assert sh.ack(2, "a", 1.3) == [2]
    assert sh.core.in_flight(2, "b") is None
    sh.run(catch_up, 1.3)
    assert sh.frames[3:] == []
    assert [f.event for f in sh.fired if f.seq == 1] == ["send", "tick", "ack_timeout", "ack"]


def resume_redelivers_in_order(cls: CoreClass) -> None:
    sh = Shell(cls)
    sh.join("a", 0.0)
    sh.append(0.0, Ev(1, S, 1), Ev(2, S, 1))
    sh.core.session_left("a", 0.5)
    sh.append(0.5, Ev(3), Ev(4))  # nobody there: PENDING
    # The socket comes back with last_seq 1: the ack first, then the rest in seq order.
    assert sh.ack(1, "b", 1.0, resume=True) == [1]
    assert sh.fired[-1] == Fired(1, "ack", "SENT", "ACKED", {"resume": True, "session_id": "b", "through": 1})
    assert sh.core.session_joined("b", 1.0) == (CatchUp(2, "b"), SendEvent(3), SendEvent(4))
    sh.run((CatchUp(2, "b"), SendEvent(3), SendEvent(4)), 1.0)
    assert sh.frames[2:] == [(2, 1, "b"), (3, 1, "b"), (4, 1, "b")]  # 2: the attempt in flight, again
    # After a restart: a SENT event's attempt died with the old process, so its ack wait is over
    # at once and it goes back to PENDING; a session then gets every event as its next attempt.
    again = Shell(cls)
    again.core.restore([Ev(5, S, 2), Ev(6, P, 1), Ev(7)], 0.0)
    assert again.core.next_deadline() == 0.0
    assert again.core.tick(0.0) == (MarkPending(5),)
    again.join("c", 1.0)
    assert again.frames == [(5, 3, "c"), (6, 2, "c"), (7, 1, "c")]
    assert again.store == [MarkSent(5, 3), MarkSent(6, 2), MarkSent(7, 1)]


def next_deadline(cls: CoreClass) -> None:
    sh = Shell(cls)
    assert sh.core.next_deadline() == NEVER
    sh.append(2.0, Ev(1))  # no session: the resume_window budget
    assert sh.core.next_deadline() == 12.0
    sh.join("a", 3.0)  # sent: its ack wait replaces the budget
    assert sh.core.next_deadline() == pytest.approx(3.0 + 1.1)
    sh.append(3.5, Ev(2, S, 1))
    assert sh.core.next_deadline() == pytest.approx(4.1)  # the earliest of the two
    # While an ack write is in flight, the events it covers keep no deadline; after a failed
    # write they have them back, and ``earliest`` tells the shell to wake its clock.
    write = sh.core.ack(1, "a")
    assert write is not None
    assert sh.core.next_deadline() == pytest.approx(3.5 + 1.1)
    sh.core.ack_failed()
    assert sh.core.earliest == pytest.approx(4.1)
    assert sh.core.next_deadline() == pytest.approx(4.1)
    # A later deadline leaves ``earliest`` alone (no wake-up for it); an earlier one lowers it.
    sh.core.session_left("a", 3.6)
    assert sh.core.earliest == pytest.approx(4.1)
    sh.append(3.6, Ev(3))
    assert sh.core.earliest == pytest.approx(4.1)
    assert sh.core.next_deadline() == pytest.approx(4.1)


def adopting_another_nodes_events(cls: CoreClass) -> None:
    sh = Shell(cls)
    sh.join("a", 0.0)
    sh.append(0.0, Ev(4, S, 1))  # this node's own event (ending a run it took over)
    # A resume finds 2 and 3 in the store, stored by another node (2 went out there): they are
    # taken in, in seq order, and the one this node already tracks is left alone.
    taken = sh.core.restore([Ev(2, S, 1), Ev(3), Ev(4, S, 1)], 1.0)
    assert [r.seq for r in taken] == [2, 3]
    assert list(sh.core.live) == [2, 3, 4]
    assert sh.ack(3, "b", 1.0, resume=True) == [2]  # delivered elsewhere: acked; 3 never was
    # A joining session gets no copy of the other process's attempt, and 3 and 4 as usual.
    assert sh.core.session_joined("b", 1.0) == (SendEvent(3), CatchUp(4, "b"))
    assert sh.core.restore([Ev(3)], 1.5) == []


def an_ended_event_is_never_adopted_again(cls: CoreClass) -> None:
    sh = Shell(cls, max_attempts=2)
    sh.join("a", 0.0)
    sh.append(0.0, Ev(1, S, 1), Ev(2, S, 1))
    assert sh.ack(1, "a", 0.5) == [1]
    sh.tick(1.1)
    assert sh.core.tick(1.1 + 2.2) == (EscalateEvent(2, EscalationReason.MAX_ATTEMPTS),)
    # A session joins before the store shows the escalation (its write is in flight), or a store
    # that never got the word still says SENT: both stay ended here, never tracked twice.
    assert sh.core.restore([Ev(1, S, 1), Ev(2, S, 2), Ev(3)], 4.0) == [Ev(3)]
    assert list(sh.core.live) == [3]


def acked_through_another_node(cls: CoreClass) -> None:
    # Several nodes (section 5): a relay stored acks of events this owner sent. They are acked
    # here from the store, never resent; one never delivered (a race with an adoption) is let go
    # without a transition and is not sent again either.
    sh = Shell(cls, max_attempts=2)
    sh.join("node:b", 0.0)
    sh.append(0.0, Ev(1, S, 1), Ev(2, S, 1), Ev(3, S, 1))
    sh.core.restore([Ev(4)], 0.0)
    sent_before = len(sh.frames)
    result = sh.core.acked_elsewhere([2, 1, 4, 9], 0.5, {"stored": "through another node"})
    assert result.seqs == (1, 2) and result.next is None
    assert sh.events(1)[-1] == sh.events(2)[-1] == "ack"
    assert list(sh.core.live) == [3]
    sh.tick(1.1)  # 3's ack wait ran out: only 3 is resent
    assert [f[0] for f in sh.frames[sent_before:]] == [3]
    assert sh.core.restore([Ev(1, S, 1), Ev(4)], 2.0) == []  # ended here: never adopted again


SCENARIOS = {
    "first_send_and_fan_out": first_send_and_fan_out,
    "acks_are_cumulative_and_clamped": acks_are_cumulative_and_clamped,
    "resend_with_backoff_and_jitter": resend_with_backoff_and_jitter,
    "escalation_with_max_attempts": escalation_with_max_attempts,
    "escalation_with_no_session": escalation_with_no_session,
    "escalation_with_send_failed": escalation_with_send_failed,
    "ack_racing_a_resend": ack_racing_a_resend,
    "resume_redelivers_in_order": resume_redelivers_in_order,
    "next_deadline": next_deadline,
    "adopting_another_nodes_events": adopting_another_nodes_events,
    "an_ended_event_is_never_adopted_again": an_ended_event_is_never_adopted_again,
    "acked_through_another_node": acked_through_another_node,
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_reference_core(name: str) -> None:
    SCENARIOS[name](DeliveryCore)


# -- broken cores: each gets one decision wrong ----------------------------------------------------------


class FirstSessionOnly(DeliveryCore[Ev]):
    """No fan-out: a frame goes to the first READY session only."""

    def transmit(self, seq: int) -> Transmit[Ev] | None:
        plan = super().transmit(seq)
        return None if plan is None else Transmit(plan.seq, plan.attempt, plan.sessions[:1], plan.record)


class UnclampedAck(DeliveryCore[Ev]):
    """Acks through whatever seq the client names, delivered or not (and 'acks' undelivered ones)."""

    def ack(self, seq: int, session_id: str, *, resume: bool = False) -> AckThrough | None:
        through = max((s for s in self.live if s <= seq), default=0)
        if through <= self.ack_wanted or self.acking:
            return None
        self.ack_wanted, self.acking = through, True
        return AckThrough(through, seq, through, {"session_id": session_id})


class NoBackoff(DeliveryCore[Ev]):
    """Every attempt waits ``ack_timeout`` (no exponential backoff)."""

    def ack_wait(self, attempt: int) -> float:
        return super().ack_wait(1)


class SilentAtMaxAttempts(DeliveryCore[Ev]):
    """no_escalation: the machine escalates, the store is never told (the event is dropped)."""

    def _settle(self, entry: Tracked[Ev], transition: Transition) -> tuple[Command, ...] | None:
        settled = super()._settle(entry, transition)
        if settled and settled[0] == EscalateEvent(entry.record.seq, EscalationReason.MAX_ATTEMPTS):
            return ()
        return settled


class NoResumeWindow(DeliveryCore[Ev]):
    """Never starts the no-session budget: an event nobody can take waits forever."""

    def _idle(self, entry: Tracked[Ev], now: float) -> None:
        return None


class SwallowedSendFailure(DeliveryCore[Ev]):
    """swallow_send_failure: a send nobody took is treated as done (the event is let go)."""

    def sent(self, transmit: Transmit[Ev], written: int, now: float) -> tuple[Command, ...]:
        if written:
            return super().sent(transmit, written, now)
        del self.live[transmit.seq]
        return ()


class ResendsAcked(DeliveryCore[Ev]):
    """resend_acked: acked events are kept and offered again (in flight until resent)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gone: dict[int, Tracked[Ev]] = {}

    def ack_stored(self, write: AckThrough, acked: Iterable[int], now: float) -> Any:
        self.gone.update({s: self.live[s] for s in acked if s in self.live})
        return super().ack_stored(write, acked, now)

    def transmit(self, seq: int) -> Transmit[Ev] | None:
        if seq in self.gone:
            entry = self.gone[seq]
            return Transmit(seq, entry.frame_attempt + 1, tuple(self.sessions), entry.record)
        return super().transmit(seq)

    def in_flight(self, seq: int, session_id: str) -> Transmit[Ev] | None:
        if seq in self.gone:
            return Transmit(seq, self.gone[seq].frame_attempt, (session_id,), self.gone[seq].record)
        return super().in_flight(seq, session_id)


class NewestFirst(DeliveryCore[Ev]):
    """A joining session gets the unfinished events newest first."""

    def session_joined(self, session_id: str, now: float) -> tuple[Command, ...]:
        return tuple(reversed(super().session_joined(session_id, now)))


class DeadlinesDuringAcks(DeliveryCore[Ev]):
    """Keeps timing out events whose ack is being stored (and so races its own acks)."""

    def deadline(self, entry: Tracked[Ev]) -> float:
        acking, self.acking = self.acking, False
        try:
            return super().deadline(entry)
        finally:
            self.acking = acking


class AdoptedLast(DeliveryCore[Ev]):
    """Restores as if the core were empty (a restart): events another node stored land after this
    node's later ones, so acks and offers walk the stream out of seq order."""

    def restore(self, records: Iterable[Ev], now: float) -> list[Ev]:
        taken = super().restore(records, now)
        for record in taken:
            self.live[record.seq] = self.live.pop(record.seq)
        return taken


class ReadoptsEnded(DeliveryCore[Ev]):
    """Forgets what it ended: a store behind its machine hands the event back as unfinished."""

    def restore(self, records: Iterable[Ev], now: float) -> list[Ev]:
        self.ended.clear()
        return super().restore(records, now)


class AckedElsewhereIgnored(DeliveryCore[Ev]):
    """Takes the store's word on acks made through another node for nothing: resends them."""

    def acked_elsewhere(self, seqs: Iterable[int], now: float, detail: Mapping[str, Any]) -> Acked:
        return Acked((), (), None)


BROKEN: Sequence[tuple[str, CoreClass]] = (
    ("first_send_and_fan_out", FirstSessionOnly),
    ("acks_are_cumulative_and_clamped", UnclampedAck),
    ("resend_with_backoff_and_jitter", NoBackoff),
    ("escalation_with_max_attempts", SilentAtMaxAttempts),
    ("escalation_with_no_session", NoResumeWindow),
    ("escalation_with_send_failed", SwallowedSendFailure),
    ("ack_racing_a_resend", ResendsAcked),
    ("resume_redelivers_in_order", NewestFirst),
    ("next_deadline", DeadlinesDuringAcks),
    ("adopting_another_nodes_events", AdoptedLast),
    ("an_ended_event_is_never_adopted_again", ReadoptsEnded),
    ("acked_through_another_node", AckedElsewhereIgnored),
)


@pytest.mark.parametrize(("name", "broken"), BROKEN, ids=[b.__name__ for _, b in BROKEN])
def test_each_scenario_catches_its_broken_core(name: str, broken: CoreClass) -> None:
    with pytest.raises(AssertionError):
        SCENARIOS[name](broken)


def test_every_scenario_has_a_broken_core() -> None:
    assert sorted(name for name, _ in BROKEN) == sorted(SCENARIOS)


# -- the rest of the contract ------------------------------------------------------------------------------


def test_ack_wait_is_the_documented_formula_with_the_same_draws_as_random_uniform() -> None:
    timings = Timings(ack_timeout=0.5, ack_backoff=3.0, ack_timeout_max=10.0, ack_jitter=0.25)
    draws, uniform = random.Random(7), random.Random(7)
    for attempt in range(1, 7):
        base = min(0.5 * 3.0 ** (attempt - 1), 10.0)
        assert ack_wait(timings, attempt, draws.random()) == base * (1.0 + uniform.uniform(0.0, 0.25))


def test_an_illegal_report_raises_instead_of_passing_silently() -> None:
    sh = Shell()
    sh.join("a", 0.0)
    sh.append(0.0, Ev(1, S, 1))
    stale = Transmit(1, 1, ("a",), Ev(1, S, 1))
    assert sh.ack(1, "a", 0.1) == [1]
    from pipeproof.errors import IllegalTransition

    with pytest.raises(IllegalTransition):
        sh.core.sent(stale, 1, 0.2)


def test_the_default_machine_records_nothing_and_still_decides() -> None:
    core: Core = DeliveryCore(delivery_machine(2, 1, 1), TIMINGS, lambda: 0.0)
    core.session_joined("a", 0.0)
    (offer,) = core.appended([Ev(1, S, 1)], 0.0)
    plan = core.transmit(1)
    assert offer == SendEvent(1) and plan is not None
    assert core.sent(plan, 1, 0.0) == ()
    assert isinstance(core.live[1].machine, PlainMachine)
    assert isinstance(core.live[1].machine.runner, Runner) and core.live[1].machine.sink is None


def test_the_core_imports_no_io_task_or_clock() -> None:
    tree = ast.parse(Path(core_module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"asyncio", "time", "random", "socket", "sqlalchemy", "threading"}
    assert "pipeproof" in imported and not any(
        (node.module or "").startswith("pipeproof.impl") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    )
