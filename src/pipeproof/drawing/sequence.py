"""Counterexample traces as SVG sequence diagrams: client, server and store lanes (docs/diagrams.md).

Graphviz lays out sequence diagrams poorly, so this writes SVG directly: fixed lanes, one row per
message, no external fonts or scripts, output a pure function of the trace (deterministic).

How a model step (model/system.py ``Step``) becomes arrows:

* a client action (``actor == "client"``) is an arrow client -> server named after what the
  client puts on the wire (``connection_init``, a data frame, an ``ack``, ``run.cancel``, or
  dropping the socket);
* a connection transition that ``emits`` something (``connection_ack``, an ``event`` frame, a
  close code) is an arrow server -> client; one that emits nothing is a note on the server lane
  (``auth_ok``: the socket is READY);
* context, event-stream and run transitions (families ``ctx``, ``event``, ``run``) are arrows
  server -> store: that state lives in the durable store (docs/protocol.md sections 3-5);
* a clock step (``tick``) is a band across every lane.

Each row carries, right of the lanes, the component's state before and after, as the explorer
printed it; the last row is the violated property and its message.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from pipeproof.drawing.machines import KIND_COLOURS, MUTANT
from pipeproof.drawing.record import FiringData, StepData, TraceData
from pipeproof.model.spec import Kind

LANES: dict[str, int] = {"client": 110, "server": 400, "store": 690}
LANE_TITLES: dict[str, str] = {
    "client": "client (sessions)",
    "server": "server",
    "store": "store (contexts, streams, runs)",
}
DETAIL_X = 790
ROW = 30
TOP = 96
SANS = "Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
MONO_CHAR = 6.7  # width of one 11 px monospace character, for sizing the canvas
INK = "#2c3e50"
CLOCK = "#7f8c8d"

CLIENT_WORDS: dict[str, str] = {
    "client_init": "connection_init",
    "client_init_resume": "connection_init + resume",
    "client_frame": "data frame",
    "client_drop": "drops the socket",
    "client_ack": "ack",
    "client_cancel": "run.cancel",
}


@dataclass(frozen=True)
class _Row:
    kind: str  # arrow | self | band | violation
    step: int  # 1-based step number, 0 on continuation rows
    frm: str = ""
    to: str = ""
    label: str = ""
    detail: str = ""
    colour: str = INK


def _colour(f: FiringData) -> str:
    return KIND_COLOURS[Kind(f.kind)] if f.kind in {k.value for k in Kind} else INK


def _who(f: FiringData) -> str:
    where = ",".join(str(i) for i in f.index)
    prefix = {"conn": "s", "ctx": "u", "run": "u"}.get(f.family, "")
    if f.family == "event":
        return f"event u{f.index[0]}#{f.index[1]}" if len(f.index) == 2 else f"event {where}"
    return f"{ {'conn': 'session', 'ctx': 'context', 'run': 'run'}.get(f.family, f.family)} {prefix}{where}"


def _detail(f: FiringData) -> str:
    return f"{_who(f)} {f.event}: {f.before} -> {f.after}"


def _rows(trace: TraceData) -> list[_Row]:
    rows: list[_Row] = []
    for n, step in enumerate(trace.steps, 1):
        rows += _step_rows(n, step)
    rows.append(_Row("violation", 0, label=f"{trace.prop} violated", detail=trace.message, colour=MUTANT))
    return rows


def _step_rows(n: int, step: StepData) -> list[_Row]:
    if not step.firings:  # a trace known only as text (Hypothesis or Z3 rows)
        return [_Row("self", n, "server", "server", step.action or "step", step.text)]
    if step.actor == "clock":
        return [_Row("band", n if i == 0 else 0, label="tick: model time passes" if i == 0 else "",
                     detail=_detail(f), colour=CLOCK) for i, f in enumerate(step.firings)]
    rows: list[_Row] = []
    if step.actor == "client":
        label = CLIENT_WORDS.get(step.action, step.action)
        if step.action == "client_ack" and len(step.args) == 3:
            label = f"ack seq {step.args[2]}"
        session = f" (s{step.args[0]})" if step.args else ""
        first = step.firings[0]
        rows.append(_Row("arrow", n, "client", "server", label + session,
                         _detail(first) if first.family == "conn" else step.text, _colour(first)))
        rest = step.firings[1:] if first.family == "conn" else step.firings
        if first.family == "conn" and first.emits:
            rows.append(_Row("arrow", 0, "server", "client", first.emits, "", _colour(first)))
    else:
        rest = step.firings
    for f in rest:
        if f.family == "conn":
            if f.emits:
                rows.append(_Row("arrow", 0, "server", "client", f"{f.emits} (s{f.index[0]})", _detail(f),
                                 _colour(f)))
            else:
                rows.append(_Row("self", 0, "server", "server", f"s{f.index[0]} {f.event} -> {f.target}",
                                 _detail(f), _colour(f)))
        else:
            rows.append(_Row("arrow", 0, "server", "store", f"{_who(f)}: {f.event}", _detail(f), _colour(f)))
    if step.actor == "server" and rows:
        rows[0] = _Row(rows[0].kind, n, rows[0].frm, rows[0].to, rows[0].label, rows[0].detail, rows[0].colour)
    return rows


def _text(x: float, y: float, s: str, *, size: int = 12, colour: str = INK, anchor: str = "start",
          font: str = SANS, weight: str = "normal") -> str:
    return (f'<text x="{x:g}" y="{y:g}" font-family="{font}" font-size="{size}" fill="{colour}" '
            f'text-anchor="{anchor}" font-weight="{weight}">{html.escape(s, quote=False)}</text>')


def sequence_svg(trace: TraceData, *, title: str, ident: str) -> str:
    """A standalone SVG document for ``trace``; ``ident`` becomes the root element's id."""
    rows = _rows(trace)
    longest = max([len(r.detail) for r in rows] + [len(title)])
    width = int(max(DETAIL_X + 40 + longest * MONO_CHAR, 1000))
    height = TOP + ROW * len(rows) + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{html.escape(ident)}" class="sequence" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f"<title>{html.escape(title, quote=False)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        _text(16, 24, title, size=15, weight="bold"),
        _text(16, 42, f"shortest trace found by the {trace.checker}, scenario {trace.scenario}, "
                      f"{len(trace.steps)} steps", size=11, colour="#566573"),
    ]
    bottom = height - 20
    for lane, x in LANES.items():
        out.append(f'<rect x="{x - 80}" y="54" width="160" height="24" rx="5" fill="#eaf2f8" stroke="{INK}"/>')
        out.append(_text(x, 70, LANE_TITLES[lane], size=11, anchor="middle", weight="bold"))
        out.append(f'<line x1="{x}" y1="78" x2="{x}" y2="{bottom}" stroke="#aeb6bf" stroke-dasharray="4 3"/>')
    out.append(_text(DETAIL_X, 70, "component: transition: state before -> after", size=11, colour="#566573"))
    for i, r in enumerate(rows):
        y = TOP + ROW * i + ROW // 2
        if r.step:
            out.append(f'<circle cx="22" cy="{y - 4}" r="10" fill="#f2f3f4" stroke="#aeb6bf"/>')
            out.append(_text(22, y, str(r.step), size=10, anchor="middle"))
        if r.kind == "arrow":
            out += _arrow(LANES[r.frm], LANES[r.to], y, r.label, r.colour)
        elif r.kind == "self":
            x = LANES[r.frm]
            out.append(f'<path d="M{x} {y - 8} h28 v12 h-26" fill="none" stroke="{r.colour}" stroke-width="1.4"/>')
            out.append(f'<polygon points="{x} {y + 4},{x + 7} {y},{x + 7} {y + 8}" fill="{r.colour}"/>')
            out.append(_text(x + 34, y, r.label, size=11, colour=r.colour))
        elif r.kind == "band":
            out.append(f'<rect x="40" y="{y - 13}" width="{DETAIL_X - 60}" height="20" fill="#f4f6f6" '
                       f'stroke="{CLOCK}" stroke-dasharray="2 2"/>')
            if r.label:
                out.append(_text(LANES["server"], y + 1, r.label, size=11, colour=CLOCK, anchor="middle"))
        elif r.kind == "violation":
            out.append(f'<rect x="40" y="{y - 14}" width="{width - 56}" height="24" rx="4" fill="#fdedec" '
                       f'stroke="{r.colour}" stroke-width="1.5"/>')
            out.append(_text(52, y + 3, r.label, size=12, colour=r.colour, weight="bold"))
        if r.detail:
            tx = DETAIL_X if r.kind != "violation" else 52 + len(r.label) * 7.4 + 16.0
            out.append(_text(tx, y + (3 if r.kind == "violation" else 0), r.detail, size=11, font=MONO,
                             colour=r.colour if r.kind == "violation" else INK))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _arrow(x1: int, x2: int, y: int, label: str, colour: str) -> list[str]:
    d = 1 if x2 > x1 else -1
    tip = x2 - d * 2
    return [
        f'<line x1="{x1}" y1="{y}" x2="{tip - d * 8}" y2="{y}" stroke="{colour}" stroke-width="1.6"/>',
        f'<polygon points="{tip} {y},{tip - d * 9} {y - 4.5},{tip - d * 9} {y + 4.5}" fill="{colour}"/>',
        _text((x1 + x2) / 2, y - 5, label, size=11, colour=colour, anchor="middle"),
    ]
