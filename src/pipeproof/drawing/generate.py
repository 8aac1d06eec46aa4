"""Build every file of ``diagrams/`` in memory, write it, or check a committed tree for drift.

(docs/diagrams.md, "drift check".) Files fall in two classes:

* *sources*: DOT graphs, HTML pages, sequence-diagram SVGs, JSON Schemas, the AsyncAPI document,
  the README. They are pure functions of the model, the record and impl/frames.py, and are
  compared byte for byte on every machine;
* *renderings*: what graphviz's ``dot`` makes of the DOT sources (SVG, PNG). Graphviz output is
  deterministic for one graphviz version but differs between versions, so ``renderings.json``
  records the version that made them (and their SHA-256), and they are compared only when the
  installed version equals the recorded one; otherwise they are reported as skipped, not
  compared. Without ``dot`` the sources are still written and the renderings skipped, with the
  install command.

The record (``verdicts.json``) is not regenerated here (that is ``--refresh``); the check
compares its fingerprint with the current model's instead.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeproof.drawing import machines as draw
from pipeproof.drawing import protocol, report, sequence
from pipeproof.drawing.record import (
    RECORD_NAME,
    STALE_MESSAGE,
    MutantEntry,
    Record,
    TraceData,
    fingerprint,
    machine_digest,
    scenario_bounds,
    transition_digest,
)
from pipeproof.drawing.source import MACHINE_ORDER, Source, machines_of
from pipeproof.model.spec import Machine

RENDERINGS_NAME = "renderings.json"
INSTALL_HINT = (
    "install graphviz to render them: `apt-get install graphviz` (Debian/Ubuntu), "
    "`brew install graphviz` (macOS), then run `pipeproof diagrams` again"
)
README = """# diagrams/ (generated: do not edit)

Written by `pipeproof diagrams` from the model (pipeproof/model), the verification record
`verdicts.json` (written by `pipeproof diagrams --refresh`) and pipeproof/impl/frames.py.
Open `index.html` in a browser. `pipeproof diagrams --check` (run by CI) fails when anything here
differs from what the model produces. How to read the diagrams: docs/diagrams.md.

- `machines/`: one state diagram per machine (DOT source, SVG and PNG renderings)
- `counterexamples/`: every mutant's shortest counterexample, as a sequence diagram and as the
  failing path on the mutated machine's state graph
- `protocol/`: JSON Schemas of every frame and the AsyncAPI 3 document of `/v1/ws`
- `verdicts.json`: the checkers' verdicts, coverage, counterexamples and the model fingerprint
- `renderings.json`: the graphviz version that rendered the SVG/PNG files, and their hashes
"""


@dataclass(frozen=True)
class Rendering:
    path: str  # relative path of the SVG or PNG
    dot: str  # the DOT source
    fmt: str  # svg | png


@dataclass
class Plan:
    """Every generated file: sources (bytes) and renderings (to be made by dot)."""

    sources: dict[str, bytes] = field(default_factory=dict)
    renderings: list[Rendering] = field(default_factory=list)

    def expected(self) -> set[str]:
        return {*self.sources, *(r.path for r in self.renderings), RENDERINGS_NAME, RECORD_NAME}


# -- counterexample graphs -----------------------------------------------------------------------------


def _by_name(machines: tuple[Machine, ...]) -> dict[str, Machine]:
    return {m.name: m for m in machines}


def _highlight_for(trace: TraceData, machine: Machine, base: Machine | None, caption: str) -> draw.Highlight:
    steps: dict[str, list[str]] = {}
    states: set[str] = set()
    for n, step in enumerate(trace.steps, 1):
        for f in step.firings:
            if f.machine != machine.name or f.event == "append":
                continue
            who = "".join(f"{'s' if f.family == 'conn' else 'u'}{i}" for i in f.index[:1])
            steps.setdefault(f.key, []).append(f"{n} ({who})" if who else str(n))
            states.update((f.source, f.target))
    added: set[str] = set()
    dropped: list = []  # type: ignore[type-arg]
    if base is not None:
        base_digest = {t.key: transition_digest(t) for t in base.transitions}
        added = {t.key for t in machine.transitions if base_digest.get(t.key) != transition_digest(t)}
        keys = {t.key for t in machine.transitions}
        dropped = [t for t in base.transitions if t.key not in keys]
    return draw.Highlight(steps=steps, states=sorted(states), added=sorted(added), dropped=tuple(dropped),
                          caption=caption)


def _focus_machine(trace: TraceData, source: Source, candidates: dict[str, Machine], changed: list[str]) -> str:
    """The machine to draw a counterexample on: the mutated one; else the violated invariant's;
    else the machine of the trace's last component transition."""
    if changed:
        return changed[0]
    inv = next((i for i in source.invariants if i.name == trace.prop), None)
    if inv is not None and inv.machine in candidates:
        return inv.machine
    for step in reversed(trace.steps):
        for f in reversed(step.firings):
            if f.event != "append":
                return f.machine
    return MACHINE_ORDER[0]


