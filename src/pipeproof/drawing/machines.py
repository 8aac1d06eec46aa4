"""One DOT graph per machine, derived from its declaration (DESIGN.md: the DOT diagram is derived).

Read docs/diagrams.md for the visual language. In short: left to right; states are rounded boxes,
the initial state has an arrow from a dot, terminal states have a double border; every
transition is one edge labelled ``event [guard]``, ``/ updates``, what it sends on the wire and
the invariants that constrain it; colours follow ``Kind`` (happy path, error, timeout,
escalation, housekeeping); an edge the explorer never fired is grey and dashed. Happy edges
weigh more, so the happy path forms the spine and error paths fan out below it toward the
terminal states, which share the last rank.

The same drawing, given a counterexample, highlights the failing path (step numbers on the
edges it took) and the mutant's delta (added or changed edges in bold red, dropped edges
dotted). Output is a deterministic function of its arguments: no timestamps, no set iteration.
"""

from __future__ import annotations

import enum
import html
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import graphviz

from pipeproof.model.spec import Kind, Machine, Transition

FONT = "Helvetica"

KIND_COLOURS: dict[Kind, str] = {
    Kind.HAPPY: "#1e8449",
    Kind.ERROR: "#c0392b",
    Kind.TIMEOUT: "#d35400",
    Kind.ESCALATION: "#7d3c98",
    Kind.HOUSEKEEPING: "#566573",
}
KIND_WORDS: dict[Kind, str] = {
    Kind.HAPPY: "happy path",
    Kind.ERROR: "error path",
    Kind.TIMEOUT: "timeout",
    Kind.ESCALATION: "escalation",
    Kind.HOUSEKEEPING: "housekeeping",
}
UNCOVERED = "#aab7b8"
PATH = "#1f5fbf"
MUTANT = "#e0115f"
STATE_FILL = "#f4f6f7"
PATH_FILL = "#d6e6fa"


@dataclass(frozen=True)
class Highlight:
    """A counterexample drawn on a machine: which edges it took (1-based step numbers), and
    the mutant's delta against the real declaration."""

    steps: Mapping[str, Sequence[str]] = field(default_factory=dict)  # transition key -> step labels
    states: Collection[str] = ()  # states the path visited in this machine
    added: Collection[str] = ()  # keys added or changed by the mutant
    dropped: Sequence[Transition] = ()  # transitions the mutant removed (drawn as ghosts)
    caption: str = ""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _edge_label(t: Transition, *, fired: bool, invariants: bool, note: str = "") -> str:
    head = f"<B>{_esc(t.event)}</B>"
    if t.guard.render() != "true":
        head += f" [{_esc(t.guard.render())}]"
    lines = [head]
    if t.updates:
        # Updates are lifted to Expr when the Transition is built (model/spec.py __post_init__).
        lines.append("/ " + _esc(", ".join(f"{n} := {e.render()}" for n, e in t.updates)))  # type: ignore[union-attr]
    if t.emits:
        lines.append(f"<I>sends {_esc(str(t.emits))}</I>")
    if invariants and t.invariants:
        lines.append(f'<FONT POINT-SIZE="8">checks: {_esc(", ".join(t.invariants))}</FONT>')
    if not fired:
        lines.append('<FONT POINT-SIZE="8">never fired by the explorer</FONT>')
    if note:
        lines.append(note)
    return "<" + "<BR/>".join(lines) + ">"


def _legend(highlight: Highlight | None) -> str:
    rows = ['<TR><TD COLSPAN="2" ALIGN="LEFT"><B>legend</B></TD></TR>']
    for kind in Kind:
        rows.append(_swatch(KIND_COLOURS[kind], KIND_WORDS[kind]))
    rows.append(_swatch(UNCOVERED, "never fired by the explorer (dashed)"))
    if highlight is not None:
        rows.append(_swatch(PATH, "the counterexample's path (step numbers)"))
        rows.append(_swatch(MUTANT, "the mutant's delta (dotted: dropped)"))
    rows.append('<TR><TD COLSPAN="2" ALIGN="LEFT">&#9679;&#8594; initial state; double border: terminal</TD></TR>')
    return '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="2" CELLPADDING="1">' + "".join(rows) + "</TABLE>>"


