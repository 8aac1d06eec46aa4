"""The connection lifecycle: nothing is handled before READY (docs/protocol.md sections 1, 2, 3, 6).

Rules:
- one machine per socket, server side; every way a socket ends is an edge into CLOSED declared
  here, with the close it sends (``emits=Close(...)``): the peer's own close is ``peer_close``,
  a failed write is ``send_error``; everything else is the server's decision and names its reason;
- the I/O shell (impl/session.py, via pipeproof/core/session.py) fires the event an input stands
  for and passes facts as inputs (``over_bytes``: this frame would take the pre-READY buffer past
  its byte budget); it never tests a state to decide what a frame means;
- ``queued`` counts client frames received but not yet handled: before READY they are the bounded
  pre-ready buffer (pipelining); in READY they are handled in arrival order, and only after
  ``connection_ack`` went out (``ack_sent``), because a reply to a buffered frame must never
  overtake the ack. READY is entered by ``auth_ok`` (context resolved) and the ack is a separate,
  later transition that is only enabled in READY: "mark READY, then send the ack" is structural;
- ``errors`` counts malformed frames answered with an error frame; the one past ``error_budget``
  closes ``invalid_message`` (section 1, "Close codes");
- ``internal_error`` is the server's own bug (an illegal transition, a crashed task), never an
  expected condition; ``unavailable`` is the server refusing or ending a socket because a
  dependency is down or it is over its limits (store, audit log, memory guard): ``try_again_later``.
"""

from __future__ import annotations

from pipeproof.model.expr import TRUE, Input, Param, Var
from pipeproof.model.spec import Kind, Machine, Transition, VarDecl
from pipeproof.protocol import AUTH_CLOSES, Close, FastEnum, FrameType, Property, Send
from pipeproof.protocol import CloseReason as CR


class Conn(FastEnum):
    OPEN = "OPEN"
    INITIALISING = "INITIALISING"
    READY = "READY"
    DRAINING = "DRAINING"
    CLOSED = "CLOSED"


queued = Var("queued")
ack_sent = Var("ack_sent")
errors = Var("errors")
buffer_max = Param("buffer_max")
error_budget = Param("error_budget")
over_bytes = Input("over_bytes")

O, I, R, D, C = Conn.OPEN, Conn.INITIALISING, Conn.READY, Conn.DRAINING, Conn.CLOSED  # noqa: E741 - short names keep the table readable

NMBR = Property.NO_MESSAGE_BEFORE_READY
RBA = Property.READY_BEFORE_ACK

_DROP = (("queued", 0),)  # a socket that closes before READY discards its buffer unhandled
_LIVE = (O, I, R, D)

