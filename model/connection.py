"""The connection lifecycle: nothing is handled before READY (docs/protocol.md section 1).

One machine per socket, server side. ``queued`` counts client frames received but not yet
handled: before READY they are the bounded pre-ready buffer (pipelining); in READY they are
handled in arrival order, and only after ``connection_ack`` went out (``ack_sent``), because a
reply to a buffered frame must never overtake the ack. READY is entered by ``auth_ok`` (context
resolved) and the ack is a separate, later transition that is only enabled in READY: the order
"mark READY, then send the ack" is structural, not a convention.
"""

from __future__ import annotations

from pipeproof.model.expr import TRUE, Param, Var
from pipeproof.model.spec import Kind, Machine, Transition, VarDecl
from pipeproof.protocol import AUTH_CLOSES, Close, FastEnum, FrameType, Send
from pipeproof.protocol import CloseReason as CR


class Conn(FastEnum):
    OPEN = "OPEN"
    INITIALISING = "INITIALISING"
    READY = "READY"
    DRAINING = "DRAINING"
    CLOSED = "CLOSED"


queued = Var("queued")
ack_sent = Var("ack_sent")
buffer_max = Param("buffer_max")

O, I, R, D, C = Conn.OPEN, Conn.INITIALISING, Conn.READY, Conn.DRAINING, Conn.CLOSED  # noqa: E741 - short names keep the table readable

NMBR = "no_message_before_ready"
RBA = "ready_before_ack"

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
        "recv_frame", I, I, guard=queued < buffer_max, updates=(("queued", queued + 1),),
        doc="pipelined frame buffered until READY", invariants=(NMBR,),
    ),
    Transition(
        "recv_frame", I, C, guard=queued >= buffer_max, kind=Kind.ERROR,
        emits=Close(CR.PREREADY_BUFFER_FULL),
    ),
    Transition("recv_init", I, C, kind=Kind.ERROR, emits=Close(CR.DUPLICATE_INIT)),
    Transition(
        "auth_reject", I, C, updates=(("queued", 0),), kind=Kind.ERROR, emits=Close.any_of(AUTH_CLOSES, label="the auth code"),
        doc="the token failed verification; buffered frames are discarded unhandled",
    ),
    Transition(
        "limit_reject", I, C, updates=(("queued", 0),), kind=Kind.ERROR, emits=Close(CR.CONNECTION_LIMIT),
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
        "recv_frame", R, R, guard=queued < buffer_max, updates=(("queued", queued + 1),),
        doc="queued behind earlier frames so order is kept",
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
    # Any state can go to CLOSED when the peer goes away.
    Transition("peer_close", O, C, kind=Kind.ERROR, doc="client closed or the network dropped"),
    Transition("peer_close", I, C, updates=(("queued", 0),), kind=Kind.ERROR),
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
    ),
    params={"buffer_max": 2},
    doc="Per-socket lifecycle: OPEN -> INITIALISING -> READY -> DRAINING -> CLOSED.",
    section="1",
)

# States in which a socket holds a slot in its user's context (it counts against the limits).
ATTACHED: frozenset[Conn] = frozenset({R, D})
