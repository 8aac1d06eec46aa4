"""Checker 4: SPIN on the generated Promela, for bounds the explorer cannot reach (docs/proofs.md,
"The SPIN engine").

``verify(system)`` writes the Promela of model/check/promela.py into a temporary directory, runs
``spin -a`` (pan's C source), compiles pan with ``gcc`` and runs an exhaustive depth-first search
(``-DSAFETY -DNOREDUCE``: one process, so partial-order reduction has nothing to reduce; ``-c0 -e``:
go on after an error and write one trail per violated property). Every trail is replayed by
``spin -t`` with only its own property armed, which prints the ids of the options it took; those
are matched one by one against ``System.successors`` (``replay``), so a SPIN counterexample is
printed as the explorer prints one (``Counterexample``, each step with its actor, action and every
component's change) and only after the Python model confirms the violation. A trail the explorer
cannot follow, or one that does not violate its property, raises :class:`TraceMismatch`: the
encoding disagrees with the model, never a silent pass. The depth-first trail is then shrunk
(``shrink``) to a short one that still replays and still violates.

pan counts one more transition than the explorer (the initial state it stores); ``SpinResult``
reports the explorer's count. A search cut short (depth, memory) is ``complete=False`` with the
reason, and its rows are ``unknown`` unless a violation was found.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeproof.errors import ModelError, PipeproofError
from pipeproof.model.check.checks import Row
from pipeproof.model.check.explorer import QUIESCENCE, Counterexample
from pipeproof.model.check.promela import RANGE, Option, PromelaModel, generate
from pipeproof.model.invariants import BY_NAME, INVARIANTS, quiescent_violations
from pipeproof.model.scenarios import Scenario
from pipeproof.model.system import State, Step, System, SystemModel, reference_model

APT_LINE = "sudo apt-get install spin gcc"
STORAGES = ("hash", "ma", "bitstate")
MIN_HASH_FACTOR = 100.0
"""A bitstate search this sparse (bits per stored state) or sparser misses very few states (pan's own
advice, "best if > 100"); below it a clean search is reported unknown."""


class SpinUnavailable(PipeproofError):
    """``spin`` or ``gcc`` is not installed (or pan could not be built): SPIN cannot decide anything."""

    def __init__(self, program: str, detail: str = "") -> None:
        self.program = program
        self.detail = detail
        super().__init__(f"{program} is not available{': ' + detail if detail else ''}; install it with: {APT_LINE}"
                         " (scripts/setup.sh does this as root)")


class TraceMismatch(ModelError):
    """A SPIN trail the explorer's successor function does not reproduce: the encoding is wrong."""


@dataclass(frozen=True)
class PanOptions:
    """How pan is built and run (docs/proofs.md, "The SPIN engine", memory and depth)."""

    memory_mb: int = 8192  # -DMEMLIM: pan stops (unknown) instead of exhausting the machine
    depth: int = 1_000_000  # -m, the first try; raised tenfold while the search hits it
    max_depth: int = 100_000_000
    # -w: 2^bits hash slots; pan chains collisions, so this is speed, not soundness. None: one
    # slot per 256 bytes of the memory limit (chains of about six when the memory is full; pan
    # clears the whole table at start, about 0.2 s per 2^25 slots).
    hash_bits: int | None = None
    # "hash": every state stored whole (exhaustive, fastest); "ma": stored as a minimised automaton
    # (exhaustive, about 30x less memory, about 4x slower); "bitstate": supertrace, a bit array of
    # memory_mb (approximate: a hash collision prunes a state, so "holds" needs a hash factor of
    # 100 or more). -DCOLLAPSE is not offered: it compresses per process, and the whole state is
    # one process's globals here.
    storage: str = "hash"
    optimize: str = "-O2"
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, not {self.storage!r}")


