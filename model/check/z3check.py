"""Checker 3: Z3. Unbounded proofs by induction and bounded model checking (docs/proofs.md).

Proofs run over the *symbolic* universe (any number of users, sessions and events; bounds as
``Int`` constants; model/check/z3system.py):

1. ``Init => Inv``, where Inv is the conjunction of the lemmas (model/check/z3props.py);
2. ``Inv /\\ Next => Inv'``, one query per case of Next;
3. per property: ``Inv => P`` (state properties) and ``Inv /\\ Next => P_step`` (step properties).

A property is *proved* when every obligation it needs is unsat, *unknown* when Z3 gave up on one
(a timeout is never a proof), and *violated* only with a concrete trace from Init: a failed
induction step yields a counterexample to induction (CTI), which is then confirmed, or not, by
BMC from Init on a finite instance. BMC (:func:`bmc`) unrolls Next over a scenario's bounds, checks
every state and step property at every depth, and the bounded liveness of
``every_event_acked_or_escalated`` (no quiescent state with a live event), and returns a trace
replayed through ``System.successors`` so each step reads like the explorer's.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import z3

from pipeproof.errors import ModelError
from pipeproof.model.check.z3enc import Term
from pipeproof.model.check.z3props import (
    LEMMA_BY_NAME,
    LEMMAS,
    PROPERTIES,
    PROPERTY_BY_NAME,
    Lemma,
    ZProperty,
    closure,
    invariant,
)
from pipeproof.model.check.z3system import Case, St, SysEnc
from pipeproof.model.check.z3universe import Universe
from pipeproof.model.invariants import BY_NAME as PY_INVARIANTS
from pipeproof.model.invariants import quiescent_violations
from pipeproof.model.scenarios import DEFAULT_SCENARIOS
from pipeproof.model.system import Bounds, State, Step, System, SystemModel, reference_model

if TYPE_CHECKING:
    from pipeproof.model.check.checks import CheckOptions, Row

EAE = "every_event_acked_or_escalated"
DEFAULT_TIMEOUT_MS = 20_000
BMC_DEPTH = 12
"""Default unrolling depth: the longest shortest counterexample in the mutant zoo is 10 steps."""
LIVENESS_DEPTH = 6
"""Depth of the bounded-liveness BMC in the default check (quiescence makes each depth costly)."""


@dataclass
class Obligation:
    """One query: what it shows, Z3's answer, and the counterexample when it is sat."""

    name: str
    result: str  # unsat | sat | unknown
    seconds: float
    detail: str = ""


@dataclass
class Proof:
    """The verdict for one property: ``proved``, ``violated`` (with a trace) or ``unknown``."""

    prop: str
    verdict: str
    seconds: float
    queries: int
    lemmas: tuple[str, ...]
    detail: str = ""
    cti: str = ""  # a counterexample to induction (an unreachable-or-not state), when induction failed
    trace: list[str] | None = None


@dataclass
class ProofRun:
    """Every obligation of one model, shared by its properties."""

    init: Obligation
    step: list[Obligation]  # Inv /\ case => Inv', per case
    props: dict[str, list[Obligation]] = field(default_factory=dict)
    seconds: float = 0.0
    cases: int = 0


def _solver(timeout_ms: int) -> z3.Solver:
    s = z3.Solver()
    s.set("timeout", timeout_ms)
    return s


def _check(s: z3.Solver) -> str:
    r = s.check()
    return "unsat" if r == z3.unsat else "sat" if r == z3.sat else "unknown"


def _case_name(c: Case) -> str:
    return f"{c.action}[{', '.join(f.transition.key for f in c.firings)}]"