def _counterexample_files(plan: Plan, source: Source, record: Record) -> tuple[dict[str, str], dict[str, str]]:
    links: dict[str, str] = {}
    failing_links: dict[str, str] = {}
    mutants = {m.name: m for m in source.mutants}
    for entry in record.mutants:
        if entry.counterexample is None or entry.name not in mutants:
            continue
        mutant = mutants[entry.name]
        bounds = scenario_bounds(source, entry.scenario)
        base = _by_name(machines_of(source.model(bounds)))
        broken = _by_name(machines_of(source.mutant_model(mutant, bounds)))
        changed = [n for n in MACHINE_ORDER if machine_digest(base[n]) != machine_digest(broken[n])]
        focus = _focus_machine(entry.counterexample, source, broken, changed)
        caption = (f"mutant {entry.name} on the {focus} machine: the counterexample's path in blue, "
                   f"the mutant's delta in red" if changed else
                   f"mutant {entry.name} (a change to the system glue, no machine changed): "
                   f"the counterexample's path on the {focus} machine")
        stem = f"counterexamples/{entry.name}"
        links[entry.name] = f"{stem}.html"
        _add_counterexample(plan, stem, entry.counterexample, broken[focus], base[focus], caption,
                            f"mutant {entry.name}: {entry.prop} violated", _mutant_facts(entry, focus))
    machines = _by_name(source.machines())
    for trace in record.failing:
        focus = _focus_machine(trace, source, machines, [])
        stem = f"counterexamples/check-{trace.prop}"
        failing_links[trace.prop] = f"{stem}.html"
        caption = f"the counterexample's path on the {focus} machine (the real model)"
        facts = [("property", trace.prop), ("found by", trace.checker), ("scenario", trace.scenario),
                 ("message", trace.message)]
        _add_counterexample(plan, stem, trace, machines[focus], None, caption,
                            f"failing check: {trace.prop} violated", facts)
    return links, failing_links


def _mutant_facts(entry: MutantEntry, focus: str) -> list[tuple[str, str]]:
    assert entry.counterexample is not None
    return [
        ("mutant", entry.name), ("reproduces", entry.seed), ("delta", entry.delta),
        ("property", entry.prop), ("found by", entry.counterexample.checker),
        ("scenario", entry.scenario), ("steps", str(len(entry.counterexample.steps))),
        ("message", entry.counterexample.message), ("drawn on", f"the {focus} machine"),
    ]


def _add_counterexample(plan: Plan, stem: str, trace: TraceData, machine: Machine, base: Machine | None,
                        caption: str, title: str, facts: list[tuple[str, str]]) -> None:
    name = stem.rsplit("/", 1)[-1]
    seq = sequence.sequence_svg(trace, title=title, ident=f"sequence-{name}")
    plan.sources[f"{stem}.sequence.svg"] = seq.encode()
    dot = draw.machine_dot(machine, coverage=None, highlight=_highlight_for(trace, machine, base, caption))
    plan.sources[f"{stem}.path.dot"] = dot.encode()
    plan.renderings.append(Rendering(f"{stem}.path.svg", dot, "svg"))
    page = report.counterexample_html(title=title, facts=facts, trace=trace, sequence_svg=seq,
                                      graph_svg=f"{name}.path.svg", graph_caption=caption)
    plan.sources[f"{stem}.html"] = page.encode()


# -- the plan ----------------------------------------------------------------------------------------


def build(source: Source, record: Record) -> Plan:
    """Every file, in memory. Pure: the same model, record and frames give the same bytes."""
    plan = Plan()
    plan.sources["README.md"] = README.encode()
    machines = source.machines()
    for m in machines:
        invs = [i.name for i in source.invariants if i.machine == m.name]
        cov = record.coverage.get(m.name)
        dot = draw.machine_dot(m, coverage=set(cov) if cov is not None else set(), invariants=invs)
        plan.sources[f"machines/{m.name}.dot"] = dot.encode()
        plan.renderings.append(Rendering(f"machines/{m.name}.svg", dot, "svg"))
        plan.renderings.append(Rendering(f"machines/{m.name}.png", dot, "png"))
    links, failing_links = _counterexample_files(plan, source, record)
    plan.sources.update(protocol.protocol_files())
    plan.sources["index.html"] = report.index_html(
        source, record, protocol.frames(), machines, links, failing_links).encode()
    return plan


# -- graphviz ------------------------------------------------------------------------------------------


def graphviz_version() -> str | None:
    """The installed ``dot``'s version (``2.43.0``), or None when it is not on PATH."""
    import graphviz

    if shutil.which("dot") is None:
        return None
    try:
        return ".".join(str(p) for p in graphviz.version())
    except (graphviz.ExecutableNotFound, graphviz.CalledProcessError, RuntimeError):
        return None


