"""The composed system: N users x M sessions x K events x A attempts (docs/model.md, "composition").

Components are indexed families of the four declared machines: one connection per session
slot, one context registry and one run per user, and up to K delivery machines per user (the
context's stream). Every system action fires one or more component transitions *by event name*;
whether it is enabled, and what it does to each component, comes only from the machines'
declarations. What lives here is the glue: which components an action touches, the inputs it
supplies (``has_session``, ``account_full``), routing (which session may read which stream) and
the client's knowledge (which events it has received, what it resumes from).

Actions interleave freely, so the explorer sees what a real server sees: two inits for one user
racing through auth and context resolution, a socket dropped between a send and its ack, an ack
arriving after a retry went out, a resume on another session, model time passing between any two
steps. Nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

from pipeproof.errors import ModelDefinitionError
from pipeproof.model.composition import (
    APPEND,
    BY_NAME,
    CLIENT_CONN_ACTIONS,
    SERVER_CONN_ACTIONS,
    Action,
    Fires,
    describe_args,
)
from pipeproof.model.connection import ACK_SENT, ATTACHED, CONNECTION, Conn
from pipeproof.model.context import CONNS, EPOCH, Ctx, context_machine
from pipeproof.model.delivery import DELIVERED, Delivery, delivery_machine
from pipeproof.model.run import AGENT_EVENTS, Run, run_machine
from pipeproof.model.spec import Config, Machine, Transition

FAMILIES = ("conn", "ctx", "run", "event")


def input_choices(action: Action) -> tuple[dict[str, bool], ...]:
    """Every combination of the boolean inputs a ``conn`` action declares (``({},)`` for none):
    the explorer and Z3 try each, the shell supplies the real fact."""
    return tuple(dict(zip(action.inputs, combo, strict=True))
                 for combo in itertools.product((False, True), repeat=len(action.inputs)))


def reads_inputs(t: Transition, inputs: dict[str, bool]) -> bool:
    """Whether ``t``'s guard reads one of ``inputs`` set to True: a True choice that the
    transition ignores would only repeat the all-False successor."""
    read = {n for kind, n in t.guard.names() if kind == "input"}
    return not any(v for k, v in inputs.items() if k not in read)


@dataclass(frozen=True)
class Bounds:
    """The finite instance the explorer and Hypothesis check (docs/model.md, "bounds")."""

    users: int = 2
    sessions_per_user: int = 2
    events_per_user: int = 2
    max_attempts: int = 2
    buffer_max: int = 1
    error_budget: int = 1  # malformed frames answered before the next one closes invalid_message
    # Ticks of model time. 0 and 0 is the untimed abstraction: a timeout may fire at any moment
    # after its trigger (racing the ack), the clock never ticks, and no horizon is checked.
    ack_timeout: int = 1
    resume_window: int = 1
    max_steps: int = 1
    max_connections_per_user: int = 1
    max_connections_per_account: int = 2
    runs: int = -1  # users 0..runs-1 have an agent run (-1: every user); others only connect
    frames: bool = True  # client data frames (pipelining, handling); off: only init/ack/drop
    clock: bool = True  # model time (timeouts, resume window, liveness horizon)
    drain: bool = True  # server shutdown (DRAINING)
    # Server nodes sharing one store (docs/model.md, "nodes"); session s lives on node s mod nodes.
    # 1 is the single-node server: no crash, no relay, the leases never change hands.
    nodes: int = 1
    crash: bool = True  # a node may crash (only while another node is up to take over)

    def __post_init__(self) -> None:
        for name in ("users", "sessions_per_user", "events_per_user", "max_attempts", "nodes"):
            if getattr(self, name) < 1:
                raise ModelDefinitionError("system", "bounds", f"{name} must be at least 1")
        if self.ack_timeout < 0 or self.resume_window < 0:
            raise ModelDefinitionError("system", "bounds", "ack_timeout and resume_window must be >= 0")
        if self.events_per_user < 2:
            raise ModelDefinitionError("system", "bounds", "events_per_user must be at least 2 (start + terminal)")

    @property
    def timed(self) -> bool:
        return self.clock and (self.ack_timeout > 0 or self.resume_window > 0)

    @property
    def sessions(self) -> int:
        return self.users * self.sessions_per_user

    @property
    def crashes(self) -> bool:
        """Whether a node can crash: only with a survivor to take over its work."""
        return self.crash and self.nodes > 1

    def describe(self) -> str:
        nodes = f" on {self.nodes} nodes" if self.nodes > 1 else ""
        return (
            f"{self.users} users x {self.sessions_per_user} sessions x {self.events_per_user} events"
            f" x {self.max_attempts} attempts{nodes} (buffer {self.buffer_max}, ack_timeout {self.ack_timeout},"
            f" resume_window {self.resume_window}, per-user limit {self.max_connections_per_user},"
            f" per-account limit {self.max_connections_per_account})"
        )


class State(NamedTuple):
    """One global state. Hashable; the explorer stores these."""

    conns: tuple[Config, ...]  # per session slot
    ctxs: tuple[Config, ...]  # per user
    runs: tuple[Config, ...]  # per user (one run each)
    events: tuple[tuple[Config, ...], ...]  # per user: the stream, seq = index + 1
    kinds: tuple[tuple[str, ...], ...]  # per user: the agent event kind at each seq
    resume: tuple[int, ...]  # per session: last_seq sent with resume (-1: none)
    epoch_seen: tuple[int, ...]  # per session: context epoch handed to it (0: none)
    # Nodes (docs/model.md, "nodes"). The store's leases and each node's own belief are apart on
    # purpose: a takeover that does not compare-and-set leaves two nodes believing they own.
    up: tuple[bool, ...] = ()  # per node: alive
    lease: tuple[int, ...] = ()  # per user: the store's delivery lease, its holder node (-1: free)
    holds: tuple[int, ...] = ()  # per user: bitmask of the nodes acting as the delivery owner
    run_lease: tuple[int, ...] = ()  # per user: the store's run lease, its holder node
    run_holds: tuple[int, ...] = ()  # per user: bitmask of the nodes acting as the run's holder
    behind: tuple[int, ...] = ()  # per (user, node), user * nodes + node: 1 while that relay has
    # not read the user's latest SENT record from the store (its write to its sessions is due)


class Firing(NamedTuple):
    """One component transition inside a step (what the step properties inspect)."""

    family: str
    index: tuple[int, ...]  # type: ignore[assignment]  # shadows tuple.index; the name reads best
    transition: Transition
    before: Config
    after: Config


class Step(NamedTuple):
    action: str
    actor: str  # "client", "server" or "clock"
    args: tuple[int, ...]
    firings: tuple[Firing, ...]
    after: State

    def describe(self, system: System) -> str:
        return system.describe_step(self)


RouteFn = Callable[["System", State, int, int], bool]

SESSION_VIEWS = ("store", "owner_node")
"""Which READY sessions the delivery owner counts as the user's (``SystemModel.session_view``):
the store's sessions table, every live node's ("store", the design), or its own node's only."""
LIMIT_COUNTS = ("store", "per_node")
"""Where the account's connection count is kept (``SystemModel.limit_count``): in the store,
across every node ("store", the design), or by each node for its own sockets."""