def prove(model: SystemModel | None = None, *, timeout_ms: int = DEFAULT_TIMEOUT_MS,
          props: Sequence[ZProperty] = PROPERTIES, lemmas: tuple[str, ...] | None = None,
          first_failure: bool = False) -> ProofRun:
    """Run every induction obligation for ``model`` (default: the reference) over the symbolic universe.

    ``lemmas`` restricts Inv to those lemmas (default: all); the mutant matrix uses each property's
    own lemma closure, which is inductive on its own for the reference model. ``first_failure``
    stops at the first sat obligation (a CTI is all the matrix needs; sat answers under
    quantifiers are the slow ones).
    """
    chosen = LEMMAS if lemmas is None else tuple(LEMMA_BY_NAME[n] for n in lemmas)
    start = time.perf_counter()
    u = Universe.symbolic_universe()
    enc = SysEnc(model or reference_model(Bounds()), u)
    pre = enc.fresh_state("pre")
    inv = invariant(enc, pre, tuple(lem.name for lem in chosen))

    s = _solver(timeout_ms)
    s.add(*u.assumptions)
    t = time.perf_counter()
    s.push()
    s.add(z3.Not(z3.And([lem.body(enc, enc.initial_state()) for lem in chosen])))
    init = Obligation("Init => Inv", _check(s), time.perf_counter() - t)
    if init.result == "sat":
        m = s.model()
        init.detail = "fails in Init: " + ", ".join(
            lem.name for lem in chosen
            if z3.is_false(m.eval(lem.body(enc, enc.initial_state()), model_completion=True)))
    s.pop()

    s.add(inv)
    cases = enc.cases(pre, "n")
    # A lemma whose fields a case does not change is preserved by it trivially (Inv holds before),
    # so only the lemmas reading a changed field are rebuilt over the case's post-state and asked.
    reads = {lem.name: _fields_read(enc, lem) for lem in chosen}
    steps: list[Obligation] = []
    for c in cases if chosen else ():
        t = time.perf_counter()
        s.push()
        s.add(c.guard)
        changed = {f for f in enc.fields() if not c.post[f].eq(pre[f])}
        post_bodies = [(lem.name, lem.body(enc, c.post)) for lem in chosen if reads[lem.name] & changed]
        s.add(z3.Not(z3.And([b for _, b in post_bodies])))
        ob = Obligation(f"Inv /\\ {_case_name(c)} => Inv'", _check(s), 0.0)
        if ob.result == "sat":
            m = s.model()
            broken = [n for n, b in post_bodies if z3.is_false(m.eval(b, model_completion=True))]
            # A quantified lemma over a lambda-built post-state may not evaluate in the model: then
            # name the lemmas the case could have broken (the ones reading a field it changes).
            ob.detail = (f"after {c.action}, lemma(s) {', '.join(broken)} fail" if broken else
                         f"after {c.action}, one of the lemma(s) {', '.join(n for n, _ in post_bodies)} fails")
        s.pop()
        ob.seconds = time.perf_counter() - t
        steps.append(ob)
        if first_failure and ob.result == "sat":
            break

    run = ProofRun(init, steps, cases=len(cases))
    if first_failure and any(o.result == "sat" for o in steps):
        run.seconds = time.perf_counter() - start
        return run
    for p in props:
        obs: list[Obligation] = []
        if p.state is not None:
            t = time.perf_counter()
            s.push()
            s.add(z3.Not(p.state(enc, pre)))
            obs.append(Obligation(f"Inv => {p.name}", _check(s), time.perf_counter() - t))
            s.pop()
        if p.step is not None:
            for c in cases:
                goal = z3.simplify(p.step(enc, c))
                if z3.is_true(goal):
                    continue  # the case fires nothing this property constrains
                t = time.perf_counter()
                s.push()
                s.add(c.guard, z3.Not(goal))
                ob = Obligation(f"Inv /\\ {_case_name(c)} => {p.name}", _check(s), 0.0)
                if ob.result == "sat":
                    ob.detail = f"{c.action} can violate it from a state satisfying Inv"
                s.pop()
                ob.seconds = time.perf_counter() - t
                obs.append(ob)
                if first_failure and ob.result == "sat":
                    break
        run.props[p.name] = obs
    run.seconds = time.perf_counter() - start
    return run


def _fields_read(enc: SysEnc, lem: Lemma) -> set[str]:
    """The state fields a lemma's formula mentions (found by walking the formula over a template)."""
    template = enc.fresh_state("reads")
    names = {template[f].decl().name(): f for f in enc.fields()}
    seen: set[str] = set()
    todo = [lem.body(enc, template)]
    visited: set[int] = set()
    while todo:
        t = todo.pop()
        if t.get_id() in visited:
            continue
        visited.add(t.get_id())
        if z3.is_quantifier(t):
            todo.append(t.body())
            continue
        if z3.is_const(t) and t.decl().name() in names:
            seen.add(names[t.decl().name()])
        todo.extend(t.children())
    return seen


