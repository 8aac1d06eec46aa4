"""``pipeproof conform``: the reference server in another process passes, JUnit XML is written,
the server's own audit log passes trace-check, and a bad invocation exits 2 (docs/conformance.md).
With several URLs (the nodes of one cluster) the sessions are spread over them by seed and the
report says how many went where; a real two-node cluster is tested as one server."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from broken import start_server
from process_harness import Cluster
from server_harness import SECRET, ServerThread

from pipeproof.cli import main
from pipeproof.conformance.kit import Target, machine_for, run_kit
from pipeproof.conformance.properties import PROPERTIES
from pipeproof.conformance.serve import DISABLED_USER, ServedServer
from pipeproof.conformance.timing import SMALL
from pipeproof.conformance.wire import Tokens


@pytest.mark.slow
def test_conform_serve_passes_against_the_reference_in_another_process(tmp_path: Path) -> None:
    junit, audit = tmp_path / "conform.xml", tmp_path / "audit.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeproof.cli", "conform", "--serve", "--examples", "6", "--steps", "6",
         "--junit", str(junit), "--keep-audit", str(audit)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok: every observation was a behaviour the model allows" in proc.stdout
    assert "trace-check" in proc.stdout and ": ok (" in proc.stdout
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0"
    assert {c.get("name") for c in suite.iter("testcase")} == set(PROPERTIES)
    assert audit.stat().st_size > 0


def test_tokens_given_on_the_command_line_drive_the_connection_rules() -> None:
    with ServedServer(SMALL) as server:
        tokens = Tokens(None, given={f"u{k}": Tokens(server.secret).good(f"u{k}") for k in range(3)})
        result = run_kit(Target(server.url, tokens, SMALL, runs=False), examples=4, steps=4)
    assert result.ok, result.violation and result.violation.render()
    assert result.checks.get("auth_errors_specific", 0) > 0


def test_bad_invocations_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conform"]) == 2
    assert main(["conform", "http://example.invalid", "--secret", "x"]) == 2
    assert "not a WebSocket URL" in capsys.readouterr().err
    assert main(["conform", "ws://127.0.0.1:9", "--secret", "x", "--examples", "1"]) == 2
    assert "cannot open a WebSocket" in capsys.readouterr().err


@pytest.mark.slow
def test_cancel_expiry_and_monotonic_state_are_exercised_and_pass() -> None:
    """The default run exercises cancel-before-start (a run queued behind a long one), context expiry
    (a fresh user idle past context_ttl gets a new context and epoch) and monotonic event state."""
    with ServedServer(SMALL) as server:
        result = run_kit(Target(server.url, Tokens(server.secret), SMALL), examples=20, steps=8)
    assert result.ok, result.violation and result.violation.render()
    for prop in ("cancel_before_start_wins", "expired_context_never_reused", "monotonic_event_state"):
        assert result.checks.get(prop, 0) > 0, (prop, result.checks)


# -- several URLs: the nodes of one cluster (docs/conformance.md, "Several nodes") --------------------


def connection_ids(server: ServerThread) -> set[str]:
    """The sockets the server's own audit log saw: one connection machine instance each."""
    return {str(line["id"]) for line in server.audit_lines() if line["machine"] == "connection"}


def test_two_urls_of_one_server_spread_the_sessions_and_the_counts_add_up(tmp_path: Path) -> None:
    # The same in-process server twice: it passes today, and every socket the kit opened, on
    # either "node", is in that server's audit log.
    timing = SMALL.with_(context_ttl=600.0)  # what broken.settings_for runs the server with
    server = start_server(tmp_path, {}, timing)
    try:
        url = f"ws://127.0.0.1:{server.port}"
        target = Target(url, Tokens(SECRET), timing, disabled_user=DISABLED_USER, cluster=(url,), seed=3)
        result = run_kit(target, examples=8, steps=6)
    finally:
        server.stop()
    assert result.ok, result.violation and result.violation.render()
    assert result.nodes == (url, url) and len(result.sessions) == 2
    assert sum(result.sessions) == len(connection_ids(server)) > 0
    assert min(result.sessions) > 0 and min(result.http_requests) > 0, (result.sessions, result.http_requests)
    assert result.resumes_moved == result.resumes_after_drop  # each one on the other node


