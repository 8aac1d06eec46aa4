"""The composition as data: every system action, who takes it, which machine events fire together,
its arguments, inputs and routing (docs/model.md, "composition"; docs/protocol.md sections 1-6).

Rules:
- an action is declared once, here; the explorer's successor function (model/system.py) and the
  Z3 encoding (model/check/z3system.py) take their action names, actors and connection actions from this
  table, and tests/model/test_composition.py holds every step either of them produces to its
  declaration: the step's action is declared, its actor is the declared one, and every component
  transition it fires is one of the declared (family, event) pairs;
- ``conn`` actions fire one connection event alone (plus the context ``detach`` an attached socket
  leaving implies) and are interpreted generically; the other ``glue`` kinds name the routine in
  both encodings that supplies their inputs and routing;
- ``args`` names what the step's ``args`` tuple holds, in order (``session``, ``user``, ``seq``, ``node``),
  which is also how traces and diagrams print a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Actor = Literal["client", "server", "clock"]
Family = Literal["conn", "ctx", "run", "event"]


@dataclass(frozen=True)
class Fires:
    """Component transitions an action may fire: ``events`` of the ``family`` machine."""

    family: Family
    events: tuple[str, ...]


@dataclass(frozen=True)
class Action:
    """One kind of system step."""

    name: str
    actor: Actor
    glue: str  # "conn" (generic), or the routine both encodings implement for it
    fires: tuple[Fires, ...]
    args: tuple[str, ...] = ("session",)
    inputs: tuple[str, ...] = ()
    routing: str = ""  # "owner": the session's own user; "route": the model's routing function
    flag: str = ""  # the Bounds switch that turns the action off ("frames", "drain", "clock")
    doc: str = ""

    @property
    def event(self) -> str:
        """The connection event of a ``conn`` action."""
        return self.fires[0].events[0]

    def allows(self, family: str, event: str) -> bool:
        return any(f.family == family and event in f.events for f in self.fires)


_DETACH = Fires("ctx", ("detach",))
APPEND = "append"  # the pseudo-transition of a run's event joining its stream (model/system.py)


def _conn(event: str, name: str, actor: Actor, flag: str = "", inputs: tuple[str, ...] = (), doc: str = "") -> Action:
    return Action(name, actor, "conn", (Fires("conn", (event,)), _DETACH), inputs=inputs, routing="owner",
                  flag=flag, doc=doc)


RUN_EVENTS = ("validate_ok", "validate_fail", "agent_started", "agent_thinking", "tool_executing",
              "tool_completed", "agent_completed", "agent_failed")

ACTIONS: tuple[Action, ...] = (
    # -- the client (per session) -----------------------------------------------------------------
    _conn("recv_init", "client_init", "client", doc="connection_init"),
    Action("client_init_resume", "client", "init_resume", (Fires("conn", ("recv_init",)), _DETACH),
           routing="owner", doc="connection_init with resume.last_seq = the client's delivered prefix"),
    _conn("recv_frame", "client_frame", "client", flag="frames", inputs=("over_bytes",),
          doc="any other frame (pipelined before READY)"),
    _conn("peer_close", "client_drop", "client", doc="the client closes or the network drops"),
    _conn("recv_oversized", "client_oversized_frame", "client", flag="frames",
          doc="a frame over max_frame_bytes, refused by the WebSocket layer"),
    _conn("recv_bad_framing", "client_bad_framing", "client", flag="frames",
          doc="bytes that break WebSocket framing, refused by the WebSocket layer"),
    Action("client_ack", "client", "ack", (Fires("event", ("ack",)),), args=("session", "user", "seq"),
           routing="route", doc="a cumulative ack through seq, on a stream routed to the session"),
    Action("client_cancel", "client", "cancel", (Fires("run", ("cancel",)),), routing="owner",
           doc="run.cancel on a live session"),
    # -- the server (per session) -----------------------------------------------------------------
    Action("server_resolve", "server", "resolve",
           (Fires("ctx", ("create", "attach", "reject_limit")), Fires("conn", ("auth_ok", "limit_reject")),
            Fires("event", ("ack",))),
           inputs=("account_full",), routing="owner",
           doc="atomic get-or-create of the context, then READY or a limit rejection; resume acks last_seq"),
    _conn("auth_reject", "server_auth_reject", "server"),
    _conn("send_ack", "server_send_ack", "server"),
    _conn("handle_frame", "server_handle", "server", flag="frames"),
    _conn("handle_invalid", "server_handle_invalid", "server", flag="frames"),
    _conn("init_timeout", "server_init_timeout", "server"),
    _conn("heartbeat_timeout", "server_heartbeat_timeout", "server"),
    _conn("drain", "server_drain", "server", flag="drain"),
    _conn("drain_close", "server_drain_close", "server", flag="drain"),
    _conn("shutdown", "server_shutdown", "server", flag="drain"),
    _conn("slow_consumer", "server_slow_consumer", "server"),
    _conn("unavailable", "server_unavailable", "server"),
    _conn("internal_error", "server_internal_error", "server"),
    Action("server_send", "server", "send", (Fires("conn", ("deliver",)), Fires("event", ("send",))),
           args=("session", "user", "seq"), routing="route", doc="the oldest sendable event of a routed stream"),
    Action("server_send_failed", "server", "send",
           (Fires("conn", ("send_error",)), _DETACH, Fires("event", ("send_failed",))),
           args=("session", "user", "seq"), routing="route", doc="the write of that event failed"),
    # -- the server (per user) --------------------------------------------------------------------
    Action("server_expire_context", "server", "expire", (Fires("ctx", ("expire",)),), args=("user",)),
    *(Action(f"server_run_{event}", "server", "run", (Fires("run", (event,)), Fires("event", (APPEND,))),
             args=("user",), doc="a run step; agent events append to the stream")
      for event in RUN_EVENTS),
    Action("server_ack_timeout", "server", "timeout", (Fires("event", ("ack_timeout",)),),
           args=("user", "seq"), inputs=("has_session",)),
    Action("server_no_session_timeout", "server", "timeout", (Fires("event", ("no_session_timeout",)),),
           args=("user", "seq"), inputs=("has_session",)),
    # -- the nodes (docs/model.md, "nodes"; only with more than one) ------------------------------
    Action("server_node_lost", "server", "node_lost", (Fires("conn", ("peer_close",)), _DETACH), routing="owner",
           doc="a socket of a crashed node: the client sees it drop, its row leaves the store"),
    Action("server_node_crash", "server", "crash", (), args=("node",),
           doc="a node crashes: its sockets drop, its ownership ends, its leases expire in the store"),
    Action("server_adopt_delivery", "server", "adopt", (), args=("user", "node"),
           doc="a node takes over a context's delivery from a dead holder (compare-and-set on the lease)"),
    Action("server_adopt_run", "server", "adopt", (), args=("user", "node"),
           doc="a node takes over a run from a dead holder (compare-and-set on the run's lease)"),
    Action("server_relay_catch_up", "server", "catch_up", (), args=("user", "node"),
           doc="a relay reads the owner's SENT records (a NOTIFY arrived, or its poll) and writes them"),
    # -- the clock --------------------------------------------------------------------------------
    Action("tick", "clock", "tick", (Fires("event", ("tick",)),), args=(), inputs=("has_session",), flag="clock",
           doc="model time passes for every live event at once, unless a deadline is due"),
)

BY_NAME: dict[str, Action] = {a.name: a for a in ACTIONS}

CLIENT_CONN_ACTIONS: tuple[Action, ...] = tuple(a for a in ACTIONS if a.glue == "conn" and a.actor == "client")
SERVER_CONN_ACTIONS: tuple[Action, ...] = tuple(a for a in ACTIONS if a.glue == "conn" and a.actor == "server")

SESSION_ACTIONS: frozenset[str] = frozenset(a.name for a in ACTIONS if a.args == ("session",))
EVENT_ACTIONS: frozenset[str] = frozenset(a.name for a in ACTIONS if "seq" in a.args)


def step_problems(action: str, actor: str, firings: list[tuple[str, str]]) -> list[str]:
    """What is wrong with a step (by action name, actor and its (family, event) firings) against
    the declaration; empty when it conforms. The encodings' cross-check test applies this to every
    step they produce."""
    decl = BY_NAME.get(action)
    if decl is None:
        return [f"action {action!r} is not declared"]
    out = [f"{action}: actor {actor!r}, declared {decl.actor!r}"] if actor != decl.actor else []
    out += [f"{action} fires {family}.{event}, which it does not declare"
            for family, event in firings if not decl.allows(family, event)]
    return out


def describe_args(action: str, args: tuple[int, ...], owner: int | None = None) -> list[str]:
    """How a step's arguments read in a trace, from the action's declared ``args``."""
    decl = BY_NAME.get(action)
    names = decl.args if decl is not None else ()
    if names == ("session", "user", "seq") and len(args) == 3:
        if action == "client_ack":
            return [f"session s{args[0]}", f"stream u{args[1]}", f"through seq {args[2]}"]
        return [f"session s{args[0]}", f"event u{args[1]}#{args[2]}"]
    if names == ("user", "seq") and len(args) == 2:
        return [f"event u{args[0]}#{args[1]}"]
    if names == ("user",) and args:
        return [f"user u{args[0]}"]
    if names == ("node",) and args:
        return [f"node n{args[0]}"]
    if names == ("user", "node") and len(args) == 2:
        return [f"user u{args[0]}", f"node n{args[1]}"]
    if names == ("session",) and args:
        return [f"session s{args[0]}" + (f" (user u{owner})" if owner is not None else "")]
    return []


__all__ = [
    "ACTIONS",
    "APPEND",
    "BY_NAME",
    "CLIENT_CONN_ACTIONS",
    "EVENT_ACTIONS",
    "SERVER_CONN_ACTIONS",
    "SESSION_ACTIONS",
    "Action",
    "Fires",
    "describe_args",
    "step_problems",
]