def verdicts(run: ProofRun, props: Sequence[ZProperty] = PROPERTIES) -> list[Proof]:
    """One :class:`Proof` per property from the shared obligations (no BMC confirmation here)."""
    shared = [run.init, *run.step]
    out = []
    for p in props:
        obs = [*shared, *run.props.get(p.name, [])]
        secs = sum(o.seconds for o in obs)
        failed = [o for o in obs if o.result == "sat"]
        unknown = [o for o in obs if o.result == "unknown"]
        lemmas = closure(p.lemmas)
        if failed:
            out.append(Proof(p.name, "unknown", secs, len(obs), lemmas,
                             detail="induction failed (not yet confirmed by BMC)",
                             cti="; ".join(f"{o.name}: {o.detail}" for o in failed[:3])))
        elif unknown:
            out.append(Proof(p.name, "unknown", secs, len(obs), lemmas,
                             detail=f"Z3 answered unknown (timeout?) on {unknown[0].name}"))
        else:
            out.append(Proof(p.name, "proved", secs, len(obs), lemmas,
                             detail=f"induction over {run.cases} cases of Next; lemmas: "
                             + (", ".join(lemmas) or "none")))
    return out


# -- bounded model checking ------------------------------------------------------------------------
@dataclass
class BmcResult:
    """The shortest violation BMC found (``prop`` empty: none up to ``depth``)."""

    prop: str
    message: str
    states: list[State]
    steps: list[Step]
    depth: int
    seconds: float
    result: str  # violated | clean | unknown

    @property
    def trace(self) -> list[str]:
        return [s.describe(self._system) for s in self.steps] if self.steps else []

    _system: System = field(default=None, repr=False)  # type: ignore[assignment]


def quiescent(enc: SysEnc, st: St, tag: str) -> Term:
    """No case of Next is enabled in ``st`` (finite universe: the cases' arguments are concrete)."""
    return z3.Not(z3.Or([c.guard for c in enc.cases(st, tag)]))


def bmc(system: System, props: Iterable[str], *, depth: int = BMC_DEPTH, timeout_ms: int = DEFAULT_TIMEOUT_MS,
        liveness: bool = True) -> BmcResult:
    """Unroll Next from Init up to ``depth`` steps on ``system``'s bounds; stop at the first depth at
    which one of ``props`` is violated, so the trace is a shortest one.

    Each depth's question is asked under an assumption literal rather than push/pop, so what Z3
    learned refuting depth k is kept for depth k+1 (several times faster on the zoo).
    """
    start = time.perf_counter()
    wanted = [PROPERTY_BY_NAME[p] for p in props]
    enc = SysEnc(system.model, Universe.finite_universe(system.bounds))
    s = _solver(timeout_ms)
    states: list[St] = [enc.initial_state("x0")]
    unknown = False
    fresh = itertools.count()

    def ask(bad: Term) -> str:
        lit = z3.Bool(f"query{next(fresh)}")
        s.add(z3.Implies(lit, bad))
        r = s.check(lit)
        return "sat" if r == z3.sat else "unsat" if r == z3.unsat else "unknown"

    def found(prop: str, k: int, last_case: Case | None) -> BmcResult:
        m = s.model()
        concrete = [enc.decode(m, st) for st in states[: k + 1]]
        steps = replay(system, concrete, prop if last_case is not None else None)
        last = steps[-1] if steps and last_case is not None else None
        message = _message(system, prop, concrete[-1], last, concrete[-2] if last is not None else None)
        r = BmcResult(prop, message, concrete, steps, k, time.perf_counter() - start, "violated")
        r._system = system
        return r

    for k in range(depth + 1):
        x = states[k]
        for p in wanted:
            bad = [z3.Not(p.state(enc, x))] if p.state is not None else []
            if liveness and p.name == EAE:
                live = enc.u.exists("U", lambda uu, x=x: enc.u.exists("Int", lambda i: enc.live_event(x, uu, i)))
                bad.append(z3.And(quiescent(enc, x, f"q{k}"), live))
            if not bad:
                continue
            r = ask(z3.Or(bad))
            if r == "sat":
                return found(p.name, k, None)
            unknown |= r == "unknown"
        if k == depth:
            break
        nxt = enc.fresh_state(f"x{k + 1}")
        formula, tagged = enc.next_formula(x, nxt, f"t{k}")
        s.add(formula)
        states.append(nxt)
        for p in wanted:
            if p.step is None:
                continue
            viol = [z3.And(ind, z3.Not(g)) for ind, c in tagged if not z3.is_true(g := z3.simplify(p.step(enc, c)))]
            if not viol:
                continue
            r = ask(z3.Or(viol))
            if r == "sat":
                m = s.model()
                case = next(c for ind, c in tagged if z3.is_true(m.eval(ind, model_completion=True)))
                return found(p.name, k + 1, case)
            unknown |= r == "unknown"
    res = BmcResult("", "", [], [], depth, time.perf_counter() - start, "unknown" if unknown else "clean")
    res._system = system
    return res


