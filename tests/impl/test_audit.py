"""Tests for pipeproof.impl.audit: one JSON line per transition, exactly the documented keys and
exactly json.dumps' bytes; buffered to one write per loop turn; write failures fail-safe: lines kept
and retried in order, surfaced by flush(), ``failing`` and one log line per episode, backlog capped."""

from __future__ import annotations

import asyncio
import enum
import errno
import json
import logging
import sys
import threading
from collections import OrderedDict
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeproof.errors import AuditWriteFailed, IllegalTransition
from pipeproof.impl import audit
from pipeproof.impl.audit import AuditWriter, TracedMachine
from pipeproof.model.connection import CONNECTION
from pipeproof.model.context import context_machine

KEYS = {"ts", "machine", "id", "user", "context_id", "event", "from", "to", "vars", "detail"}


def test_every_fire_writes_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "audit.jsonl"
    writer = AuditWriter(path)
    conn = TracedMachine(CONNECTION, "connection", "s1", writer)
    conn.fire("recv_init")
    conn.fire("recv_frame", {"type": "ack"})
    conn.user, conn.context_id = "alice", "c1"
    conn.fire("auth_ok")
    with pytest.raises(IllegalTransition):
        conn.fire("auth_ok")  # refused: nothing is written
    ctx = TracedMachine(context_machine(2), "context", "c1", writer, user="alice", context_id="c1")
    ctx.fire("create", account_full=False)
    writer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["recv_init", "recv_frame", "auth_ok", "create"]
    assert all(set(line) == KEYS for line in lines)
    assert lines[1]["vars"] == {"queued": 1, "ack_sent": False, "errors": 0} and lines[1]["detail"] == {"type": "ack"}
    assert (lines[0]["user"], lines[2]["user"], lines[2]["context_id"]) == (None, "alice", "c1")
    assert (lines[2]["from"], lines[2]["to"]) == ("INITIALISING", "READY")
    assert lines[3]["detail"] == {"inputs": {"account_full": False}}
    assert lines[3]["vars"] == {"epoch": 1, "conns": 1, "instances": 1}


def test_off_and_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    off = TracedMachine(CONNECTION, "connection", "s1", AuditWriter("off"))
    off.fire("recv_init")
    assert capsys.readouterr().out == ""
    out = TracedMachine(CONNECTION, "connection", "s2", AuditWriter("stdout"))
    out.fire("recv_init")
    assert json.loads(capsys.readouterr().out)["id"] == "s2"


# -- helpers --------------------------------------------------------------------------------------------

TS = 1747000000.25


def stub(event: str = "e", source: str = "A", target: str = "B") -> Any:
    """A Transition as the writer reads it, with any strings as names: states are Enum members, whose
    ``name`` the writer reads as ``_name_`` (the attribute the property returns)."""

    def state(name: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, _name_=name)

    return SimpleNamespace(event=event, source=state(source), target=state(target))


def reference(
    ts: Any, machine: Any, instance_id: Any, transition: Any, values: Any, user: Any, context_id: Any, detail: Any
) -> str:
    """What the writer wrote before it was buffered: the documented line, json.dumps'd."""
    line = {
        "ts": ts,
        "machine": machine,
        "id": instance_id,
        "user": user,
        "context_id": context_id,
        "event": transition.event,
        "from": transition.source.name,
        "to": transition.target.name,
        "vars": dict(values),
        "detail": dict(detail) if detail else {},
    }
    return json.dumps(line, separators=(",", ":"), default=str) + "\n"


