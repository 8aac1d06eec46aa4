"""Which node of a cluster each socket and each HTTP request of an example goes to
(docs/conformance.md, "Several nodes").

``pipeproof conform URL1 URL2 ...`` tests several nodes of one cluster as one server: the oracle is
the same, only the place of each client action changes. A user's sockets go round-robin over the
nodes from an offset drawn from the seed and the user's place in the example (the first user seen,
the second, ...), so the same client actions land on the same nodes every run with the same
``--seed``, also when Hypothesis replays a trace to shrink it (user names change between runs; their
order does not). A resume (``connection_init`` with ``resume``) never lands on the node of the
user's last dropped socket when there is another: moving a user between nodes mid-stream is what a
cluster has to get right. Sockets without a user (bad tokens, no init) and HTTP requests have
round-robin turns of their own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def _offset(seed: int, key: str, nodes: int) -> int:
    # random.Random seeded with a str is deterministic across processes (unlike hash()).
    return random.Random(f"pipeproof-placement/{seed}/{key}").randrange(nodes)


@dataclass
class Placement:
    """The placement of one example's client actions over ``nodes`` nodes."""

    nodes: int
    seed: int = 0
    salt: int = 0  # drawn per example by the kit (with the seed: the same draws, the same places)
    _turn: dict[str, int] = field(default_factory=dict)  # user -> sockets placed so far
    _offsets: dict[str, int] = field(default_factory=dict)
    _dropped: dict[str, int] = field(default_factory=dict)  # user -> node of its last dropped socket
    _anonymous: int = 0
    _http: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"a cluster has at least one node, got {self.nodes}")

    def socket(self, user: str | None, *, resume: bool = False) -> int:
        """The node for the next socket of ``user`` (None: a socket that never authenticates)."""
        if user is None:
            node = (_offset(self.seed, f"{self.salt}/anonymous", self.nodes) + self._anonymous) % self.nodes
            self._anonymous += 1
            return node
        if user not in self._offsets:
            self._offsets[user] = _offset(self.seed, f"{self.salt}/user-{len(self._offsets)}", self.nodes)
            self._turn[user] = 0
        node = (self._offsets[user] + self._turn[user]) % self.nodes
        self._turn[user] += 1
        if resume and node == self._dropped.get(user) and self.nodes > 1:
            node = (node + 1) % self.nodes  # its next turn: another node than the dropped socket's
            self._turn[user] += 1
        return node

    def last_dropped(self, user: str) -> int | None:
        """The node of the last socket of ``user`` the client dropped, if any."""
        return self._dropped.get(user)

    def dropped(self, user: str, node: int) -> None:
        """The client dropped a socket of ``user`` on ``node``: a later resume goes elsewhere."""
        self._dropped[user] = node

    def http(self) -> int:
        """The node for the next HTTP request (any node answers for the whole cluster)."""
        node = (_offset(self.seed, f"{self.salt}/http", self.nodes) + self._http) % self.nodes
        self._http += 1
        return node


__all__ = ["Placement"]