def _swatch(colour: str, words: str) -> str:
    return (f'<TR><TD BGCOLOR="{colour}" WIDTH="26" HEIGHT="5" FIXEDSIZE="TRUE"></TD>'
            f'<TD ALIGN="LEFT">{_esc(words)}</TD></TR>')


def _title(machine: Machine, invariants: Sequence[str], fired: int, total: int, highlight: Highlight | None,
           coverage_known: bool) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted(machine.params.items()))
    lines = [f'<FONT POINT-SIZE="16"><B>{_esc(machine.name)}</B></FONT>'
             + (f"  (docs/protocol.md section {_esc(machine.section)})" if machine.section else "")]
    if machine.doc:
        lines.append(_esc(machine.doc))
    if params:
        where = "the counterexample's scenario" if highlight is not None else "the explorer's default bounds"
        lines.append(f"parameters at {where}: {_esc(params)}")
    if invariants:
        lines.append(f"invariants: {_esc(', '.join(invariants))}")
    if highlight is not None:
        if highlight.caption:
            lines.append(f'<FONT COLOR="{PATH}">{_esc(highlight.caption)}</FONT>')
    elif coverage_known:
        lines.append(f"explorer coverage: {fired} of {total} transitions fired")
    return "<" + "<BR ALIGN=\"LEFT\"/>".join(lines) + '<BR ALIGN="LEFT"/>>'


def machine_dot(
    machine: Machine,
    *,
    coverage: Collection[str] | None,
    invariants: Sequence[str] = (),
    highlight: Highlight | None = None,
) -> str:
    """DOT source for ``machine``. ``coverage``: transition keys the explorer fired (None: unknown,
    drawn as all fired); ``invariants``: the machine's invariant names, for the title."""
    name = machine.name if highlight is None else f"{machine.name}_counterexample"
    g = graphviz.Digraph(name=name)
    g.attr("graph", rankdir="LR", fontname=FONT, fontsize="11", labelloc="t", labeljust="l", nodesep="0.3",
           ranksep="0.55", newrank="true", pad="0.2", bgcolor="white",
           label=_title(machine, invariants, _count_fired(machine, coverage), len(machine.transitions),
                        highlight, coverage is not None))
    g.attr("node", fontname=FONT, fontsize="12", shape="box", style="rounded,filled", fillcolor=STATE_FILL,
           color="#34495e", penwidth="1.3", margin="0.15,0.06")
    g.attr("edge", fontname=FONT, fontsize="9", arrowsize="0.7", penwidth="1.3")

    happy_states = {s.name for t in machine.transitions if t.kind is Kind.HAPPY for s in (t.source, t.target)}
    visited = set(highlight.states) if highlight else set()
    g.node("__start", label="", shape="point", width="0.14", style="filled", fillcolor="black")
    for s in machine.states:
        attrs = {"tooltip": _state_tooltip(machine, s)}
        if s in machine.terminal:
            attrs["peripheries"] = "2"
        if s.name in happy_states:
            attrs["group"] = "happy"  # keeps the happy path on one straight line
        if s.name in visited:
            attrs["fillcolor"] = PATH_FILL
            attrs["color"] = PATH
            attrs["penwidth"] = "2"
        loops = [t for t in machine.transitions if t.source is s and t.target is s]
        g.node(s.name, label=_state_label(s.name, loops, coverage, highlight) if loops else s.name, **attrs)
    g.edge("__start", machine.initial.name, weight="10")

    sinks = [s.name for s in machine.states
             if s in machine.terminal and s is not machine.initial and not machine.transitions_from(s)]
    if sinks:
        with g.subgraph() as sub:
            sub.attr(rank="sink")
            for name in sinks:
                sub.node(name)

    for t in machine.transitions:
        if t.source is not t.target:
            g.edge(t.source.name, t.target.name, **_edge_attrs(t, coverage, highlight))
    if highlight is not None:
        for t in highlight.dropped:
            g.edge(t.source.name, t.target.name, label=_edge_label(
                t, fired=True, invariants=False, note=f'<FONT COLOR="{MUTANT}"><B>dropped by the mutant</B></FONT>'),
                color=MUTANT, fontcolor=MUTANT, style="dotted", penwidth="2", weight="0", constraint="false")

    g.node("legend", label=_legend(highlight), shape="plaintext", fontsize="9")
    text: str = g.source
    return text


