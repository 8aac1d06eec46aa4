"""Model time on a real server: declared timeouts and the tolerance of the mapping (docs/conformance.md,
"Timing"; PROTOCOL sections 1, 3, 5, 6).

The server under test is run with small, declared settings. The kit never sleeps and hopes: it
waits for an observation up to a deadline computed from the declared value,

    early bound   max(declared - slack, declared / 2)  (an observation before it is "too early")
    late bound    declared x tolerance + slack

and one model ``tick`` of a delivery machine stands for "the declared wait at hand has passed",
exactly as the reference server maps it (pipeproof/core/delivery.py). ``slack`` absorbs scheduling and
loopback latency; ``tolerance`` absorbs a loaded machine (two cores running server and kit).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

EARLY_FRACTION = 0.5
"""No declared duration may be seen to end before this fraction of it (:meth:`Timing.early`)."""


@dataclass(frozen=True)
class Timing:
    """The server's declared settings that the kit's expectations depend on."""

    init_timeout: float = 3.0
    ack_timeout: float = 5.0
    ack_backoff: float = 2.0
    ack_timeout_max: float = 60.0
    ack_jitter: float = 0.1
    max_attempts: int = 5
    resume_window: float = 120.0
    context_ttl: float = 1800.0
    heartbeat_interval: float = 15.0
    preready_buffer_frames: int = 32
    error_budget: int = 10
    max_connections_per_user: int = 8
    run_max_steps: int = 64
    tolerance: float = 2.0
    slack: float = 0.3
    reply_timeout: float = 3.0  # a handled frame's reply, a connection_ack, an HTTP answer

    def ack_wait(self, attempt: int) -> float:
        """The nominal wait for the ack of ``attempt`` (PROTOCOL section 5: backoff, capped)."""
        return min(self.ack_timeout * self.ack_backoff ** max(0, attempt - 1), self.ack_timeout_max)

    def early(self, declared: float) -> float:
        """The earliest a declared duration may be observed to end: ``slack`` before it, but never
        less than half of it, so even a short declared wait (a small ack_timeout) keeps a lower
        bound a server firing it early breaks."""
        return max(declared * EARLY_FRACTION, declared - self.slack)

    def late(self, declared: float) -> float:
        return declared * self.tolerance + self.slack

    def resend_window(self, attempt: int) -> tuple[float, float]:
        """(earliest, latest) seconds after attempt ``attempt`` was seen that the next one may be seen."""
        base = self.ack_wait(attempt)
        return self.early(base), self.late(base * (1.0 + self.ack_jitter))

    def delivery_horizon(self) -> float:
        """Latest wall-clock time from append to a terminal state (section 5's bounded liveness)."""
        waits = sum(self.ack_wait(a) * (1.0 + self.ack_jitter) for a in range(1, self.max_attempts + 1))
        return self.late(waits + self.resume_window)

    def server_env(self) -> dict[str, str]:
        """The PIPEPROOF_* variables that declare these settings to the reference server."""
        out = {}
        for f in fields(self):
            if f.name in ("tolerance", "slack", "reply_timeout"):
                continue
            out[f"PIPEPROOF_{f.name.upper()}"] = str(getattr(self, f.name))
        return out

    def with_(self, **changes: Any) -> Timing:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in changes.items() if v is not None})
        return Timing(**values)


SMALL = Timing(
    init_timeout=0.6,
    ack_timeout=0.25,
    ack_backoff=1.0,
    ack_timeout_max=0.25,
    ack_jitter=0.0,
    max_attempts=3,
    resume_window=0.6,
    context_ttl=3.0,  # above heartbeat_interval: an attached context is kept alive on each heartbeat
    heartbeat_interval=2.0,
    preready_buffer_frames=4,
    error_budget=3,
    max_connections_per_user=4,
    run_max_steps=16,
)
"""The profile ``pipeproof conform --serve`` starts the reference server with."""

FAST = SMALL.with_(init_timeout=0.3, ack_timeout=0.1, ack_timeout_max=0.1, resume_window=0.3, slack=0.2,
                   context_ttl=600.0)
"""A faster profile for the seeded-defect tests (many short runs); too tight for a loaded machine.
Contexts do not expire under it (the expiry probe, which waits context_ttl, is off)."""

__all__ = ["FAST", "SMALL", "Timing"]