TRANSITIONS: tuple[Transition, ...] = (
    # OPEN: the first frame must be connection_init (section 1).
    Transition("recv_init", O, I, doc="connection_init received; auth and context resolution start"),
    Transition(
        "recv_frame", O, C, kind=Kind.ERROR, emits=Close(CR.INIT_REQUIRED),
        doc="a first frame that is not connection_init",
    ),
    Transition("init_timeout", O, C, kind=Kind.TIMEOUT, emits=Close(CR.INIT_TIMEOUT)),
    # INITIALISING: pipelined frames go to the bounded buffer; nothing is handled.
    Transition(
        "recv_frame", I, I, guard=(queued < buffer_max) & ~over_bytes, updates=(("queued", queued + 1),),
        doc="pipelined frame buffered until READY", invariants=(NMBR,),
    ),
    Transition(
        "recv_frame", I, C, guard=(queued >= buffer_max) | over_bytes, updates=_DROP, kind=Kind.ERROR,
        emits=Close(CR.PREREADY_BUFFER_FULL), doc="past the pre-READY budget of frames or bytes",
    ),
    Transition("recv_init", I, C, updates=_DROP, kind=Kind.ERROR, emits=Close(CR.DUPLICATE_INIT)),
    Transition(
        "auth_reject", I, C, updates=_DROP, kind=Kind.ERROR,
        emits=Close.any_of(AUTH_CLOSES, label="the auth code"),
        doc="the token failed verification; buffered frames are discarded unhandled",
    ),
    Transition(
        "limit_reject", I, C, updates=_DROP, kind=Kind.ERROR, emits=Close(CR.CONNECTION_LIMIT),
        doc="over max_connections_per_user or per_account; buffered frames discarded",
    ),
    Transition(
        "auth_ok", I, R, doc="token valid and context resolved: the socket is READY (before any ack)",
        invariants=(RBA,),
    ),
    # READY: ack first, then frames in arrival order.
    Transition(
        "send_ack", R, R, guard=~ack_sent, updates=(("ack_sent", TRUE),), emits=Send(FrameType.CONNECTION_ACK),
        doc="sent only once READY is set", invariants=(RBA,),
    ),
    Transition(
        "handle_frame", R, R, guard=ack_sent & (queued > 0), updates=(("queued", queued - 1),),
        doc="the oldest queued frame is handled", invariants=(NMBR,),
    ),
    Transition(
        "handle_invalid", R, R, guard=ack_sent & (queued > 0) & (errors < error_budget),
        updates=(("queued", queued - 1), ("errors", errors + 1)), kind=Kind.ERROR, emits=Send(FrameType.ERROR),
        doc="the oldest queued frame is malformed: answered with error invalid_message", invariants=(NMBR,),
    ),
    Transition(
        "handle_invalid", R, C, guard=ack_sent & (queued > 0) & (errors >= error_budget),
        updates=(("queued", 0),), kind=Kind.ERROR, emits=Close(CR.INVALID_MESSAGE),
        doc="a malformed frame past error_budget", invariants=(NMBR,),
    ),
    Transition(
        "recv_frame", R, R, guard=queued < buffer_max, updates=(("queued", queued + 1),),
        doc="queued behind earlier frames so order is kept (the shell stops reading when full)",
    ),
    Transition("deliver", R, R, guard=ack_sent, emits=Send(FrameType.EVENT), doc="an agent event frame is written"),
    Transition("recv_init", R, C, kind=Kind.ERROR, emits=Close(CR.DUPLICATE_INIT)),
    Transition(
        "heartbeat_timeout", R, C, kind=Kind.TIMEOUT, emits=Close(CR.HEARTBEAT_TIMEOUT),
        doc="peer silent for two heartbeat intervals; its unacked events stay pending",
    ),
    Transition("send_error", R, C, kind=Kind.ERROR, doc="a write to the socket failed: the peer is gone"),
    Transition("drain", R, D, kind=Kind.HOUSEKEEPING, doc="server shutting down: stop accepting work"),
    # DRAINING: flush, then close with 1001.
    Transition("drain_close", D, C, kind=Kind.HOUSEKEEPING, emits=Close(CR.GOING_AWAY)),
    # Server shutdown before READY: nothing to flush (section 6).
    Transition("shutdown", O, C, kind=Kind.HOUSEKEEPING, emits=Close(CR.GOING_AWAY)),
    Transition("shutdown", I, C, updates=_DROP, kind=Kind.HOUSEKEEPING, emits=Close(CR.GOING_AWAY)),
    # A reader too slow for its bounded send queue: its events stay in the store for resume.
    Transition("slow_consumer", R, C, kind=Kind.ERROR, emits=Close(CR.TRY_AGAIN_LATER),
               doc="the socket's send queue stayed full: its events stay pending for resume"),
    Transition("slow_consumer", D, C, kind=Kind.ERROR, emits=Close(CR.TRY_AGAIN_LATER)),
    # Every state but CLOSED: the server cannot serve this socket now, or it hit its own bug.
    *(Transition("unavailable", st, C, updates=_DROP if st is I else (), kind=Kind.ERROR,
                 emits=Close(CR.TRY_AGAIN_LATER),
                 doc="not ready, over the memory limit, or the store or audit log failing (section 6)"
                 if st is O else "")
      for st in _LIVE),
    *(Transition("internal_error", st, C, updates=_DROP if st is I else (), kind=Kind.ERROR,
                 emits=Close(CR.INTERNAL_ERROR),
                 doc="a server bug (an illegal transition, a crashed task): counted and logged" if st is O else "")
      for st in _LIVE),
    # A frame over max_frame_bytes: the WebSocket layer refuses to read it (Transport).
    *(Transition("recv_oversized", st, C, updates=_DROP if st is I else (), kind=Kind.ERROR,
                 emits=Close(CR.MESSAGE_TOO_BIG),
                 doc="a frame larger than max_frame_bytes: closed before it is read" if st is O else "")
      for st in _LIVE),
    # A frame that breaks RFC 6455's framing: the WebSocket layer fails the connection (Transport).
    *(Transition("recv_bad_framing", st, C, updates=_DROP if st is I else (), kind=Kind.ERROR,
                 emits=Close(CR.PROTOCOL_ERROR),
                 doc="a WebSocket framing error: closed before any frame is read" if st is O else "")
      for st in _LIVE),
    # Any state can go to CLOSED when the peer goes away.
    Transition("peer_close", O, C, kind=Kind.ERROR, doc="client closed or the network dropped"),
    Transition("peer_close", I, C, updates=_DROP, kind=Kind.ERROR),
    Transition("peer_close", R, C, kind=Kind.ERROR),
    Transition("peer_close", D, C, kind=Kind.ERROR),
)

CONNECTION = Machine(
    name="connection",
    states=Conn,
    initial=O,
    terminal=frozenset({C}),
    transitions=TRANSITIONS,
    variables=(
        VarDecl("queued", int, 0, doc="client frames received and not yet handled"),
        VarDecl("ack_sent", bool, False, doc="connection_ack has been written"),
        VarDecl("errors", int, 0, doc="malformed frames answered so far (error budget)"),
    ),
    params={"buffer_max": 2, "error_budget": 1},
    inputs={"over_bytes": bool},
    input_defaults={"over_bytes": False},
    doc="Per-socket lifecycle: OPEN -> INITIALISING -> READY -> DRAINING -> CLOSED.",
    section="1",
)

# Positions of the variables in a configuration, derived from the declaration (hot-path readers
# index with these instead of numbers).
QUEUED, ACK_SENT, ERRORS = (CONNECTION.slot(n) for n in ("queued", "ack_sent", "errors"))

HANDLE_EVENTS: frozenset[str] = frozenset({"handle_frame", "handle_invalid"})
TIMEOUT_EVENTS: frozenset[str] = frozenset(t.event for t in TRANSITIONS if t.kind is Kind.TIMEOUT)
"""The connection's own timeouts (init, heartbeat): timeouts_close_the_socket constrains every one."""
"""Events that handle a client frame: no_message_before_ready constrains every one of them."""

SERVER_CLOSE_EVENTS: tuple[str, ...] = tuple(dict.fromkeys(
    t.event for t in TRANSITIONS if t.close is not None and not t.event.startswith("recv_")
))
"""Closes the server decides on its own (not a reaction to a received frame), in declaration order."""

# States in which a socket holds a slot in its user's context (it counts against the limits).
ATTACHED: frozenset[Conn] = frozenset({R, D})