def _state_label(name: str, loops: Sequence[Transition], coverage: Collection[str] | None,
                 highlight: Highlight | None) -> str:
    """A state with its self-loops listed inside its box, one row each (marked with a circular
    arrow): graphviz stacks several labelled self-loops on one node into an unreadable knot."""
    rows = [f'<TR><TD><FONT POINT-SIZE="13"><B>{_esc(name)}</B></FONT></TD></TR>']
    for t in loops:
        attrs = _edge_attrs(t, coverage, highlight)
        colour = attrs["fontcolor"]
        body = attrs["label"][1:-1]  # strip the outer <...> of the HTML label
        bg = f' BGCOLOR="{PATH_FILL}"' if highlight is not None and highlight.steps.get(t.key) else ""
        border = ' SIDES="T" BORDER="1" COLOR="#d5d8dc"'
        rows.append(f'<TR><TD ALIGN="LEFT" BALIGN="LEFT"{border}{bg}><FONT COLOR="{colour}" POINT-SIZE="9">'
                    f"&#8635; {body}</FONT></TD></TR>")
    return '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="3">' + "".join(rows) + "</TABLE>>"


def _count_fired(machine: Machine, coverage: Collection[str] | None) -> int:
    if coverage is None:
        return len(machine.transitions)
    return sum(1 for t in machine.transitions if t.key in coverage)


def _state_tooltip(machine: Machine, s: enum.Enum) -> str:
    words = []
    if s is machine.initial:
        words.append("initial")
    if s in machine.terminal:
        words.append("terminal")
    return f"{machine.name} {s.name}" + (f" ({', '.join(words)})" if words else "")


def _edge_attrs(t: Transition, coverage: Collection[str] | None, highlight: Highlight | None) -> dict[str, str]:
    colour = KIND_COLOURS[t.kind]
    fired = coverage is None or t.key in coverage or highlight is not None
    attrs = {
        "color": colour,
        "fontcolor": colour,
        "weight": "4" if t.kind is Kind.HAPPY else "1",
        "tooltip": f"{t.key}: {t.doc}" if t.doc else t.key,
    }
    note = ""
    if highlight is not None:
        steps = highlight.steps.get(t.key, ())
        mutated = t.key in highlight.added
        if steps:
            attrs.update(color=PATH, fontcolor=PATH, penwidth="3.2")
            note = f'<FONT COLOR="{PATH}"><B>step {_esc(", ".join(steps))}</B></FONT>'
        else:
            # Off the path: keep the kind's colour, faded, so the path stands out.
            attrs.update(color=colour + "55", fontcolor=colour + "99")
        if mutated:
            attrs.update(color=MUTANT if not steps else f"{PATH}:{MUTANT}", penwidth="3.2", style="bold")
            note = (note + "<BR/>" if note else "") + f'<FONT COLOR="{MUTANT}"><B>mutant</B></FONT>'
    elif not fired:
        attrs.update(color=UNCOVERED, fontcolor=UNCOVERED, style="dashed")
    attrs["label"] = _edge_label(t, fired=fired, invariants=highlight is None, note=note)
    return attrs