@dataclass
class SpinResult:
    """What one pan run found, in the explorer's terms (``ExploreResult``)."""

    states: int = 0
    transitions: int = 0  # the explorer's count: pan's stored + matched, less the initial state
    depth: int = 0
    seconds: float = 0.0  # end to end: generate, spin -a, gcc, pan, trail replays
    timings: dict[str, float] = field(default_factory=dict)
    complete: bool = True
    reason: str = ""  # why the search is not complete
    memory_mb: float = 0.0
    approximate: bool = False  # bitstate: a clean search covered almost every state, not provably all
    hash_factor: float | None = None  # bitstate: bits per stored state
    violations: dict[str, Counterexample] = field(default_factory=dict)
    output: str = ""  # pan's report

    def summary(self) -> str:
        status = "complete" if self.complete else f"INCOMPLETE ({self.reason})"
        steps = ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items())
        return (f"{self.states} states, {self.transitions} transitions, depth {self.depth}, {self.seconds:.2f} s"
                f" ({steps}), {self.memory_mb:.0f} MB, {status}")


def default_memory_mb() -> int:
    """pan's memory limit for a command-line run: half of what the machine has free, at most 8 GB
    (about 200 million states stored whole), so a search that outgrows it stops with a reason
    instead of pushing the machine into swap."""
    import psutil

    return int(max(512, min(8192, psutil.virtual_memory().available // 2 // 2**20)))


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SpinUnavailable(name)
    return path


def _run(cmd: Sequence[str], cwd: Path, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


_ERROR = re.compile(r"pan:(\d+): assertion violated\s+!\((\w+)\)")
_WROTE = re.compile(r"pan: wrote (\S+)")
_STEP = re.compile(r"^\s*STEP (\d+)\s*$", re.MULTILINE)


def build(model: PromelaModel, workdir: Path, options: PanOptions = PanOptions()) -> dict[str, float]:
    """Write ``model.pml`` into ``workdir`` and compile its pan; returns the time of each stage."""
    spin, gcc = _tool("spin"), _tool("gcc")
    (workdir / "model.pml").write_text(model.text)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    done = _run([spin, "-a", "model.pml"], workdir)
    timings["spin"] = time.perf_counter() - start
    if done.returncode != 0 or not (workdir / "pan.c").exists():
        raise ModelError(f"spin -a rejected the generated Promela: {(done.stdout + done.stderr).strip()[-2000:]}")
    base = ["-DSAFETY", "-DNOREDUCE", "-DNOFAIR", f"-DMEMLIM={options.memory_mb}"]
    storage = {"hash": [], "bitstate": ["-DBITSTATE"], "ma": []}[options.storage]
    start = time.perf_counter()
    _compile(gcc, options, [*base, *storage], workdir)
    if options.storage == "ma":
        # -DMA needs the state vector's size, which pan reports on a search cut at depth 1.
        probe = _run(["./pan", "-m1", "-w10", "-n"], workdir).stdout
        size = re.search(r"State-vector (\d+) byte", probe)
        if size is None:
            raise ModelError(f"pan did not report its state vector size: {probe[-1000:]}")
        _compile(gcc, options, [*base, f"-DMA={size.group(1)}"], workdir)
    timings["gcc"] = time.perf_counter() - start
    return timings


def _compile(gcc: str, options: PanOptions, flags: Sequence[str], workdir: Path) -> None:
    done = _run([gcc, options.optimize, *flags, "-o", "pan", "pan.c"], workdir)
    if done.returncode != 0:
        raise SpinUnavailable("gcc", f"pan did not compile: {done.stderr.strip()[-2000:]}")


def search(workdir: Path, options: PanOptions = PanOptions()) -> tuple[str, int]:
    """Run the compiled pan; raise its depth limit tenfold (a run-time flag, no rebuild) while the
    search is cut by it. Returns pan's report and the depth limit it ran with."""
    depth = options.depth
    while True:
        for old in workdir.glob("model.pml*.trail"):
            old.unlink()
        done = _run(["./pan", "-c0", "-e", "-n", f"-m{depth}", f"-w{_hash_bits(options)}"], workdir,
                    options.timeout_s)
        out = done.stdout + done.stderr
        if "max search depth too small" not in out or depth >= options.max_depth:
            return out, depth
        depth = min(depth * 10, options.max_depth)


def _hash_bits(options: PanOptions) -> int:
    """-w: the hash table's slots, or for bitstate the largest bit array that leaves half of the
    memory budget to pan's stack and its own tables."""
    if options.storage == "bitstate":
        return max(10, min(40, (options.memory_mb * 4 * 2**20).bit_length() - 1))
    if options.hash_bits is not None:
        return options.hash_bits
    return max(16, min(32, (options.memory_mb * 2**20 // 256).bit_length() - 1))


_NUMBER = r"([\d.]+(?:e[+-]\d+)?)"


def _int(pattern: str, text: str) -> int:
    """A count from pan's report (printed with 8 significant digits: exact below 10^8)."""
    found = re.search(pattern.replace("(N)", _NUMBER), text)
    return int(float(found.group(1))) if found else 0


def verify(system: System, options: PanOptions = PanOptions(), workdir: Path | None = None) -> SpinResult:
    """Model-check ``system`` with SPIN: every property of ``INVARIANTS`` with a Promela form
    (model/check/promela.py), each violation replayed through the explorer's model."""
    result = SpinResult()
    start = time.perf_counter()
    model = generate(system)
    result.timings["generate"] = time.perf_counter() - start
    with _workdir(workdir) as where:
        result.timings.update(build(model, where, options))
        begin = time.perf_counter()
        try:
            out, depth = search(where, options)
        except subprocess.TimeoutExpired:
            out, depth = "", options.depth
            result.complete, result.reason = False, f"pan ran past {options.timeout_s} s"
        result.timings["pan"] = time.perf_counter() - begin
        result.output = out
        result.states = _int(r"(N) states, stored", out)
        result.transitions = max(_int(r"(N) transitions \(= stored\+matched\)", out) - 1, 0)
        result.depth = _int(r"depth reached (N)", out)
        factor = re.search(r"hash factor:\s*" + _NUMBER, out)
        result.hash_factor = float(factor.group(1)) if factor else None
        found = re.search(r"([\d.]+)\s+total actual memory usage", out)
        result.memory_mb = float(found.group(1)) if found else 0.0
        if result.complete:
            result.complete, result.reason = _completeness(out, depth, options, result.states)
        if result.complete and options.storage == "bitstate":
            result.approximate = True
            if result.hash_factor is None or result.hash_factor < MIN_HASH_FACTOR:
                result.complete = False
                result.reason = (f"bitstate search too dense (hash factor {result.hash_factor}, needs"
                                 f" {MIN_HASH_FACTOR:.0f}): give it more memory")
        begin = time.perf_counter()
        # "pan:K: assertion violated !(prop)" is written to trail K (model.pmlK.trail, -e).
        errors = {m.group(1): m.group(2) for m in _ERROR.finditer(out)}
        trails = {re.sub(r"\D", "", m.group(1)): m.group(1) for m in _WROTE.finditer(out)}
        for number, prop in errors.items():
            trail = trails.get(number)
            if prop == RANGE:
                result.complete = False
                result.reason = "a value left its Promela type's range (the encoding, not the model)"
                continue
            if prop in result.violations:
                continue
            if trail is None:
                raise TraceMismatch(f"pan reported {prop} violated (error {number}) but wrote no trail for it")
            ids = replay_ids(where, model, prop, trail)
            result.violations[prop] = replay(system, model, ids, prop)
        result.timings["replay"] = time.perf_counter() - begin
    result.seconds = time.perf_counter() - start
    return result


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    """``given`` (kept afterwards, to read pan's files), or a temporary directory."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="pipeproof-spin-") as tmp:
        yield Path(tmp)


def _completeness(out: str, depth: int, options: PanOptions, states: int) -> tuple[bool, str]:
    if "max search depth too small" in out:
        return False, f"the search went deeper than -m{depth}"
    if "reached -DMEMLIM bound" in out or "out of memory" in out:
        hint = (" (PanOptions(storage='ma') stores about 30x more states in the same memory, about 4x slower)"
                if options.storage == "hash" else "")
        return False, (f"pan reached its memory limit of {options.memory_mb} MB with {states:,} states stored:"
                       f" the instance is larger than that{hint}")
    if "Search not completed" in out or "states, stored" not in out:
        return False, "pan stopped before the search was complete"
    return True, ""


def replay_ids(workdir: Path, model: PromelaModel, prop: str, trail: str) -> list[int]:
    """The option ids along ``trail``, by ``spin -t`` with only ``prop`` armed (so the replay runs to
    the end of the trail instead of stopping at another property's first violation)."""
    number = re.fullmatch(r"model\.pml(\d*)\.trail", trail)
    if number is None:
        raise TraceMismatch(f"unexpected trail file name {trail!r}")
    only = model.properties.index(prop) + 1
    done = _run([_tool("spin"), f"-DONLY={only}", f"-t{number.group(1)}", "model.pml"], workdir)
    return [int(x) for x in _STEP.findall(done.stdout)]


def _matches(step: Step, option: Option) -> bool:
    if step.action != option.action or step.args != option.args:
        return False
    return all(any(f.family == c.family and f.index == c.index and f.transition == c.transition for f in step.firings)
               for c in option.choices)


def replay(system: System, model: PromelaModel, ids: Sequence[int], prop: str) -> Counterexample:
    """The explorer's counterexample for a SPIN trail: each option is matched to the successor
    ``System.successors`` offers, and the property's own check must fail at the end."""
    state: State = system.initial()
    path: list[Step] = []
    checked = False
    for n, oid in enumerate(ids, 1):
        if model.is_check(oid):
            checked = True
            if n != len(ids):
                raise TraceMismatch(f"{prop}: the trail goes on after its check option (step {n})")
            break
        option = model.options[oid]
        steps = [s for s in system.successors(state) if _matches(s, option)]
        if not steps:
            raise TraceMismatch(f"{prop}: step {n} of the SPIN trail, {option.action}{option.args}, is not a step "
                                f"the explorer offers there")
        state = steps[0].after
        path.append(steps[0])
    spin_steps = len(path)
    if not _violations(system, path, prop, step_property=not checked):
        raise TraceMismatch(f"SPIN reports {prop} violated after {spin_steps} steps, but the model holds it there")
    path = shrink(system, [_key(s) for s in path], prop, step_property=not checked)
    messages = _violations(system, path, prop, step_property=not checked)
    return Counterexample(prop, messages[0], tuple(system.describe_step(s) for s in path), tuple(path))


def _violations(system: System, path: Sequence[Step], prop: str, step_property: bool) -> list[str]:
    """What the property's own check reports at the end of ``path`` (empty: it holds there)."""
    inv = BY_NAME[prop]
    state = path[-1].after if path else system.initial()
    if step_property:
        if not path or inv.step_check is None:
            return []
        before = path[-2].after if len(path) > 1 else system.initial()
        return inv.step_check(system, path[-1], before)
    messages = inv.state_check(system, state) if inv.state_check is not None else []
    if not messages and prop == QUIESCENCE and next(iter(system.successors(state)), None) is None:
        messages = quiescent_violations(system, state)
    return messages


_StepKey = tuple[str, tuple[int, ...], tuple[tuple[str, tuple[int, ...], str], ...]]


def _key(step: Step) -> _StepKey:
    """What names a step independently of the state it is taken in: its action, its arguments
    and the component transitions it fires."""
    return step.action, step.args, tuple((f.family, f.index, f.transition.key) for f in step.firings)


def _follow(system: System, keys: Sequence[_StepKey], prop: str, step_property: bool,
            budget: list[int]) -> list[Step] | None:
    """The steps ``keys`` name, taken from the initial state, cut at the first violation of
    ``prop``; None if some step is not offered where it is taken or nothing is violated."""
    state = system.initial()
    path: list[Step] = []
    for key in keys:
        budget[0] -= 1
        step = next((s for s in system.successors(state) if _key(s) == key), None)
        if step is None:
            return None
        path.append(step)
        state = step.after
        if _violations(system, path, prop, step_property):
            return path
    return None


def shrink(system: System, keys: Sequence[_StepKey], prop: str, step_property: bool,
           effort: int = 20_000) -> list[Step]:
    """A SPIN trail made short: pan's search is depth-first, so its trail carries steps the
    violation does not need. Greedily drop one step at a time while what is left still replays
    through ``System.successors`` and still violates ``prop`` (cut at its first violation), until
    no single step can go or ``effort`` successor computations are spent. Every step of the
    result is one the explorer offers; it is short, not necessarily shortest (the explorer's
    breadth-first trace is)."""
    if not keys:
        return []  # violated in the initial state
    budget = [effort]
    best = _follow(system, keys, prop, step_property, budget)
    if best is None:
        raise TraceMismatch(f"the replayed SPIN trail for {prop} does not replay by its step names")
    changed = True
    while changed and budget[0] > 0:
        changed = False
        for i in reversed(range(len(best))):
            if budget[0] <= 0:
                break
            trial = [_key(s) for k, s in enumerate(best) if k != i]
            found = _follow(system, trial, prop, step_property, budget)
            if found is not None:
                best, changed = found, True
    return best


# -- the check table ----------------------------------------------------------------------------


def spin_rows(
    scenarios: Sequence[Scenario],
    model: Callable[[Scenario], SystemModel] | None = None,
    options: PanOptions = PanOptions(),
    log: Callable[[str], None] = lambda _msg: None,
) -> list[Row]:
    """One row per invariant, method ``spin`` (model/check/checks.py ``Row``), over ``scenarios``."""
    results: list[tuple[Scenario, SpinResult]] = []
    unavailable: SpinUnavailable | None = None
    for sc in scenarios:
        system = System(sc.bounds, model(sc) if model else reference_model(sc.bounds))
        try:
            r = verify(system, options)
        except SpinUnavailable as exc:
            unavailable = exc
            break
        log(f"spin      {sc.name:<10} {r.summary()}")
        results.append((sc, r))
    states = sum(r.states for _, r in results)
    seconds = sum(r.seconds for _, r in results)
    untranslated = set(generate(System(scenarios[0].bounds)).untranslated) if scenarios else set()
    rows = []
    for inv in INVARIANTS:
        found = [(sc, r.violations[inv.name]) for sc, r in results if inv.name in r.violations]
        if found:
            sc, cex = min(found, key=lambda x: len(x[1].steps))
            rows.append(Row(inv.machine, inv.name, "spin", "violated", states, seconds,
                            [*cex.steps, f"=> {cex.message}"], f"scenario {sc.name}"))
            continue
        why = [f"{sc.name}: {r.reason}; none of the {r.states:,} states searched violates it"
               for sc, r in results if not r.complete]
        if unavailable is not None:
            why.append(str(unavailable))
        if inv.name in untranslated:
            why.append("no Promela form for this property")
        if why:
            rows.append(Row(inv.machine, inv.name, "spin", "unknown", states, seconds, detail="; ".join(why)))
        else:
            approx = [f"{sc.name}: bitstate, hash factor {r.hash_factor:g}" for sc, r in results if r.approximate]
            rows.append(Row(inv.machine, inv.name, "spin", "holds", states, seconds,
                            detail="; ".join(approx) or ", ".join(sc.name for sc in scenarios)))
    return rows


__all__ = [
    "APT_LINE",
    "PanOptions",
    "SpinResult",
    "SpinUnavailable",
    "TraceMismatch",
    "build",
    "default_memory_mb",
    "replay",
    "replay_ids",
    "search",
    "shrink",
    "spin_rows",
    "verify",
]