def same_user(system: System, state: State, session: int, user: int) -> bool:
    """A session reads and acks only its own user's stream (docs/protocol.md section 3)."""
    return system.owner(session) == user


@dataclass(frozen=True)
class SystemModel:
    """The four machines plus the glue choices; mutants are ``replace``-d copies of this."""

    connection: Machine
    context: Machine
    delivery: Machine
    run: Machine
    route: RouteFn = same_user
    name: str = "reference"
    # Node glue (docs/model.md, "nodes"): each is the design's choice; a mutant flips one.
    cas: bool = True  # a lease takeover is a compare-and-set on the store's lease
    adopt: bool = True  # a survivor adopts a dead holder's context (its unfinished events)
    poll: bool = True  # a relay also polls the store, so it is never behind when time passes
    session_view: str = "store"  # see SESSION_VIEWS
    limit_count: str = "store"  # see LIMIT_COUNTS

    def __post_init__(self) -> None:
        if self.session_view not in SESSION_VIEWS or self.limit_count not in LIMIT_COUNTS:
            raise ModelDefinitionError("system", "node_glue",
                                       f"session_view {self.session_view!r} / limit_count {self.limit_count!r}")


def reference_model(bounds: Bounds) -> SystemModel:
    """The model the protocol describes, at ``bounds``."""
    return SystemModel(
        connection=CONNECTION.with_params(buffer_max=bounds.buffer_max, error_budget=bounds.error_budget),
        context=context_machine(bounds.max_connections_per_user),
        delivery=delivery_machine(bounds.max_attempts, bounds.ack_timeout, bounds.resume_window),
        run=run_machine(bounds.max_steps),
    )