def render(renderings: list[Rendering]) -> dict[str, bytes]:
    """Run ``dot`` for each rendering (in parallel: each is a separate process)."""
    import graphviz

    def one(r: Rendering) -> bytes:
        data: bytes = graphviz.Source(r.dot).pipe(format=r.fmt, engine="dot")
        return data

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip((r.path for r in renderings), pool.map(one, renderings), strict=True))


def renderings_manifest(version: str, files: dict[str, bytes]) -> bytes:
    data = {
        "about": "The graphviz version that rendered the SVG/PNG files and their SHA-256; "
                 "`pipeproof diagrams --check` compares renderings only under this version.",
        "graphviz": version,
        "files": {p: "sha256:" + hashlib.sha256(b).hexdigest() for p, b in sorted(files.items())},
    }
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def recorded_graphviz(out_dir: Path) -> str | None:
    try:
        data = json.loads((out_dir / RENDERINGS_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    version = data.get("graphviz") if isinstance(data, dict) else None
    return version if isinstance(version, str) else None


# -- write -------------------------------------------------------------------------------------------


def _files_under(out_dir: Path) -> set[str]:
    if not out_dir.is_dir():
        return set()
    return {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()}


def _put(path: Path, data: bytes) -> bool:
    """Write only when the bytes differ (unchanged files keep their mtime); True if written."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


@dataclass
class WriteResult:
    written: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # renderings not made (no dot)
    graphviz: str | None = None
    stale_record: bool = False


def write(out_dir: Path, source: Source, record: Record, log: Callable[[str], None] = lambda _m: None
          ) -> WriteResult:
    plan = build(source, record)
    result = WriteResult(graphviz=graphviz_version(), stale_record=record.fingerprint != fingerprint(source))
    files = dict(plan.sources)
    if result.graphviz is not None:
        rendered = render(plan.renderings)
        files.update(rendered)
        files[RENDERINGS_NAME] = renderings_manifest(result.graphviz, rendered)
    else:
        result.skipped = sorted(r.path for r in plan.renderings)
    for rel, data in sorted(files.items()):
        if _put(out_dir / rel, data):
            result.written.append(rel)
        else:
            result.unchanged += 1
    # A generated folder: anything we would not produce is a leftover (a renamed mutant, say).
    for rel in sorted(_files_under(out_dir) - plan.expected()):
        (out_dir / rel).unlink()
        result.removed.append(rel)
    return result


# -- check -------------------------------------------------------------------------------------------


@dataclass
class DriftReport:
    stale_record: str | None = None
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    skipped_reason: str = ""
    compared: int = 0

    @property
    def ok(self) -> bool:
        return not (self.stale_record or self.changed or self.missing or self.unexpected)

    def render(self) -> str:
        lines = []
        if self.stale_record:
            lines.append(self.stale_record)
        for label, paths in (("differs", self.changed), ("missing", self.missing), ("not generated", self.unexpected)):
            lines += [f"  {label}: {p}" for p in paths]
        if self.skipped:
            lines.append(f"  skipped, not compared ({self.skipped_reason}): {len(self.skipped)} renderings"
                         f" ({', '.join(self.skipped[:3])}{', ...' if len(self.skipped) > 3 else ''})")
        return "\n".join(lines)


def check(out_dir: Path, source: Source, record: Record) -> DriftReport:
    """Regenerate in memory and compare with ``out_dir`` (docs/diagrams.md, "drift check")."""
    report_ = DriftReport()
    if record.fingerprint != fingerprint(source):
        report_.stale_record = STALE_MESSAGE
    plan = build(source, record)
    expected: dict[str, bytes] = dict(plan.sources)
    installed, recorded = graphviz_version(), recorded_graphviz(out_dir)
    if installed is not None and installed == recorded:
        rendered = render(plan.renderings)
        expected.update(rendered)
        expected[RENDERINGS_NAME] = renderings_manifest(installed, rendered)
    else:
        report_.skipped = sorted([r.path for r in plan.renderings] + [RENDERINGS_NAME])
        report_.skipped_reason = (
            "graphviz's dot is not installed" if installed is None
            else f"installed graphviz {installed}, the renderings were made with {recorded or 'an unknown version'}"
        )
    for rel, data in sorted(expected.items()):
        path = out_dir / rel
        if not path.is_file():
            report_.missing.append(rel)
        elif path.read_bytes() != data:
            report_.changed.append(rel)
        report_.compared += 1
    report_.unexpected = sorted(_files_under(out_dir) - plan.expected())
    if not (out_dir / RECORD_NAME).is_file():
        report_.missing.append(RECORD_NAME)
    return report_
