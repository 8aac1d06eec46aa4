"""conformance/placement.py: where a cluster target's sockets and HTTP requests go: the same seed
gives the same placement, a user's sockets go round the nodes, a resume avoids the node of the
user's last dropped socket, and one node is the single-server case (docs/conformance.md,
"Several nodes")."""

from __future__ import annotations

import pytest

from pipeproof.conformance.kit import KitResult
from pipeproof.conformance.placement import Placement
from pipeproof.conformance.report import text_summary


def script(p: Placement) -> list[int]:
    """A fixed sequence of placement calls (three users, anonymous sockets, HTTP, a drop and a resume)."""
    out = []
    for k in range(12):
        out.append(p.socket(f"u{k % 3}"))
        out.append(p.socket(None))
        out.append(p.http())
    p.dropped("u1", out[-3])
    out.append(p.socket("u1", resume=True))
    return out


def test_the_same_seed_places_the_same_calls_on_the_same_nodes() -> None:
    assert script(Placement(3, seed=7)) == script(Placement(3, seed=7))
    # Other seeds move some of them (the offsets are drawn from the seed).
    assert len({tuple(script(Placement(3, seed=s))) for s in range(8)}) > 1


def test_placement_follows_the_order_of_users_not_their_names() -> None:
    # Hypothesis replays a trace with fresh user names: the placement must not change with them.
    a, b = Placement(2, seed=1), Placement(2, seed=1)
    assert [a.socket(n) for n in ("x", "y", "x", "y")] == [b.socket(n) for n in ("p", "q", "p", "q")]


def test_a_users_sockets_go_round_the_nodes() -> None:
    p = Placement(3, seed=0)
    nodes = [p.socket("alice") for _ in range(6)]
    assert sorted(nodes) == [0, 0, 1, 1, 2, 2]
    assert nodes[:3] == nodes[3:]
    assert sorted(p.http() for _ in range(3)) == [0, 1, 2]


@pytest.mark.parametrize("seed", range(6))
def test_a_resume_never_lands_on_the_node_of_the_dropped_socket(seed: int) -> None:
    p = Placement(2, seed=seed)
    for _ in range(5):
        node = p.socket("alice")
        p.dropped("alice", node)
        again = p.socket("alice", resume=True)
        assert again != node
        assert p.last_dropped("alice") == node


def test_one_node_takes_everything_and_the_report_reads_as_before() -> None:
    p = Placement(1, seed=5)
    p.dropped("alice", 0)
    assert {p.socket("alice"), p.socket(None), p.socket("alice", resume=True), p.http()} == {0}
    with pytest.raises(ValueError):
        Placement(0)
    single = KitResult(examples=1, nodes=("ws://a",), sessions=[3], http_requests=[2])
    assert "sessions per node" not in text_summary(single, "ws://a")
    two = KitResult(examples=1, nodes=("ws://a", "ws://b"), seed=4, sessions=[3, 5], http_requests=[2, 1],
                    resumes_after_drop=2, resumes_moved=2)
    text = text_summary(two, "ws://a ws://b")
    assert "sessions per node (seed 4):" in text
    assert "node 1 ws://a: 3 sessions, 2 HTTP requests" in text
    assert "node 2 ws://b: 5 sessions, 1 HTTP requests" in text
    assert "resumes after a drop: 2, on another node: 2" in text
