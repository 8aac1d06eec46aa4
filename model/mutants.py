"""The mutant zoo: known-broken designs, each a small delta against the real declaration.

Every mutant reproduces one failure from the seed analysis (docs/proofs.md, "The mutant zoo and
the seed") by adding, dropping or changing one transition of one machine (the same change to two
edges where the bug is one comparison), or by swapping one piece of glue. Each names the
property that must catch it and the scenario whose interleavings expose it. A checker that
misses a mutant it should catch fails CI (tests/model/test_mutants.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from pipeproof.errors import ModelDefinitionError
from pipeproof.model.connection import Conn
from pipeproof.model.context import Ctx
from pipeproof.model.delivery import Delivery
from pipeproof.model.expr import TRUE, Param, Var
from pipeproof.model.run import Run
from pipeproof.model.scenarios import DEFAULT_SCENARIOS, Scenario
from pipeproof.model.spec import Machine, Transition
from pipeproof.model.system import Bounds, State, System, SystemModel
from pipeproof.protocol import Append, EventKind, FrameType, Send

Family = str  # "connection" | "context" | "delivery" | "run"


def add(machine: Machine, transition: Transition) -> Machine:
    """The machine with one more transition (validated again, like any declaration)."""
    return replace(machine, transitions=(*machine.transitions, transition))


def drop(machine: Machine, key: str) -> Machine:
    kept = tuple(t for t in machine.transitions if t.key != key)
    if len(kept) == len(machine.transitions):
        raise ModelDefinitionError(machine.name, "mutant_delta", f"no transition {key!r} to drop")
    return replace(machine, transitions=kept)


def change(machine: Machine, key: str, **fields: object) -> Machine:
    found = False
    out = []
    for t in machine.transitions:
        if t.key == key:
            found = True
            t = replace(t, **fields)  # type: ignore[arg-type]
        out.append(t)
    if not found:
        raise ModelDefinitionError(machine.name, "mutant_delta", f"no transition {key!r} to change")
    return replace(machine, transitions=tuple(out))


def _on(family: Family, delta: Callable[[Machine], Machine]) -> Callable[[SystemModel], SystemModel]:
    def apply(model: SystemModel) -> SystemModel:
        return replace(model, **{family: delta(getattr(model, family))})  # type: ignore[arg-type]

    return apply


@dataclass(frozen=True)
class Mutant:
    name: str
    seed: str  # the failure from the seed analysis it reproduces
    delta: str  # the change, in words, as an architect reads it
    apply: Callable[[SystemModel], SystemModel]
    prop: str  # the property that must catch it
    scenario: str  # the default scenario whose bounds expose it
    wire_visible: bool = True

    def model(self, bounds: Bounds, base: SystemModel | None = None) -> SystemModel:
        from pipeproof.model.system import reference_model

        return replace(self.apply(base or reference_model(bounds)), name=self.name)

    def system(self, bounds: Bounds | None = None) -> System:
        b = bounds or scenario(self.scenario).bounds
        return System(b, self.model(b))


def scenario(name: str) -> Scenario:
    for s in (*DEFAULT_SCENARIOS, *EXTRA_SCENARIOS):
        if s.name == name:
            return s
    raise KeyError(name)


EXTRA_SCENARIOS: tuple[Scenario, ...] = ()

q, ack_sent, cancel_requested = Var("queued"), Var("ack_sent"), Var("cancel_requested")
epoch, conns, instances = Var("epoch"), Var("conns"), Var("instances")
attempt, waited, max_attempts = Var("attempt"), Var("waited"), Param("max_attempts")


def _any_stream(system: System, state: State, session: int, user: int) -> bool:
    # The broken lookup: the stream is not chosen by the token's user, so any live session reads it.
    return True


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "handle_before_ready",
        "1. WebSocket handshake race: a message handled before the handshake completes (users see 1011)",
        "connection: add INITIALISING --handle_frame|handle_invalid [queued > 0] / queued-1--> INITIALISING",
        # Both ways of handling a frame (a valid one, a malformed one answered with an error).
        _on("connection", lambda m: add(add(m, Transition(
            "handle_frame", Conn.INITIALISING, Conn.INITIALISING, guard=q > 0, updates=(("queued", q - 1),))),
            Transition("handle_invalid", Conn.INITIALISING, Conn.INITIALISING, guard=q > 0,
                       updates=(("queued", q - 1),)))),
        "no_message_before_ready", "readiness",
    ),
    Mutant(
        "ack_before_ready",
        "1. graphql-ws issue 501: connection_ack sent before the socket is marked READY",
        "connection: add INITIALISING --send_ack [!ack_sent] / ack_sent:=true--> INITIALISING",
        _on("connection", lambda m: add(m, Transition(
            "send_ack", Conn.INITIALISING, Conn.INITIALISING, guard=~ack_sent, updates=(("ack_sent", TRUE),),
            emits=Send(FrameType.CONNECTION_ACK)))),
        "ready_before_ack", "readiness",
    ),
    Mutant(
        "swallow_send_failure",
        "2. `except Exception: log.warning` around the event send: the failure is logged and forgotten",
        "delivery: PENDING --send_failed--> PENDING becomes PENDING --send_failed--> ACKED (marked done)",
        _on("delivery", lambda m: change(m, "PENDING--send_failed-->PENDING", target=Delivery.ACKED)),
        "every_event_acked_or_escalated", "races",
    ),
    Mutant(
        "no_escalation",
        "2. retries run out and nothing escalates: the user waits forever",
        "delivery: drop SENT --ack_timeout [attempt >= max_attempts]--> ESCALATED",
        _on("delivery", lambda m: drop(m, "SENT--ack_timeout-->ESCALATED")),
        "every_event_acked_or_escalated", "readiness",
    ),
    Mutant(
        "resend_acked",
        "broken pipe 3 (event -> confirmation): the confirmation is recorded but not honoured, so an acked "
        "event is sent again",
        "delivery: add ACKED --send--> ACKED",
        _on("delivery", lambda m: add(m, Transition("send", Delivery.ACKED, Delivery.ACKED,
                                                    emits=Send(FrameType.EVENT)))),
        "acked_never_resent", "readiness",
    ),
    Mutant(
        "unlocked_context_create",
        "4. UserContextManager without the per-user lock: two concurrent inits create two contexts",
        "context: add LIVE --create / epoch+1, conns+1, instances+1--> LIVE (a stale lookup creates again)",
        _on("context", lambda m: add(m, Transition(
            "create", Ctx.LIVE, Ctx.LIVE,
            updates=(("epoch", epoch + 1), ("conns", conns + 1), ("instances", instances + 1))))),
        "one_context_per_user", "races",
    ),
    Mutant(
        "expired_context_reused",
        "14. no validation of context age: an expired context is handed out again",
        "context: add EXPIRED --attach / conns+1, instances+1--> LIVE (same epoch)",
        _on("context", lambda m: add(m, Transition(
            "attach", Ctx.EXPIRED, Ctx.LIVE, updates=(("conns", conns + 1), ("instances", instances + 1))))),
        "expired_context_never_reused", "races",
    ),
    Mutant(
        "cross_user_route",
        "validation gap 6 (user context isolation): a session is handed another user's stream",
        "glue: route every stream to every live session (the stream is not looked up by the token's user)",
        lambda model: replace(model, route=_any_stream),
        "no_cross_user_read", "isolation",
    ),
    Mutant(
        "event_after_terminal",
        "2. the five critical events: events keep coming after the terminal one, so the client cannot "
        "tell when the response is ready",
        "run: add COMPLETED --agent_thinking--> COMPLETED",
        _on("run", lambda m: add(m, Transition("agent_thinking", Run.COMPLETED, Run.COMPLETED,
                                               emits=Append(EventKind.AGENT_THINKING)))),
        "run_events_well_ordered", "runs",
    ),
    Mutant(
        "unpaired_tool_event",
        "broken pipe 4 (tool execution -> progress tracking): tool_completed with no tool_executing before it, "
        "so the user's progress view is wrong",
        "run: add RUNNING --tool_completed--> RUNNING",
        _on("run", lambda m: add(m, Transition("tool_completed", Run.RUNNING, Run.RUNNING,
                                               emits=Append(EventKind.TOOL_COMPLETED)))),
        "run_events_well_ordered", "runs",
    ),
    Mutant(
        "cancel_before_start_lost",
        "not a seed item: the protocol's run rule (section 4) that a cancel received before agent_started "
        "wins; without it the run starts and the user's cancel is ignored",
        "run: ACCEPTED --agent_started [!cancel_requested]--> RUNNING loses its guard",
        _on("run", lambda m: change(m, "ACCEPTED--agent_started-->RUNNING", guard=TRUE)),
        "cancel_before_start_wins", "readiness",
    ),
    Mutant(
        "no_session_never_notified",
        "broken pipe 1 (agent execution -> user notification): no WebSocket is available and the user is "
        "never notified",
        "delivery: drop PENDING --no_session_timeout [idle >= resume_window & !has_session]--> ESCALATED",
        _on("delivery", lambda m: drop(m, "PENDING--no_session_timeout-->ESCALATED")),
        "every_event_acked_or_escalated", "runs",
    ),
    Mutant(
        "escalation_not_final",
        "2. the fallback is not final: the retry timer outlives the escalation and the event is sent again "
        "after the user was told it failed",
        "delivery: add ESCALATED --ack_timeout--> PENDING",
        _on("delivery", lambda m: add(m, Transition("ack_timeout", Delivery.ESCALATED, Delivery.PENDING))),
        "monotonic_event_state", "isolation",
    ),
    Mutant(
        "retry_cap_off_by_one",
        "2. the retry loop compares its counter with <=: one write more than max_attempts",
        "delivery: PENDING --send [attempt < max_attempts]--> SENT and SENT --ack_timeout [.. attempt < "
        "max_attempts]--> PENDING compare with <=",
        _on("delivery", lambda m: change(
            change(m, "PENDING--send-->SENT", guard=attempt <= max_attempts),
            "SENT--ack_timeout-->PENDING", guard=(waited >= Param("ack_timeout")) & (attempt <= max_attempts))),
        "attempts_bounded", "runs",
    ),
    Mutant(
        "no_account_limit",
        "validation gap 7 (concurrent user limits): a new user's context is created without checking the "
        "account's limit",
        "context: ABSENT --create [!account_full]--> LIVE and EXPIRED --create [!account_full]--> LIVE lose "
        "their guard",
        _on("context", lambda m: change(change(m, "ABSENT--create-->LIVE", guard=TRUE),
                                        "EXPIRED--create-->LIVE", guard=TRUE)),
        "connection_limits_respected", "isolation",
    ),
    Mutant(
        "heartbeat_suppressed",
        "9. heartbeat failures suppressed: a peer silent for two intervals is logged and kept READY, "
        "holding its slot, instead of being closed",
        "connection: READY --heartbeat_timeout--> CLOSED (close heartbeat_timeout) becomes "
        "READY --heartbeat_timeout--> READY (no close)",
        _on("connection", lambda m: change(m, "READY--heartbeat_timeout-->CLOSED", target=Conn.READY, emits=None)),
        "timeouts_close_the_socket", "readiness",
    ),
    Mutant(
        "lease_race_two_owners",
        "issue 14, part 5 (several nodes): a takeover that reads the lease, sees it expired, then writes "
        "itself without a compare-and-set, so two live nodes both act as owner",
        "glue: a node adopts a context's delivery or a run whenever it does not hold it (no compare-and-set "
        "on the store's lease)",
        lambda model: replace(model, cas=False),
        "one_live_owner", "nodes",
    ),
    Mutant(
        "no_takeover_after_crash",
        "issue 14, part 5 (several nodes): the owner node crashes and no survivor adopts its contexts, so the "
        "store's unfinished events wait for a lease nobody renews and the user waits forever",
        "glue: no node adopts a context's delivery from a dead holder (only an append takes the lease)",
        lambda model: replace(model, adopt=False),
        "every_event_acked_or_escalated", "nodes",
    ),
    Mutant(
        "lost_notification_no_poll",
        "issue 14, part 5 (several nodes): a relay learns of the owner's SENT records only from LISTEN/NOTIFY, "
        "which can be lost or delayed, and has no poll to fall back on",
        "glue: no poll: time passes while a relay has not read the store (only a notification, which may "
        "never come, catches it up)",
        lambda model: replace(model, poll=False),
        "relay_within_poll_bound", "nodes",
    ),
    Mutant(
        "escalation_reads_local_sessions",
        "broken pipe 1 across nodes (issue 14, part 5): the owner decides no_session from its own node's "
        "sockets instead of re-reading the sessions table, so a user on another node is told nobody is there",
        "glue: the owner's has_session counts only READY sessions on its own node",
        lambda model: replace(model, session_view="owner_node"),
        "no_session_only_when_none_ready", "nodes",
    ),
    Mutant(
        "per_node_limit_counter",
        "validation gap 7 across nodes (issue 14, part 5): each node counts the account's connections on its "
        "own sockets, so two nodes together admit more than the limit",
        "glue: account_full counts the resolving node's attached sockets, not the store's total",
        lambda model: replace(model, limit_count="per_node"),
        "connection_limits_respected", "nodes",
    ),
)

BY_NAME: dict[str, Mutant] = {m.name: m for m in MUTANTS}


def seed_table_markdown() -> str:
    """The zoo as docs/proofs.md prints it ("The mutant zoo and the seed"): which seed failure each
    mutant reproduces, the delta, the property that must catch it and the scenario that exposes it."""
    lines = ["| mutant | seed failure it reproduces | delta | caught by | scenario |", "|---|---|---|---|---|"]
    lines += [f"| {m.name} | {m.seed} | {m.delta.replace('|', '/')} | {m.prop} | {m.scenario} |" for m in MUTANTS]
    return "\n".join(lines)