def replay(system: System, states: Sequence[State], step_prop: str | None = None) -> list[Step]:
    """Map a Z3 trace back to ``System`` steps (the explorer's successor function is the judge:
    a Z3 step with no System step is an encoding bug and raises)."""
    steps: list[Step] = []
    for k, (a, b) in enumerate(itertools.pairwise(states)):
        cands = [st for st in system.successors(a) if st.after == b]
        if not cands:
            raise ModelError(f"Z3 trace step {k + 1} has no System step: the Z3 encoding and model/system.py disagree")
        chosen = cands[0]
        if step_prop is not None and k == len(states) - 2:
            check = PY_INVARIANTS[step_prop].step_check
            for c in cands:
                if check is not None and check(system, c, a):
                    chosen = c
                    break
        steps.append(chosen)
    return steps


def _message(system: System, prop: str, state: State, last: Step | None, before: State | None) -> str:
    inv = PY_INVARIANTS[prop]
    msgs: list[str] = []
    if last is not None and before is not None and inv.step_check is not None:
        msgs = inv.step_check(system, last, before)
    if not msgs and inv.state_check is not None:
        msgs = inv.state_check(system, state)
    if not msgs and prop == EAE:
        msgs = quiescent_violations(system, state)
    if not msgs:
        # The replayed trace is judged by the explorer's own predicates: Z3 saying "violated"
        # where they see nothing is an encoding bug, not a verdict.
        raise ModelError(f"Z3 found a trace violating {prop} but the explorer's check does not flag its last "
                         "state or step: the Z3 encoding and model/invariants.py disagree")
    return msgs[0]


# -- the check table rows ---------------------------------------------------------------------------
def z3_rows(options: CheckOptions) -> list[Row]:
    """One row per property (method ``z3``): the induction verdict; for every_event_acked_or_escalated
    also the bounded liveness BMC on each scenario."""
    from pipeproof.model.check.checks import Row

    models = {sc.name: (options.model(sc) if options.model else reference_model(sc.bounds)) for sc in options.scenarios}
    base = next(iter(models.values()))
    run = prove(base, timeout_ms=options.z3_timeout_ms)
    options.log(f"z3        induction {run.cases} cases, {run.seconds:.2f} s")
    rows: list[Row] = []
    for proof in verdicts(run):
        machine = PY_INVARIANTS[proof.prop].machine
        if proof.verdict == "unknown":
            # Full strength failed or timed out: the property's own lemma closure is a smaller
            # query that is inductive on its own for the reference model (docs/proofs.md, "Z3 verdicts").
            proof = _own_lemmas(base, proof, options)
        verdict, detail, trace, seconds = proof.verdict, proof.detail, None, proof.seconds
        if proof.verdict == "unknown":
            # Not proved: only a real trace from Init makes it a violation; otherwise it stays
            # unknown and says why (the induction's answer and how deep BMC looked).
            confirm = _confirm(options, models, proof.prop)
            seconds += confirm.seconds
            induction = f"{proof.detail}; CTI: {proof.cti}" if proof.cti else proof.detail
            if confirm.result == "violated":
                verdict, trace = "violated", [*confirm.trace, f"=> {confirm.message}"]
                detail = f"BMC trace from Init at depth {confirm.depth}, replayed through the explorer; {induction}"
            else:
                bmc_says = ("no trace" if confirm.result == "clean"
                            else "Z3 answered unknown (timeout) before a trace was found")
                detail = f"{induction}; BMC to depth {confirm.depth} on every scenario: {bmc_says}"
        if proof.prop == EAE and verdict == "proved" and options.extra.get("z3_bmc", True):
            # Bounded liveness: BMC with the quiescence check, on the timed scenarios (where the
            # horizon means something); depth and scenarios trade time for coverage (docs/proofs.md).
            depth = int(options.extra.get("bmc_depth", LIVENESS_DEPTH))
            timed = [sc for sc in options.scenarios if sc.bounds.timed] or list(options.scenarios[:1])
            for sc in timed:
                r = bmc(System(sc.bounds, models[sc.name]), [EAE], depth=depth, timeout_ms=options.z3_timeout_ms)
                seconds += r.seconds
                options.log(f"z3        bmc {sc.name:<10} depth {r.depth}: {r.result}, {r.seconds:.2f} s")
                if r.result == "violated":
                    verdict, trace = "violated", [*r.trace, f"=> {r.message}"]
                    detail = f"bounded liveness violated in scenario {sc.name}"
                    break
                if r.result == "unknown":
                    verdict = "unknown"
                    detail = f"bounded liveness: BMC unknown (timeout) in scenario {sc.name}"
                    break
            else:
                detail += f"; bounded liveness by BMC to depth {depth} on {', '.join(sc.name for sc in timed)}"
        rows.append(Row(machine, proof.prop, "z3", verdict, proof.queries, seconds, trace, detail))
    return rows