@dataclass
class System:
    """Successor function over ``State`` for one ``SystemModel`` at one ``Bounds``."""

    bounds: Bounds
    model: SystemModel = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = reference_model(self.bounds)

    # -- indexing ------------------------------------------------------------------------------
    def owner(self, session: int) -> int:
        return session // self.bounds.sessions_per_user

    def sessions_of(self, user: int) -> range:
        k = self.bounds.sessions_per_user
        return range(user * k, (user + 1) * k)

    def node_of(self, session: int) -> int:
        """The node a session's socket is on: a fixed assignment, so one user's sessions spread
        over the nodes (docs/model.md, "nodes")."""
        return session % self.bounds.nodes

    def run_home(self, user: int) -> int:
        """The node the user's run starts on (where run.start arrived): its first session's."""
        return self.node_of(user * self.bounds.sessions_per_user)

    def initial(self) -> State:
        b = self.bounds
        m = self.model
        return State(
            conns=tuple(m.connection.initial_config() for _ in range(b.sessions)),
            ctxs=tuple(m.context.initial_config() for _ in range(b.users)),
            runs=tuple(m.run.initial_config() for _ in range(b.users)),
            events=tuple(() for _ in range(b.users)),
            kinds=tuple(() for _ in range(b.users)),
            resume=tuple(-1 for _ in range(b.sessions)),
            epoch_seen=tuple(0 for _ in range(b.sessions)),
            up=tuple(True for _ in range(b.nodes)),
            lease=tuple(-1 for _ in range(b.users)),
            holds=tuple(0 for _ in range(b.users)),
            run_lease=tuple(self.run_home(u) for u in range(b.users)),
            run_holds=tuple(1 << self.run_home(u) for u in range(b.users)),
            behind=tuple(0 for _ in range(b.users * b.nodes)),
        )

    # -- derived facts (inputs to guards) ------------------------------------------------------
    def live_session(self, state: State, session: int) -> bool:
        return self._live(state.conns[session])

    def has_session(self, state: State, user: int) -> bool:
        """Some session routed to ``user``'s stream is READY and acked: it can take an event now."""
        return self._has_session(_StateReads(self, state), user)

    def account_full(self, state: State) -> bool:
        return self._account_full(_StateReads(self, state))

    def can_decide(self, state: State, user: int) -> bool:
        """A live node owns ``user``'s delivery, or one could adopt it now (its decisions are
        possible): what every_event_acked_or_escalated's "no live event is stuck" asks of nodes."""
        v = _StateReads(self, state)
        if self._live_owner(v, user) >= 0:
            return True
        return self._may_take(v, user) and any(v.up(n) and not v.holds(user) >> n & 1
                                               for n in range(self.bounds.nodes))

    def delivered_prefix(self, state: State, user: int) -> int:
        """Highest seq N such that the client has received every event 1..N of ``user``'s stream."""
        return self._delivered_prefix(_StateReads(self, state), user)

    # The same facts over ``_Reads``: the rules below read a state only through that interface,
    # so the explorer's fast path (model/check/compiled.py) can see exactly what each one read.
    @staticmethod
    def _live(conn: Config) -> bool:
        return conn[0] is Conn.READY and bool(conn[1][ACK_SENT])

    def _has_session(self, v: _Reads, user: int) -> bool:
        """A READY, acked session routed to ``user`` on a live node (the store's sessions table,
        which the owner re-reads before escalating); under the ``owner_node`` view, only one on
        the delivery owner's own node."""
        nodes = self.bounds.nodes
        if self.model.session_view == "owner_node":
            owner = self._live_owner(v, user)
            return owner >= 0 and any(self._live(v.conn(s)) and v.routed(s, user)
                                      for s in range(owner, self.bounds.sessions, nodes))
        return any(self._live(v.conn(s)) and v.routed(s, user) and (nodes == 1 or v.up(s % nodes))
                   for s in range(self.bounds.sessions))

    def _account_full(self, v: _Reads, node: int = 0) -> bool:
        """The account's count as the resolving ``node`` sees it: the store's (the sum of every
        user's registry count, every node's sockets) or, under ``per_node``, its own sockets."""
        # One account holds every user in the finite instance: the per-account limit is global.
        if self.model.limit_count == "per_node":
            total = sum(1 for s in range(node, self.bounds.sessions, self.bounds.nodes)
                        if v.conn(s)[0] in ATTACHED)
        else:
            total = sum(int(v.ctx(u)[1][CONNS]) for u in range(self.bounds.users))
        return total >= self.bounds.max_connections_per_account

    def _live_owner(self, v: _Reads, user: int) -> int:
        """The lowest live node acting as ``user``'s delivery owner (-1: none, until a survivor
        adopts the context); with one node, node 0 from the first append on."""
        holds = v.holds(user)
        for n in range(self.bounds.nodes):
            if holds >> n & 1 and (self.bounds.nodes == 1 or v.up(n)):
                return n
        return -1

    def _live_run_holder(self, v: _Reads, user: int) -> int:
        """The lowest live node acting as the holder of ``user``'s run (-1: none)."""
        holds = v.run_holds(user)
        for n in range(self.bounds.nodes):
            if holds >> n & 1 and (self.bounds.nodes == 1 or v.up(n)):
                return n
        return -1

    def _may_take(self, v: _Reads, user: int) -> bool:
        """Whether a node may write itself into ``user``'s delivery lease: a compare-and-set that
        finds it free, or held by a dead node (``SystemModel.adopt``: a survivor takes over);
        without compare-and-set (``cas`` off), whatever it holds."""
        m = self.model
        lease = v.lease(user)
        return not m.cas or lease < 0 or (m.adopt and not v.up(lease))

    def _node_down(self, v: _Reads, s: int) -> bool:
        return self.bounds.nodes > 1 and not v.up(s % self.bounds.nodes)

    def _delivered_prefix(self, v: _Reads, user: int) -> int:
        n = 0
        for i in range(v.stream_len(user)):
            if not v.event(user, i)[1][DELIVERED]:
                break
            n += 1
        return n

    # -- the successor function ----------------------------------------------------------------
    def successors(self, state: State) -> Iterator[Step]:
        """Every step enabled in ``state``: the rules of :func:`_rules` in order, each yielding
        its local steps, applied to ``state``."""
        v = _StateReads(self, state)
        for rule, arg in _rules(self.bounds):
            for local in rule(self, v, *arg):
                yield Step(local.action, local.actor, local.args, local.firings, _apply(state, local.writes))

    def _fire(self, machine: Machine, cfg: Config, event: str, inputs: dict[str, bool] | None = None
              ) -> list[tuple[Transition, Config]]:
        if event not in machine.events_from[cfg[0]]:
            return []
        return machine.fire_all(cfg, event, inputs)

    def _conn_steps(self, v: _Reads, s: int, ca: Action, name: str | None = None) -> Iterator[_Local]:
        """Fire a ``conn`` action's connection event alone, detaching from the context when an
        attached socket closes (model/composition.py)."""
        m = self.model
        event, action, actor = ca.event, name or ca.name, ca.actor
        conn = v.conn(s)
        if event not in m.connection.events_from[conn[0]]:
            return
        if ca.inputs:
            fired = [(t, after) for inputs in input_choices(ca)
                     for t, after in m.connection.fire_all(conn, event, inputs) if reads_inputs(t, inputs)]
        else:
            fired = m.connection.fire_all(conn, event)  # the one choice, {}, which every guard reads
        for t, after in fired:
            firings = [Firing("conn", (s,), t, conn, after)]
            writes: list[_Write] = [("conns", s, after)]
            if conn[0] in ATTACHED and t.target not in ATTACHED:
                u = self.owner(s)
                ctx = v.ctx(u)
                det = self._fire(m.context, ctx, "detach")
                if not det:
                    continue  # the registry refuses: no consistent successor (caught by invariants)
                dt, dafter = det[0]
                firings.append(Firing("ctx", (u,), dt, ctx, dafter))
                writes.append(("ctxs", u, dafter))
            yield _Local(action, actor, (s,), tuple(firings), tuple(writes))

    def _client_conn_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        conn = v.conn(s)
        if not self.model.connection.events_from[conn[0]]:
            return  # a closed socket does nothing
        if self._node_down(v, s):
            return  # its node crashed: the socket is gone, only server_node_lost ends it
        for ca in CLIENT_CONN_ACTIONS:
            if not ca.flag or getattr(self.bounds, ca.flag):
                yield from self._conn_steps(v, s, ca)
            if ca.name == "client_init" and conn[0] is Conn.OPEN:
                prefix = self._delivered_prefix(v, self.owner(s))
                if prefix > 0:
                    for local in self._conn_steps(v, s, ca, "client_init_resume"):
                        yield local._replace(writes=(*local.writes, ("resume", s, prefix)))

    def _client_ack_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        conn = v.conn(s)
        if self.model.connection.events_from[conn[0]] and self._live(conn) and not self._node_down(v, s):
            yield from self._ack_steps(v, s)

    def _client_cancel_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        conn = v.conn(s)
        if not (self.model.connection.events_from[conn[0]] and self._live(conn)) or self._node_down(v, s):
            return
        u = self.owner(s)
        cfg = v.run(u)
        for t, after in self._fire(self.model.run, cfg, "cancel"):
            yield _Local("client_cancel", "client", (s,), (Firing("run", (u,), t, cfg, after),), (("runs", u, after),))

    def _ack_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        """Cumulative acks through seq n, for any stream this session is routed to."""
        for u in range(self.bounds.users):
            if not v.routed(s, u):
                continue
            prefix = self._delivered_prefix(v, u)
            for n in range(1, prefix + 1):
                if v.event(u, n - 1)[0] in self.model.delivery.terminal:
                    continue
                for firings, writes in self._ack_through(v, u, n):
                    yield _Local("client_ack", "client", (s, u, n), firings, writes)

    def _ack_through(self, v: _Reads, u: int, n: int) -> Iterator[tuple[tuple[Firing, ...], tuple[_Write, ...]]]:
        """The effect of a cumulative ack through ``n``: one outcome, or none when the ack could
        not have been sent (it names an event the client never received)."""
        firings: list[Firing] = []
        writes: list[_Write] = []
        for i in range(n):
            cfg = v.event(u, i)
            if cfg[0] in self.model.delivery.terminal:
                continue
            fired = self._fire(self.model.delivery, cfg, "ack")
            if not fired:
                return
            t, after = fired[0]
            firings.append(Firing("event", (u, i + 1), t, cfg, after))
            writes.append(("events", (u, i), after))
        yield tuple(firings), tuple(writes)

    def _resolve_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        """Atomic get-or-create of the user's context, then READY (or a limit rejection)."""
        m = self.model
        conn = v.conn(s)
        if not m.connection.events_from[conn[0]]:
            return
        if not m.connection.transitions_from(conn[0], "auth_ok") and not m.connection.transitions_from(
            conn[0], "limit_reject"
        ):
            return
        if self._node_down(v, s):
            return
        u = self.owner(s)
        full = v.account_full(self.node_of(s))
        ctx = v.ctx(u)
        for event in ("create", "attach", "reject_limit"):
            for ct, cafter in self._fire(m.context, ctx, event, {"account_full": full}):
                conn_event = "limit_reject" if event == "reject_limit" else "auth_ok"
                for t, after in self._fire(m.connection, conn, conn_event):
                    firings = (Firing("ctx", (u,), ct, ctx, cafter), Firing("conn", (s,), t, conn, after))
                    writes: tuple[_Write, ...] = (
                        ("conns", s, after), ("ctxs", u, cafter),
                        ("epoch_seen", s, int(cafter[1][EPOCH]) if conn_event == "auth_ok" else 0),
                    )
                    if conn_event == "auth_ok":
                        resume = v.resume(s)
                        if resume > 0:
                            # Resume acks everything through last_seq (section 5).
                            for acks, events in self._ack_through(v, u, resume):
                                yield _Local("server_resolve", "server", (s,), (*firings, *acks), (*writes, *events))
                            continue
                    yield _Local("server_resolve", "server", (s,), firings, writes)

    def _server_conn_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        if not self.model.connection.events_from[v.conn(s)[0]] or self._node_down(v, s):
            return
        for ca in SERVER_CONN_ACTIONS:
            if not ca.flag or getattr(self.bounds, ca.flag):
                yield from self._conn_steps(v, s, ca)

    def _send_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        """Write the oldest sendable event of a routed stream; the write may succeed or fail."""
        m = self.model
        conn = v.conn(s)
        if not m.connection.events_from[conn[0]]:
            return
        delivers = self._fire(m.connection, conn, "deliver")
        if not delivers:
            return  # nothing can be written on this socket (read first: it is the cheapest test)
        if self._node_down(v, s):
            return
        nodes = self.bounds.nodes
        node = s % nodes
        for u in range(self.bounds.users):
            if not v.routed(s, u):
                continue
            if self._live_owner(v, u) < 0:
                continue  # only the delivery owner decides a send; none until a survivor adopts
            # The owner records the attempt SENT in the store; a session on another node is written
            # by that node, a relay, once it has read the record (notification or poll).
            relay: tuple[_Write, ...] = ()
            if nodes > 1 and not v.holds(u) >> node & 1:
                relay = (("behind", u * nodes + node, 1),)
            for i in range(v.stream_len(u)):
                cfg = v.event(u, i)
                sends = self._fire(m.delivery, cfg, "send")
                if not sends:
                    continue
                for ct, cafter in delivers:
                    for t, after in sends:
                        firings = (Firing("conn", (s,), ct, conn, cafter), Firing("event", (u, i + 1), t, cfg, after))
                        yield _Local("server_send", "server", (s, u, i + 1), firings,
                                     (("conns", s, cafter), ("events", (u, i), after), *relay))
                    for ft, fafter in self._fire(m.delivery, cfg, "send_failed"):
                        for local in self._conn_steps(v, s, SEND_ERROR, "server_send_failed"):
                            yield _Local("server_send_failed", "server", (s, u, i + 1),
                                         (*local.firings, Firing("event", (u, i + 1), ft, cfg, fafter)),
                                         (*local.writes, ("events", (u, i), fafter)))
                break  # in order: only the oldest sendable event of a stream goes next

    def _expire_steps(self, v: _Reads, u: int) -> Iterator[_Local]:
        cfg = v.ctx(u)
        for t, after in self._fire(self.model.context, cfg, "expire"):
            yield _Local("server_expire_context", "server", (u,), (Firing("ctx", (u,), t, cfg, after),),
                         (("ctxs", u, after),))

    def _run_steps(self, v: _Reads, u: int) -> Iterator[_Local]:
        m = self.model
        if v.ctx(u)[0] is not Ctx.LIVE:
            return  # a run belongs to a live context
        if 0 <= self.bounds.runs <= u:
            return
        cfg = v.run(u)
        for event in m.run.events:
            if event == "cancel":
                continue  # the client's action
            for t, after in self._fire(m.run, cfg, event):
                holder = self._live_run_holder(v, u)
                if holder < 0:
                    return  # fenced: a run steps only while a live node holds its lease
                firings = [Firing("run", (u,), t, cfg, after)]
                writes: list[_Write] = [("runs", u, after)]
                if event in AGENT_EVENTS:
                    # An emission that leaves the run unfinished keeps one slot for its terminal
                    # event, so every run can finish within the bounds.
                    appended = v.stream_len(u)
                    room = self.bounds.events_per_user - appended - (0 if t.target in m.run.terminal else 1)
                    if room <= 0:
                        continue
                    new = m.delivery.initial_config()
                    firings.append(Firing("event", (u, appended + 1), _APPEND, new, new))
                    writes += [("events", (u, appended), new), ("kinds", u, (*v.kinds(u), event))]
                    # The appending node takes the delivery lease when it is free or its holder's
                    # node is dead (compare-and-set in the store).
                    lease = v.lease(u)
                    if lease < 0 or (self.bounds.nodes > 1 and not v.up(lease)):
                        writes += [("lease", u, holder), ("holds", u, v.holds(u) | 1 << holder)]
                yield _Local(f"server_run_{event}", "server", (u,), tuple(firings), tuple(writes))

    def _timeout_steps(self, v: _Reads, u: int, i: int) -> Iterator[_Local]:
        """The deadlines of event ``i`` of ``user``'s stream (one rule per stream slot)."""
        if i >= v.stream_len(u):
            return
        m = self.model
        cfg = v.event(u, i)
        events = [e for e in ("ack_timeout", "no_session_timeout") if e in m.delivery.events_from[cfg[0]]]
        if not events:
            return
        if self._live_owner(v, u) < 0:
            return  # the delivery owner decides resend and escalation; none until a survivor adopts
        has = v.has_session(u)
        for event in events:
            for t, after in m.delivery.fire_all(cfg, event, {"has_session": has}):
                yield _Local(f"server_{event}", "server", (u, i + 1), (Firing("event", (u, i + 1), t, cfg, after),),
                             (("events", (u, i), after),))

    def _clock_steps(self, v: _Reads) -> Iterator[_Local]:
        """Model time passes for every live event at once, unless a deadline is due."""
        m = self.model
        b = self.bounds
        if b.nodes > 1 and m.poll and any(v.behind(u, n) for u in range(b.users) for n in range(b.nodes)):
            return  # a relay's poll is due before time passes (the poll bound), like a deadline
        firings: list[Firing] = []
        writes: list[_Write] = []
        for u in range(self.bounds.users):
            has: bool | None = None
            for i in range(v.stream_len(u)):
                cfg = v.event(u, i)
                if cfg[0] in m.delivery.terminal:
                    continue
                if has is None:
                    has = v.has_session(u)
                fired = self._fire(m.delivery, cfg, "tick", {"has_session": has})
                if not fired:
                    return
                t, after = fired[0]
                firings.append(Firing("event", (u, i + 1), t, cfg, after))
                writes.append(("events", (u, i), after))
        if firings:
            yield _Local("tick", "clock", (), tuple(firings), tuple(writes))

    # -- nodes (docs/model.md, "nodes") ----------------------------------------------------------
    def _node_lost_steps(self, v: _Reads, s: int) -> Iterator[_Local]:
        """A crashed node's socket: the client sees it drop, and the store's row goes with it."""
        if not self._node_down(v, s) or not self.model.connection.events_from[v.conn(s)[0]]:
            return
        yield from self._conn_steps(v, s, NODE_LOST)

    def _crash_steps(self, v: _Reads, n: int) -> Iterator[_Local]:
        """Node ``n`` crashes: its sockets drop (``server_node_lost``), its in-memory ownership is
        gone, its leases stay in the store until they expire (a survivor sees a dead holder)."""
        b = self.bounds
        if not v.up(n) or not any(v.up(k) for k in range(b.nodes) if k != n):
            return  # the model keeps one survivor to take over
        bit = 1 << n
        writes: list[_Write] = [("up", n, False)]
        for u in range(b.users):
            if v.holds(u) & bit:
                writes.append(("holds", u, v.holds(u) & ~bit))
            if v.run_holds(u) & bit:
                writes.append(("run_holds", u, v.run_holds(u) & ~bit))
            if v.behind(u, n):
                writes.append(("behind", u * b.nodes + n, 0))
        yield _Local("server_node_crash", "server", (n,), (), tuple(writes))

    def _adopt_steps(self, v: _Reads, u: int, n: int) -> Iterator[_Local]:
        """Node ``n`` takes over ``u``'s delivery (the store's unfinished events) or run from a
        dead holder: a compare-and-set on the lease (``SystemModel.cas``)."""
        if not v.up(n):
            return
        m = self.model
        bit = 1 << n
        # Worth taking: the store has an unfinished event to adopt, or this node has a READY
        # session of the user (the design's claim of a free lease by a session's node).
        if not v.holds(u) & bit and (
                any(v.event(u, i)[0] not in m.delivery.terminal for i in range(v.stream_len(u)))
                or any(self._live(v.conn(s)) for s in self.sessions_of(u) if s % self.bounds.nodes == n)) \
                and self._may_take(v, u):
            yield _Local("server_adopt_delivery", "server", (u, n), (),
                         (("lease", u, n), ("holds", u, v.holds(u) | bit)))
        adoptable = not v.run_holds(u) & bit and v.ctx(u)[0] is Ctx.LIVE and v.run(u)[0] not in m.run.terminal \
            and not 0 <= self.bounds.runs <= u
        if adoptable and (not m.cas or not v.up(v.run_lease(u))):
            yield _Local("server_adopt_run", "server", (u, n), (),
                         (("run_lease", u, n), ("run_holds", u, v.run_holds(u) | bit)))

    def _catch_up_steps(self, v: _Reads, u: int, n: int) -> Iterator[_Local]:
        """Relay ``n`` reads ``u``'s SENT records from the store (a NOTIFY arrived, or its poll)
        and writes them to its sessions."""
        if v.behind(u, n):
            yield _Local("server_relay_catch_up", "server", (u, n), (), (("behind", u * self.bounds.nodes + n, 0),))

    # -- rendering -----------------------------------------------------------------------------
    def describe_step(self, step: Step) -> str:
        who = {"client": "client", "server": "server", "clock": "clock"}[step.actor]
        owner = self.owner(step.args[0]) if BY_NAME.get(step.action, _NO_ACTION).args == ("session",) \
            and step.args else None
        args = describe_args(step.action, step.args, owner)
        changes = "; ".join(
            f"{f.family}[{','.join(map(str, f.index))}] {f.transition.event}: {_show(self, f.family, f.before)}"
            f" -> {_show(self, f.family, f.after)}"
            for f in step.firings
        ) or self._describe_node_glue(step)
        return f"{who:<6} {step.action}({', '.join(args)}): {changes}"

    def _describe_node_glue(self, step: Step) -> str:
        """What a node step (no machine transition: only the store's leases, the nodes' beliefs
        and the relays' lag) left behind, read off its after-state."""
        after, a = step.after, step.args

        def nodes(mask: int) -> str:
            return "{" + ", ".join(f"n{n}" for n in range(self.bounds.nodes) if mask >> n & 1) + "}"

        if step.action == "server_node_crash":
            return f"node n{a[0]} down (its sockets drop, its leases expire)"
        if step.action == "server_adopt_delivery":
            return f"delivery lease of u{a[0]} -> n{after.lease[a[0]]}, owners {nodes(after.holds[a[0]])}"
        if step.action == "server_adopt_run":
            return f"run lease of u{a[0]} -> n{after.run_lease[a[0]]}, holders {nodes(after.run_holds[a[0]])}"
        if step.action == "server_relay_catch_up":
            return f"relay n{a[1]} read u{a[0]}'s SENT records and wrote them to its sessions"
        return ""

    def machine(self, family: str) -> Machine:
        return {"conn": self.model.connection, "ctx": self.model.context, "run": self.model.run,
                "event": self.model.delivery}[family]