def test_a_cut_socket_of_a_cluster_is_resumed_on_another_node(tmp_path: Path) -> None:
    # The kit's rules driven by hand (no search), on two "nodes" of one in-process server: a
    # socket in the middle of a run is cut, its user comes back with resume on the other node,
    # and everything observed is still what the model allows.
    timing = SMALL.with_(context_ttl=600.0)
    server = start_server(tmp_path, {}, timing)
    try:
        url = f"ws://127.0.0.1:{server.port}"
        machine = machine_for(Target(url, Tokens(SECRET), timing, cluster=(url,), seed=5))
        kit = machine()
        kit._first_socket(True)  # s0 with a run (0.6 s of sleep)
        kit.observations_allowed()
        (s0,) = kit.socks
        kit.drop(0, False)  # cut TCP: then the resume
        kit.observations_allowed()
        kit.let_time_pass()
        kit.observations_allowed()
        kit.teardown()
    finally:
        server.stop()
    s1 = kit.socks[1]
    assert s0.sock.dropped and s1.user is s0.user and s1.acked is not None
    assert kit.node_of[s1.label] != kit.node_of[s0.label]
    assert (machine.result.resumes_after_drop, machine.result.resumes_moved) == (1, 1)
    assert machine.result.sessions == [1, 1]
    assert any("resume last_seq=" in a and f"(node {kit.node_of[s1.label] + 1})" in a for a in kit.oracle.actions)


def test_the_cli_reports_sessions_per_node_and_the_same_seed_places_them_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(tmp_path, {}, SMALL.with_(context_ttl=600.0))
    declared = [f"--{flag}={getattr(SMALL, flag.replace('-', '_'))}" for flag in (
        "init-timeout", "heartbeat-interval", "preready-buffer-frames", "error-budget", "max-connections-per-user")]
    try:
        url = f"ws://127.0.0.1:{server.port}"
        placed: list[dict[str, str]] = []
        for run in range(2):
            junit = tmp_path / f"conform-{run}.xml"
            # Sections 1-3 only: what the kit does then depends on its draws alone, not on how fast
            # runs go, so both runs take the same client actions.
            assert main(["conform", url, url, "--secret", SECRET, "--no-runs", "--examples", "4", "--steps", "4",
                         "--seed", "11", "--junit", str(junit), *declared]) == 0
            out = capsys.readouterr().out
            assert f"pipeproof conform {url} {url}:" in out and "sessions per node (seed 11):" in out
            props = {p.get("name", ""): p.get("value", "") for p in ET.parse(junit).getroot().iter("property")}
            assert props["seed"] == "11" and props["node.1.url"] == props["node.2.url"] == url
            sessions = [int(props[f"node.{n}.sessions"]) for n in (1, 2)]
            assert f"node 1 {url}: {sessions[0]} sessions" in out and f"node 2 {url}: {sessions[1]} sessions" in out
            assert min(sessions) > 0
            placed.append({k: v for k, v in props.items() if k.startswith("node.")})
    finally:
        server.stop()
    assert placed[0] == placed[1]


@pytest.mark.postgres
def test_conform_two_node_cluster(tmp_path: Path) -> None:
    """The kit across a real two-node cluster (two ``pipeproof serve`` processes on one fresh
    PostgreSQL database): the cluster must look like one server."""
    # The poll below SMALL's ack wait (0.25 s), as startup requires on PostgreSQL.
    env = {**SMALL.server_env(), "PIPEPROOF_CLUSTER_POLL_INTERVAL": "0.1",
           "PIPEPROOF_MAX_CONNECTIONS_PER_ACCOUNT": "512", "PIPEPROOF_DISABLED_USERS": DISABLED_USER,
           "PIPEPROOF_SHUTDOWN_GRACE": "1"}
    with Cluster(tmp_path, 2, env=env) as cluster:
        a, b = cluster.urls
        target = Target(a, Tokens(SECRET), SMALL, disabled_user=DISABLED_USER, cluster=(b,), seed=0)
        result = run_kit(target, examples=8, steps=6, budget=40.0)
    assert min(result.sessions) > 0, result.sessions
    assert result.ok, result.violation and result.violation.render()


def test_a_random_search_prints_its_seed_and_the_seed_replays_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(tmp_path, {}, SMALL.with_(context_ttl=600.0))
    declared = [f"--{flag}={getattr(SMALL, flag.replace('-', '_'))}" for flag in (
        "init-timeout", "heartbeat-interval", "preready-buffer-frames", "error-budget", "max-connections-per-user")]
    try:
        url = f"ws://127.0.0.1:{server.port}"
        target = Target(url, Tokens(SECRET), SMALL.with_(context_ttl=600.0), runs=False)
        fresh = run_kit(target, examples=3, steps=4, randomize=True)
        assert fresh.random_seed is not None
        # Sections 1-3 only: the actions depend on the draws alone, so a replay takes the same ones.
        again = run_kit(target, examples=3, steps=4, random_seed=fresh.random_seed)
        assert (again.random_seed, again.examples, again.actions, again.checks) == (
            fresh.random_seed, fresh.examples, fresh.actions, fresh.checks)
        assert main(["conform", url, "--secret", SECRET, "--no-runs", "--examples", "2", "--steps", "3",
                     "--random-seed", "77", *declared]) == 0
        out = capsys.readouterr().out
        assert "random search, seed 77 (replay it: --random-seed 77)" in out
        assert main(["conform", url, "--secret", SECRET, "--no-runs", "--examples", "2", "--steps", "3",
                     *declared]) == 0
        assert "random search" not in capsys.readouterr().out  # derandomized by default
    finally:
        server.stop()