class FakeStream:
    """A text stream that counts write and flush calls and can be made to fail."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0
        self.fail: OSError | None = None
        self.fail_flush: OSError | None = None

    def write(self, text: str) -> int:
        if self.fail is not None:
            raise self.fail
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        if self.fail_flush is not None:
            raise self.fail_flush
        self.flushes += 1

    @property
    def text(self) -> str:
        return "".join(self.writes)

    def events(self) -> list[str]:
        return [json.loads(line)["event"] for line in self.text.splitlines()]


def note(writer: AuditWriter, event: str, **detail: Any) -> None:
    writer.record("connection", "s1", stub(event), {"queued": 1}, user="u", context_id=None, detail=detail, ts=TS)


def reference_note(event: str) -> str:
    return reference(TS, "connection", "s1", stub(event), {"queued": 1}, "u", None, {})


def enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


# -- encoding: the bytes json.dumps gives, whatever the values -------------------------------------------


class Weird(str):
    """A str subclass: json writes its text; the fast encoder must not guess."""


class Level(enum.IntEnum):
    HIGH = 7


SPECIALS = ['"', "\\", "\n", "\r", "\t", "\b", "\x00", "\x1f", "\x7f", "é", "\u2028", "\U0001f600", "\ud800", "/"]
texts = st.lists(st.text(max_size=6) | st.sampled_from(SPECIALS), max_size=4).map("".join)
floats = st.floats() | st.sampled_from([-0.0, 1e-310, -2.5e-7, 1e16, 1.5e300, -1e22, 1747000000.123456])
ints = st.integers() | st.integers(min_value=-(10**60), max_value=10**60)
scalars = texts | ints | st.booleans() | floats | st.none()
odd = st.sampled_from([Path("/tmp/x y"), Decimal("1.50"), b"raw", {3, 1}, Weird("w\"x"), Level.HIGH, complex(1, -2)])
keys = texts | st.integers() | st.booleans() | st.none() | floats
json_like = st.recursive(
    scalars | odd,
    lambda inner: st.lists(inner, max_size=3)
    | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(keys, inner, max_size=3)
    | st.dictionaries(texts, inner, max_size=2).map(OrderedDict),
    max_leaves=12,
)
names = texts | st.sampled_from(["connection", "delivery", "recv_frame", "READY"])


@settings(max_examples=600, deadline=None)
@given(
    ts=floats | st.integers(),
    machine=names,
    instance_id=names | st.integers(),
    event=names,
    source=names,
    target=names,
    user=names | st.none(),
    context_id=names | st.none(),
    values=st.dictionaries(texts, ints | st.booleans() | texts | floats | st.none() | odd, max_size=4),
    detail=st.none() | st.dictionaries(keys, json_like, max_size=4),
)
def test_lines_are_byte_identical_to_json_dumps(
    ts: Any, machine: Any, instance_id: Any, event: Any, source: Any, target: Any,
    user: Any, context_id: Any, values: Any, detail: Any,
) -> None:
    stream = FakeStream()
    writer = AuditWriter(stream)
    transition = stub(event, source, target)
    expected = reference(ts, machine, instance_id, transition, values, user, context_id, detail)
    returned = writer.record(
        machine, instance_id, transition, values, user=user, context_id=context_id, detail=detail, ts=ts
    )
    assert stream.text == expected  # no running loop: written at once
    assert json.dumps(returned, separators=(",", ":"), default=str) + "\n" == expected


def no_fallback(line: Any) -> str:
    raise AssertionError(f"took the json.dumps fallback for {line!r}")


@settings(max_examples=400, deadline=None)
@given(
    ts=st.floats(allow_nan=False, allow_infinity=False),
    ids=st.tuples(texts, texts, texts, texts, texts, texts | st.none(), texts | st.none()),
    values=st.dictionaries(texts, ints | st.booleans() | texts, max_size=4),
    detail=st.dictionaries(
        texts,
        st.recursive(
            texts | ints | st.booleans() | st.none() | st.floats(allow_nan=False, allow_infinity=False),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
            max_leaves=8,
        ),
        max_size=4,
    ),
)
def test_the_lines_the_server_writes_take_the_fast_path(ts: float, ids: Any, values: Any, detail: Any) -> None:
    machine, instance_id, event, source, target, user, context_id = ids
    transition = stub(event, source, target)
    expected = reference(ts, machine, instance_id, transition, values, user, context_id, detail)
    stream = FakeStream()
    writer = AuditWriter(stream)
    original = audit._json_line
    audit._json_line = no_fallback
    try:
        writer.record(machine, instance_id, transition, values, user=user, context_id=context_id, detail=detail, ts=ts)
    finally:
        audit._json_line = original
    assert stream.text == expected


ORDINARY: dict[str, Any] = {
    "ts": 1747000000.5,
    "machine": "delivery",
    "instance_id": "c1:7",
    "user": "alice",
    "context_id": "c1",
    "values": {"attempt": 1, "acked": False},
    "detail": {"code": 4408, "why": "slow"},
}
UNUSUAL: list[tuple[str, Any]] = [
    ("ts", float("nan")),
    ("ts", float("inf")),
    ("ts", -float("inf")),
    ("ts", 1747000000),
    ("ts", Decimal("1.5")),
    ("machine", None),
    ("instance_id", 7),
    ("instance_id", ["c1", 7]),
    ("user", Weird("al\"ice")),
    ("values", {"attempt": float("nan")}),
    ("values", {"attempt": Level.HIGH}),
    ("values", {"attempt": 2.5e-7}),
    ("values", {"attempt": None}),
    ("values", {7: 1}),
    ("detail", {"code": float("-inf")}),
    ("detail", {"code": Path("/tmp/x")}),
    ("detail", {"nested": OrderedDict(b=1, a=2)}),
    ("detail", {None: 1, True: 2, 1.5: 3}),
    ("detail", {"seq": (1, [2, {"x": ()}])}),
    ("detail", {"set": {1}}),
]


@pytest.mark.parametrize(("field", "value"), UNUSUAL, ids=[f"{f}={v!r}" for f, v in UNUSUAL])
def test_one_unusual_value_in_an_ordinary_line_is_written_as_json_would(field: str, value: Any) -> None:
    args = {**ORDINARY, field: value}
    stream = FakeStream()
    writer = AuditWriter(stream)
    transition = stub("send", "QUEUED", "SENT")
    writer.record(
        args["machine"], args["instance_id"], transition, args["values"],
        user=args["user"], context_id=args["context_id"], detail=args["detail"], ts=args["ts"],
    )
    assert stream.text == reference(
        args["ts"], args["machine"], args["instance_id"], transition, args["values"],
        args["user"], args["context_id"], args["detail"],
    )


def test_traced_machine_lines_are_canonical_json(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = AuditWriter(path)
    ctx = TracedMachine(context_machine(2), "context", 'c"1', writer, user="ålice", context_id='c"1')
    ctx.fire("create", {"why": "tab\t", "n": [1, 2.5, None]}, account_full=False)
    ctx.fire("detach", {"inputs": "overwritten in place, as before"}, account_full=True)
    writer.close()
    raw = path.read_text().splitlines(keepends=True)
    assert len(raw) == 2
    for text in raw:
        line = json.loads(text)
        assert text == json.dumps(line, separators=(",", ":")) + "\n"
    assert json.loads(raw[1])["detail"] == {"inputs": {"account_full": True}}


def test_the_name_cache_stays_bounded() -> None:
    stream = FakeStream()
    writer = AuditWriter(stream)
    for i in range(audit._CACHE_MAX + 10):
        writer.record("delivery", f"c1:{i}", stub(), {}, user=None, context_id="c1", ts=1.5)
        assert len(audit._names) <= audit._CACHE_MAX
    lines = stream.text.splitlines()
    assert json.loads(lines[-1])["id"] == f"c1:{audit._CACHE_MAX + 9}" and json.loads(lines[-1])["user"] is None


def test_deep_and_circular_detail_behave_as_json_does() -> None:
    deep: Any = 1
    for _ in range(700):  # deeper than the fast encoder's recursion, within json's
        deep = [deep]
    stream = FakeStream()
    writer = AuditWriter(stream)
    writer.record("run", "r1", stub(), {}, user=None, context_id=None, detail={"d": deep}, ts=2.0)
    assert stream.text == reference(2.0, "run", "r1", stub(), {}, None, None, {"d": deep})
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular reference"):
        writer.record("run", "r1", stub(), {}, user=None, context_id=None, detail=loop, ts=2.0)
    assert stream.text.count("\n") == 1  # nothing written for a line that could not be encoded


# -- buffering: one write per loop turn ---------------------------------------------------------------------


async def test_a_loop_turn_is_one_write() -> None:
    stream = FakeStream()
    writer = AuditWriter(stream)
    for i in range(100):
        note(writer, f"e{i}")
    assert stream.writes == []  # buffered until the turn ends
    await asyncio.sleep(0)
    assert len(stream.writes) == 1 and stream.flushes == 1
    assert stream.events() == [f"e{i}" for i in range(100)]
    note(writer, "next")
    await asyncio.sleep(0)
    assert len(stream.writes) == 2 and stream.events()[-1] == "next"


def test_without_a_loop_every_record_is_written_at_once() -> None:
    stream = FakeStream()
    writer = AuditWriter(stream)
    for i in range(3):
        note(writer, f"e{i}")
        assert len(stream.writes) == i + 1 and stream.flushes == i + 1


async def test_explicit_flush_writes_the_buffer_and_an_empty_flush_does_nothing() -> None:
    stream = FakeStream()
    writer = AuditWriter(stream)
    note(writer, "a")
    note(writer, "b")
    writer.flush()
    assert stream.writes and stream.events() == ["a", "b"] and len(stream.writes) == 1
    writer.flush()
    await asyncio.sleep(0)  # the scheduled flush finds nothing
    assert (len(stream.writes), stream.flushes) == (1, 1)


async def test_a_big_turn_is_written_before_it_ends() -> None:
    stream = FakeStream()
    writer = AuditWriter(stream)
    for i in range(AuditWriter.MAX_LINES):
        note(writer, f"e{i}")
    assert stream.writes == []
    note(writer, "over")
    assert len(stream.writes) == 1 and stream.events()[-1] == "over"
    note(writer, "big", blob="x" * AuditWriter.MAX_BYTES)
    assert len(stream.writes) == 2 and stream.events()[-1] == "big"
    await asyncio.sleep(0)
    assert len(stream.writes) == 2


async def test_a_thread_without_a_loop_writes_at_once() -> None:
    stream = FakeStream()
    writer = AuditWriter(stream)
    note(writer, "loop")
    worker = threading.Thread(target=note, args=(writer, "thread"))
    worker.start()
    worker.join()  # blocks the loop: the scheduled flush has not run
    assert stream.events() == ["loop", "thread"]


def test_a_flush_scheduled_on_a_loop_that_died_does_not_strand_lines() -> None:
    stream = FakeStream()
    writer = AuditWriter(stream)

    async def record_then_stop() -> None:
        note(writer, "a")
        asyncio.get_running_loop().stop()  # the scheduled flush never runs

    dead = asyncio.new_event_loop()
    task = dead.create_task(record_then_stop())
    dead.run_forever()
    dead.close()
    assert task.done() and stream.writes == []

    async def next_loop() -> None:
        note(writer, "b")
        await asyncio.sleep(0)

    asyncio.run(next_loop())
    assert stream.events() == ["a", "b"]


def test_threads_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = AuditWriter(path)

    def burst(n: int) -> None:
        for i in range(300):
            writer.record("run", f"t{n}", stub(f"e{i}"), {"i": i}, user=None, context_id=None, detail={"pad": "x" * 50})

    workers = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(previous)
    writer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 1200
    for n in range(4):
        assert [line["vars"]["i"] for line in lines if line["id"] == f"t{n}"] == list(range(300))


async def test_close_flushes_the_buffer(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = AuditWriter(path)
    note(writer, "last")
    writer.close()
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["last"]
    assert not writer.enabled
    await asyncio.sleep(0)  # the flush scheduled before close finds a closed writer
    note(writer, "after close")
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["last"]


# -- failures: fail-safe; lines kept and retried in order, surfaced by flush, failing and the log --------


def test_a_failed_write_keeps_the_lines_in_order_and_only_flush_raises() -> None:
    stream = FakeStream()
    writer = AuditWriter(stream)
    note(writer, "ok")
    assert not writer.failing
    stream.fail = enospc()
    note(writer, "a")  # the write fails: the transition happened, record does not raise
    assert writer.failing and writer.pending == 1
    note(writer, "b")  # still failing: retried, buffered behind "a"
    assert writer.failing and writer.pending == 2
    with pytest.raises(AuditWriteFailed) as info:
        writer.flush()
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert info.value.pending == 2
    assert stream.events() == ["ok"]
    stream.fail = None
    writer.flush()
    assert stream.events() == ["ok", "a", "b"] and len(stream.writes) == 2
    assert not writer.failing and writer.pending == 0
    note(writer, "c")
    assert stream.events() == ["ok", "a", "b", "c"]


def test_a_traced_machine_keeps_firing_while_the_log_fails() -> None:
    stream = FakeStream()
    writer = AuditWriter(stream)
    conn = TracedMachine(CONNECTION, "connection", "s1", writer)
    stream.fail = enospc()
    conn.fire("recv_init")
    conn.fire("recv_frame", {"type": "ack"})  # would never be reached if the first fire raised
    assert conn.state.name == "INITIALISING" and writer.failing
    stream.fail = None
    writer.flush()
    assert stream.events() == ["recv_init", "recv_frame"]


async def test_a_failing_log_is_retried_once_per_turn_and_heals_at_the_next_turn() -> None:
    stream = FakeStream()
    writer = AuditWriter(stream)
    attempts = 0
    real_write = stream.write

    def counting_write(text: str) -> int:
        nonlocal attempts
        attempts += 1
        return real_write(text)

    stream.write = counting_write  # type: ignore[method-assign]
    stream.fail = enospc()
    note(writer, "a")
    await asyncio.sleep(0)  # the scheduled flush fails: held, no raise
    assert (attempts, writer.failing, writer.pending) == (1, True, 1)
    for i in range(AuditWriter.MAX_LINES + 10):
        note(writer, f"e{i}")  # over MAX_LINES, but failing: no retry per record
    assert attempts == 1
    await asyncio.sleep(0)
    assert attempts == 2 and writer.failing and writer.pending == AuditWriter.MAX_LINES + 11
    stream.fail = None
    note(writer, "b")  # buffered for the turn, like any line
    assert stream.events() == []
    await asyncio.sleep(0)
    assert stream.events() == ["a", *[f"e{i}" for i in range(AuditWriter.MAX_LINES + 10)], "b"]
    assert not writer.failing and attempts == 3


async def test_an_episode_is_logged_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = FakeStream()
    writer = AuditWriter(stream)
    stream.fail = enospc()
    with caplog.at_level(logging.INFO, logger="pipeproof.audit"):
        for turn in range(5):
            note(writer, f"a{turn}")
            await asyncio.sleep(0)  # a failed scheduled flush per turn
        with pytest.raises(AuditWriteFailed):
            writer.flush()
        note(writer, "b")
        stream.fail = None
        await asyncio.sleep(0)
        note(writer, "c")
        await asyncio.sleep(0)
        stream.fail = enospc()  # a second episode is logged again
        note(writer, "d")
        await asyncio.sleep(0)
    logged = [r for r in caplog.records if r.name == "pipeproof.audit"]
    assert [r.levelno for r in logged] == [logging.ERROR, logging.WARNING, logging.ERROR]
    assert logged[0].exc_info is not None and logged[0].exc_info[0] is AuditWriteFailed
    assert isinstance(logged[0].exc_info[1].__cause__, OSError)
    assert stream.events() == ["a0", "a1", "a2", "a3", "a4", "b", "c"]


def test_a_full_backlog_makes_record_raise_and_drop_its_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AuditWriter, "BACKLOG_MAX", 5)
    stream = FakeStream()
    writer = AuditWriter(stream)
    stream.fail = enospc()
    for i in range(5):
        note(writer, f"e{i}")  # held, no raise, up to the cap
    assert writer.pending == 5
    with pytest.raises(AuditWriteFailed, match="backlog full") as info:
        note(writer, "dropped")
    assert isinstance(info.value.__cause__, OSError) and info.value.pending == 5
    assert writer.pending == 5  # memory stays bounded: the line is not kept
    stream.fail = None
    note(writer, "next")  # at the cap, but the retry succeeds: kept and written
    assert stream.events() == ["e0", "e1", "e2", "e3", "e4", "next"] and not writer.failing


def test_a_failed_stream_flush_is_held_without_duplicating_lines() -> None:
    stream = FakeStream()
    writer = AuditWriter(stream)
    stream.fail_flush = enospc()
    note(writer, "a")  # write() took the line: the stream holds it now; no raise
    assert writer.failing and writer.pending == 0
    with pytest.raises(AuditWriteFailed) as info:
        writer.flush()  # failed: an empty buffer still retries the stream's flush
    assert info.value.pending == 0
    stream.fail_flush = None
    writer.flush()
    assert not writer.failing
    note(writer, "b")
    assert stream.events() == ["a", "b"] and stream.flushes == 2


class FlakyFile:
    """Stands in for the owned FileIO: accepts ``budget`` bytes (``chunk`` per call at most), then
    raises ENOSPC; ``budget=None`` is a healthy disk."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.budget: int | None = None
        self.chunk = 1 << 30
        self.calls = 0

    def write(self, data: bytes | memoryview) -> int:
        self.calls += 1
        if self.budget == 0:
            raise enospc()
        n = min(len(data), self.chunk, self.budget if self.budget is not None else len(data))
        self.data += bytes(data[:n])
        if self.budget is not None:
            self.budget -= n
        return n

    def close(self) -> None:
        pass


