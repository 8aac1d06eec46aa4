"""Delivery and run metrics on the app's own registry (Transport: ``GET /metrics``; PROTOCOL
sections 4 and 5: every escalation is counted, by reason)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from pipeproof.protocol import EscalationReason

from .metrics import Metrics


class DeliveryMetrics:
    """Delivery and run counters on the app's own registry (``GET /metrics``)."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.appended = Counter("pipeproof_events_appended", "Events appended, by kind", ["kind"], registry=r)
        self.sends = Counter(
            "pipeproof_event_sends", "Delivery attempts (first sends and resends)", ["first"], registry=r
        )
        self.send_failures = Counter(
            "pipeproof_event_send_failures", "Sends no READY session could take", registry=r
        )
        self.acked = Counter("pipeproof_events_acked", "Events acked by a client", registry=r)
        self.escalations = Counter(
            "pipeproof_escalations", "Events escalated (section 5), by reason", ["reason"], registry=r
        )
        self.live = Gauge("pipeproof_events_live", "Events in PENDING or SENT on this node", registry=r)
        self.append_failures = Counter(
            "pipeproof_event_append_failures",
            "Events a failed append dropped before they were stored (their runs end with agent_failed)",
            registry=r,
        )
        self.ack_latency = Histogram(
            "pipeproof_ack_latency_seconds",
            "Event appended to acked",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        # outcome: completed, failed, or lease_lost (stopped here: another node took it over).
        self.runs = Counter("pipeproof_runs", "Finished runs, by outcome", ["outcome"], registry=r)
        self.run_rejections = Counter(
            "pipeproof_run_rejections", "run.start refused, by code", ["code"], registry=r
        )
        self.runs_active = Gauge("pipeproof_runs_active", "Runs accepted and not finished", registry=r)
        self.runs_taken_over = Counter(
            "pipeproof_runs_taken_over",
            "Runs this node ended for a dead node, or for its own previous process, by agent_failed code (section 6)",
            ["code"],
            registry=r,
        )
        # Several nodes (section 6): attempts this node wrote for another node's decision, and the
        # store reads a notice or poll asked for that failed (the next poll reads again).
        self.relayed = Counter(
            "pipeproof_events_relayed", "Event frames written here for a context another node owns", registry=r
        )
        self.store_failures = Counter(
            "pipeproof_cluster_store_failures",
            "Store reads or writes of the cluster's fan-out that failed and are retried by the next poll",
            registry=r,
        )
        for reason in EscalationReason:
            self.escalations.labels(reason=reason)
        # Labelled children resolved once: ``labels()`` costs a lock and a dict walk per call,
        # and these are counted once per event.
        self.first_sends = self.sends.labels(first="true")
        self.resends = self.sends.labels(first="false")
        self._appended_by_kind: dict[str, Any] = {}

    def appended_kind(self, kind: str) -> Any:
        """The ``appended`` counter of ``kind``."""
        child = self._appended_by_kind.get(kind)
        if child is None:
            child = self._appended_by_kind[kind] = self.appended.labels(kind=kind)
        return child


__all__ = ["DeliveryMetrics"]
