"""What the kit runs against and what it reports (docs/conformance.md, "Running the kit" and
"Several nodes")."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Violation
from .properties import PROPERTIES
from .timing import Timing
from .wire import Tokens, urls


@dataclass
class Target:
    """The server under test and what it declared. ``url`` is a node; ``cluster`` holds the
    other nodes of the same cluster, if any (the kit spreads its client actions over all of them,
    placed by ``seed``: :mod:`.placement`)."""

    url: str
    tokens: Tokens
    timing: Timing
    tolerate_overload: bool = False
    runs: bool = True  # the server implements sections 4-5 (runs and delivery)
    disabled_user: str | None = None  # a user the server refuses with user_disabled
    cluster: tuple[str, ...] = ()
    seed: int = 0

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node's URL, ``url`` first (the order of the command line)."""
        return (self.url, *self.cluster)

    @property
    def ws_url(self) -> str:
        return urls(self.url)[0]

    @property
    def http_url(self) -> str:
        return urls(self.url)[1]

    @property
    def ws_urls(self) -> tuple[str, ...]:
        return tuple(urls(u)[0] for u in self.nodes)

    @property
    def http_urls(self) -> tuple[str, ...]:
        return tuple(urls(u)[1] for u in self.nodes)


@dataclass
class KitResult:
    examples: int = 0
    actions: int = 0
    seconds: float = 0.0
    checks: dict[str, int] = field(default_factory=dict)
    violation: Violation | None = None
    ttl_probes: int = 0
    nodes: tuple[str, ...] = ()  # the target's node URLs, in order
    seed: int = 0
    sessions: list[int] = field(default_factory=list)  # WebSockets opened on each node
    http_requests: list[int] = field(default_factory=list)  # HTTP requests sent to each node
    resumes_after_drop: int = 0  # resumes of a user that had dropped a socket
    resumes_moved: int = 0  # ... placed on another node than that socket's
    random_seed: int | None = None  # a random search's seed (None: derandomized): replays it exactly

    @property
    def ok(self) -> bool:
        return self.violation is None


def summary(result: KitResult) -> list[tuple[str, str, int]]:
    """(property, "pass" | "FAIL" | "not exercised", checks) per property."""
    rows = []
    for name in PROPERTIES:
        n = result.checks.get(name, 0)
        if result.violation is not None and result.violation.prop == name:
            rows.append((name, "FAIL", n))
        else:
            rows.append((name, "pass" if n else "not exercised", n))
    return rows


__all__ = ["KitResult", "Target", "summary"]