def _show(system: System, family: str, cfg: Config) -> str:
    return system.machine(family).describe(cfg)


# The connection half of server_send_failed (its event half is the delivery machine's send_failed).
SEND_ERROR = Action("server_send_failed", "server", "conn", (Fires("conn", ("send_error",)),),
                     doc="the connection half of server_send_failed")
NODE_LOST = BY_NAME["server_node_lost"]
_NO_ACTION = Action("", "server", "", ())

_APPEND = Transition(APPEND, Delivery.PENDING, Delivery.PENDING, doc="appended to the durable stream")


_Write = tuple[str, Any, Any]
"""One component a step changes: (State field, index, new value). ``events`` is indexed by
(user, position); a position equal to the stream's length appends."""


class _Local(NamedTuple):
    """A step as a rule yields it: what it fired and what it writes, not yet applied to a state."""

    action: str
    actor: str
    args: tuple[int, ...]
    firings: tuple[Firing, ...]
    writes: tuple[_Write, ...]


class _Reads(Protocol):
    """What a rule may read of a global state, one component at a time (docs/model.md, "explorer").

    The rules read a state only through this interface. ``System.successors`` reads a ``State``
    (:class:`_StateReads`); the explorer's fast path (model/check/compiled.py) reads its interned
    encoding and records every read, so it can reuse a rule's result for every state that agrees
    on what the rule read. ``has_session``, ``account_full`` and ``routed`` are the derived facts
    (System._has_session, System._account_full, the model's route function).
    """

    def conn(self, s: int) -> Config: ...
    def ctx(self, u: int) -> Config: ...
    def run(self, u: int) -> Config: ...
    def stream_len(self, u: int) -> int: ...
    def event(self, u: int, i: int) -> Config: ...
    def kinds(self, u: int) -> tuple[str, ...]: ...
    def resume(self, s: int) -> int: ...
    def up(self, n: int) -> bool: ...
    def lease(self, u: int) -> int: ...
    def holds(self, u: int) -> int: ...
    def run_lease(self, u: int) -> int: ...
    def run_holds(self, u: int) -> int: ...
    def behind(self, u: int, n: int) -> int: ...
    def has_session(self, u: int) -> bool: ...
    def account_full(self, n: int = 0) -> bool: ...
    def routed(self, s: int, u: int) -> bool: ...


