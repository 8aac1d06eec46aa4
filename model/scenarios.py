"""The finite instances the default check explores (docs/model.md, "bounds").

One big product of every dimension explodes (two users are independent, so their states
multiply), so the default run checks several small composed instances, each exhaustively, each
chosen for the interleavings it must contain. Every instance runs every invariant. Larger bounds
are one flag away (``pipeproof check --users 2 --sessions 2 ...``) and are measured in
bench/explore.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeproof.model.system import Bounds


@dataclass(frozen=True)
class Scenario:
    name: str
    bounds: Bounds
    covers: str


DEFAULT_SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "readiness",
        Bounds(users=1, sessions_per_user=1, events_per_user=2, max_attempts=2, buffer_max=1,
               ack_timeout=1, resume_window=1),
        "one socket, timed: pipelined frames before READY, buffer overflow, duplicate init, auth reject, "
        "init/heartbeat timeouts, drain; a run's events retried, acked late, escalated, within the horizon",
    ),
    Scenario(
        "races",
        Bounds(users=1, sessions_per_user=2, events_per_user=2, max_attempts=2, ack_timeout=0, resume_window=0,
               frames=False, drain=False, max_connections_per_user=1),
        "two sockets of one user, untimed: racing inits and get-or-create, the per-user limit, "
        "a socket dropped mid-delivery, an ack after a retry, resume on the other socket, context expiry",
    ),
    Scenario(
        "isolation",
        Bounds(users=2, sessions_per_user=1, events_per_user=2, max_attempts=2, ack_timeout=0, resume_window=0,
               frames=False, drain=False, runs=1, max_connections_per_user=1, max_connections_per_account=1),
        "two users, untimed: one user's stream is never read or acked by the other's socket; "
        "the per-account limit",
    ),
    Scenario(
        "runs",
        Bounds(users=1, sessions_per_user=1, events_per_user=4, max_steps=1, max_attempts=1, ack_timeout=0,
               resume_window=0, frames=False, drain=False),
        "one run with room for four events: a tool call (tool_executing, tool_completed) or thinking between "
        "start and the terminal, cancel before and after start, a crash; one attempt per event so the "
        "run's orderings, not retries, fill the space",
    ),
    Scenario(
        "nodes",
        Bounds(users=1, sessions_per_user=2, events_per_user=2, max_attempts=1, ack_timeout=1, resume_window=0,
               frames=False, drain=False, max_connections_per_user=2, max_connections_per_account=1, nodes=2),
        "two server nodes sharing one store, one session of the user on each, timed: the run's node owns "
        "delivery and a session on the other node is written by its relay (read within the poll bound); "
        "either node crashes mid-delivery or mid-run and the survivor adopts the context and the run; "
        "the account limit counted in the store across nodes",
    ),
)