def owned_with(tmp_path: Path, raw: FlakyFile) -> AuditWriter:
    writer = AuditWriter(tmp_path / "audit.jsonl")
    assert writer._raw is not None
    writer._raw.close()
    writer._raw = raw  # type: ignore[assignment]
    return writer


def test_a_partial_write_of_the_owned_file_is_resumed_not_repeated(tmp_path: Path) -> None:
    raw = FlakyFile()
    writer = owned_with(tmp_path, raw)
    raw.budget = 10  # ten bytes of the first line reach the disk, then it is full
    note(writer, "a")
    assert bytes(raw.data) == reference_note("a")[:10].encode()
    assert writer.failing and writer.pending == 1
    calls = raw.calls
    note(writer, "b")  # retried: one write attempt for the held bytes; "b" is not copied behind them
    assert raw.calls == calls + 1 and writer.pending == 2
    with pytest.raises(AuditWriteFailed) as info:
        writer.flush()
    assert info.value.pending == 2
    raw.budget = None
    writer.flush()
    assert raw.data.decode() == reference_note("a") + reference_note("b")
    assert not writer.failing and writer.pending == 0


async def test_a_partial_retry_counts_the_lines_still_held(tmp_path: Path) -> None:
    raw = FlakyFile()
    writer = owned_with(tmp_path, raw)
    note(writer, "a")
    note(writer, "b")
    raw.budget = 0
    with pytest.raises(AuditWriteFailed) as info:
        writer.flush()  # one write for both lines fails: they are held as bytes
    assert info.value.pending == 2
    note(writer, "c")
    assert writer.pending == 3
    raw.budget = len(reference_note("a")) + 3  # the held "a" and three bytes of "b"
    with pytest.raises(AuditWriteFailed) as info:
        writer.flush()
    assert info.value.pending == 2 and writer.pending == 2  # "b" (partly written) and "c"
    raw.budget = None
    await asyncio.sleep(0)  # the turn's scheduled flush retries and heals
    assert raw.data.decode() == reference_note("a") + reference_note("b") + reference_note("c")
    assert not writer.failing


def test_short_writes_of_the_owned_file_are_continued(tmp_path: Path) -> None:
    raw = FlakyFile()
    raw.chunk = 7
    writer = owned_with(tmp_path, raw)
    note(writer, "a")
    assert raw.data.decode() == reference_note("a") and raw.calls > 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_held_and_close_still_closes() -> None:
    writer = AuditWriter(Path("/dev/full"))
    note(writer, "a")
    assert writer.failing
    with pytest.raises(AuditWriteFailed) as info:
        writer.flush()
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    raw = writer._raw
    with pytest.raises(AuditWriteFailed):
        writer.close()
    assert raw is not None and raw.closed and not writer.enabled and not writer.failing