class _StateReads:
    """:class:`_Reads` over a ``State``."""

    __slots__ = ("state", "system")

    def __init__(self, system: System, state: State) -> None:
        self.system = system
        self.state = state

    def conn(self, s: int) -> Config:
        return self.state.conns[s]

    def ctx(self, u: int) -> Config:
        return self.state.ctxs[u]

    def run(self, u: int) -> Config:
        return self.state.runs[u]

    def stream_len(self, u: int) -> int:
        return len(self.state.events[u])

    def event(self, u: int, i: int) -> Config:
        return self.state.events[u][i]

    def kinds(self, u: int) -> tuple[str, ...]:
        return self.state.kinds[u]

    def resume(self, s: int) -> int:
        return self.state.resume[s]

    def up(self, n: int) -> bool:
        return self.state.up[n]

    def lease(self, u: int) -> int:
        return self.state.lease[u]

    def holds(self, u: int) -> int:
        return self.state.holds[u]

    def run_lease(self, u: int) -> int:
        return self.state.run_lease[u]

    def run_holds(self, u: int) -> int:
        return self.state.run_holds[u]

    def behind(self, u: int, n: int) -> int:
        return self.state.behind[u * self.system.bounds.nodes + n]

    def has_session(self, u: int) -> bool:
        return self.system._has_session(self, u)

    def account_full(self, n: int = 0) -> bool:
        return self.system._account_full(self, n)

    def routed(self, s: int, u: int) -> bool:
        return self.system.model.route(self.system, self.state, s, u)