def _own_lemmas(model: SystemModel, proof: Proof, options: CheckOptions) -> Proof:
    """Retry one property with only its own lemma closure (fewer, smaller obligations than the
    full Inv, so a timeout at full strength may still give a proof or a sharp CTI)."""
    prop = PROPERTY_BY_NAME[proof.prop]
    run = prove(model, timeout_ms=options.z3_timeout_ms, props=(prop,), lemmas=closure(prop.lemmas))
    retry = verdicts(run, (prop,))[0]
    retry.seconds += proof.seconds
    if retry.verdict == "proved":
        retry.detail = f"{retry.detail} (the property's own lemma set; at full strength: {proof.detail})"
    else:
        retry.detail = f"at full strength: {proof.detail}; with its own lemma set: {retry.detail}"
        retry.cti = retry.cti or proof.cti
    return retry


def _confirm(options: CheckOptions, models: dict[str, SystemModel], prop: str) -> BmcResult:
    """BMC on every scenario; the first trace wins, else the least conclusive answer is kept
    (``unknown`` if any scenario timed out, so a timeout is never reported as clean)."""
    depth = int(options.extra.get("confirm_depth", BMC_DEPTH))
    seen: list[BmcResult] = []
    for sc in options.scenarios:
        r = bmc(System(sc.bounds, models[sc.name]), [prop], depth=depth, timeout_ms=options.z3_timeout_ms)
        if r.result == "violated":
            return r
        seen.append(r)
    return next((r for r in seen if r.result == "unknown"), seen[-1])


def explain(prop: str) -> str:
    """What ``pipeproof check --explain PROPERTY`` prints: the property, how it is proved, and its
    strengthening lemmas with what each needs."""
    p = PROPERTY_BY_NAME.get(prop)
    if p is None:
        raise KeyError(prop)
    inv = PY_INVARIANTS[prop]
    lines = [f"{prop} ({inv.machine}): {inv.doc}", "", f"Proof: {p.why}", ""]
    lemmas = closure(p.lemmas)
    if not lemmas:
        lines.append("Strengthening lemmas: none (inductive as stated).")
    else:
        lines.append("Strengthening lemmas (Inv includes each; each is preserved by every case of Next given Inv):")
        for name in lemmas:
            lem = LEMMA_BY_NAME[name]
            needs = f"  [needs: {', '.join(lem.needs)}]" if lem.needs else ""
            lines.append(f"  - {name}: {lem.doc}{needs}")
    kind = "state" if p.state and not p.step else "step" if p.step and not p.state else "state and step"
    lines += ["", f"Shape: {kind} property. Obligations: Init => Inv; Inv /\\ Next => Inv' (per case);"
              + (" Inv => P;" if p.state else "") + (" Inv /\\ Next => P_step (per case)." if p.step else "")]
    if prop == EAE:
        timed = ", ".join(s.name for s in DEFAULT_SCENARIOS if s.bounds.timed)
        lines.append(f"Liveness part: BMC from Init to depth {LIVENESS_DEPTH} on the timed scenarios ({timed}): no "
                     "quiescent state keeps a live event and every live event is younger than the horizon.")
    return "\n".join(lines)
