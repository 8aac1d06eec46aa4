"""Prometheus metrics of one app instance (Transport section: ``GET /metrics``; section 6).

Every app gets its own :class:`~prometheus_client.CollectorRegistry` so two servers in one process
(the tests, the conformance kit) never share counters, and nothing lands in the global registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipeproof.model.connection import Conn
from pipeproof.model.spec import Transition

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The server's metrics; names are part of the operator contract (docs)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "pipeproof_connections", "Sockets by connection-machine state (section 1)", ["state"], registry=r
        )
        self.handshake_seconds = Histogram(
            "pipeproof_handshake_duration_seconds",
            "connection_init received to connection_ack queued (section 1)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.closes = Counter(
            "pipeproof_closes",
            "Sockets closed by the server, by close code and reason",
            ["code", "reason"],
            registry=r,
        )
        self.store_errors = Counter(
            "pipeproof_store_errors", "Store failures by StoreError type", ["type"], registry=r
        )
        self.heartbeat_failures = Counter(
            "pipeproof_heartbeat_failures", "Heartbeat failures by kind (section 6)", ["kind"], registry=r
        )
        self.illegal_transitions = Counter(
            "pipeproof_illegal_transitions",
            "Events the model refused that the server fired anyway: each one is a server bug",
            ["machine", "event"],
            registry=r,
        )
        self.invalid_messages = Counter(
            "pipeproof_invalid_messages", "Malformed client frames (section 1)", registry=r
        )
        for state in Conn:
            if state is not Conn.CLOSED:
                self.connections.labels(state=state.name).set(0)

    def on_connection_transition(self, transition: Transition) -> None:
        """Keep the by-state gauge in step with the connection machine (CLOSED is not a gauge)."""
        if transition.source is transition.target:
            return
        if transition.source is not Conn.CLOSED:
            self.connections.labels(state=transition.source.name).dec()
        if transition.target is not Conn.CLOSED:
            self.connections.labels(state=transition.target.name).inc()

    def socket_opened(self) -> None:
        self.connections.labels(state=Conn.OPEN.name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "Metrics"]