_Rule = Callable[..., Iterator[_Local]]


@functools.cache
def _rules(bounds: Bounds) -> tuple[tuple[_Rule, tuple[int, ...]], ...]:
    """The successor function's rules in the order ``System.successors`` yields their steps:
    per session the client's actions, then per session the server's, then per user the run,
    the context's expiry and each stream slot's deadlines, then the clock. Each rule is a
    ``System`` method and its arguments; the fast explorer memoizes each one separately."""
    client = (System._client_conn_steps, System._client_ack_steps, System._client_cancel_steps)
    server = (System._resolve_steps, System._server_conn_steps, System._send_steps)
    out: list[tuple[_Rule, tuple[int, ...]]] = []
    out += [(rule, (s,)) for s in range(bounds.sessions) for rule in client]
    out += [(rule, (s,)) for s in range(bounds.sessions) for rule in server]
    for u in range(bounds.users):
        out += [(System._expire_steps, (u,)), (System._run_steps, (u,))]
        out += [(System._timeout_steps, (u, i)) for i in range(bounds.events_per_user)]
    if bounds.nodes > 1:
        # Nodes last, so a one-node instance has exactly the rules (and the steps) it had before.
        out += [(System._node_lost_steps, (s,)) for s in range(bounds.sessions)]
        out += [(System._crash_steps, (n,)) for n in range(bounds.nodes) if bounds.crashes]
        out += [(rule, (u, n)) for u in range(bounds.users) for n in range(bounds.nodes)
                for rule in (System._adopt_steps, System._catch_up_steps)]
    if bounds.clock:
        out.append((System._clock_steps, ()))
    return tuple(out)


_FIELD: dict[str, int] = {name: k for k, name in enumerate(State._fields)}
_EVENTS = _FIELD["events"]


def _apply(state: State, writes: tuple[_Write, ...]) -> State:
    """``state`` with ``writes`` applied, in order (Hypothesis and the reference explorer call
    this once per step, so it rebuilds only the tuples a write touches)."""
    parts: list[Any] = list(state)
    for name, index, value in writes:
        k = _FIELD[name]
        if k == _EVENTS:
            u, i = index
            events = parts[k]
            stream = events[u]
            stream = (*stream, value) if i == len(stream) else (*stream[:i], value, *stream[i + 1:])
            parts[k] = (*events[:u], stream, *events[u + 1:])
        else:
            field = parts[k]
            parts[k] = (*field[:index], value, *field[index + 1:])
    return State._make(parts)


def with_model(system: System, model: SystemModel) -> System:
    return replace(system, model=model)


__all__ = [
    "CLIENT_CONN_ACTIONS", "SERVER_CONN_ACTIONS", "Bounds", "Ctx", "Firing", "Run", "State", "Step",
    "System", "SystemModel", "reference_model",
]
