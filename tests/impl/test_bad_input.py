"""Every byte a client can send gets a documented answer (docs/protocol.md, "Bad input"), over real
sockets and HTTP: nothing crashes the handler, nothing closes outside the close-code table."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pg import BACKENDS
from server_harness import (
    Factory,
    RawClient,
    ServerPool,
    ServerThread,
    expect_close,
    init_frame,
    open_sockets,
    open_ws,
    recv_json,
)

from pipeproof.impl.auth import mint_token
from pipeproof.protocol.names import ID_MAX, SEQ_MAX

LONG_INT = '{"type":"ack","seq":1' + "0" * 5000 + "}"
DEEP = "[" * 10_000 + "]" * 10_000


@pytest.fixture
def start_server(tmp_path: Path, backend: str) -> Iterator[Factory]:
    pool = ServerPool(tmp_path, backend, "pp_bad")
    yield pool.start
    pool.close()


async def ready(server: ServerThread, user: str = "alice") -> Any:
    ws = await open_ws(server)
    await ws.send(init_frame(mint_token(server.settings, user)))
    ack = await recv_json(ws)
    assert ack["type"] == "connection_ack", ack
    return ws


async def no_open_sockets(server: ServerThread, timeout: float = 5.0) -> None:
    """Every socket's gauge is back to zero (each session records its close a moment after the client sees it)."""
    import asyncio

    async with asyncio.timeout(timeout):
        while open_sockets(server) > 0:
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("frame", [LONG_INT, DEEP], ids=["5000-digit int", "10000 nested brackets"])
async def test_a_pathological_first_frame_closes_init_required(start_server: Factory, frame: str) -> None:
    server = start_server()
    for _ in range(5):
        ws = await open_ws(server)
        await ws.send(frame)
        code, reason, _ = await expect_close(ws, timeout=3.0)
        assert (code, reason) == (4401, "init_required")
    await no_open_sockets(server)


@pytest.mark.parametrize("frame", [LONG_INT, DEEP], ids=["5000-digit int", "10000 nested brackets"])
async def test_a_pathological_frame_on_a_ready_socket_is_answered_and_the_socket_lives(
        start_server: Factory, frame: str) -> None:
    server = start_server()
    ws = await ready(server)
    await ws.send(frame)
    reply = await recv_json(ws)
    assert (reply["type"], reply["code"]) == ("error", "invalid_message")
    await ws.send(json.dumps({"type": "run.start", "request_id": "r1", "input": "hi"}))
    assert (await recv_json(ws))["type"] in ("run.accepted", "error")
    await ws.close()


async def test_invalid_utf8_is_a_malformed_frame_within_the_error_budget(start_server: Factory) -> None:
    server = start_server(error_budget=1)
    raw = RawClient(server.ws_url)
    await raw.connect()
    raw.send_text(init_frame(mint_token(server.settings, "alice")))
    assert (await raw.next_text(3.0))["type"] == "connection_ack"
    raw.send_text_bytes(b'{"type":"ack","seq":\xff}')
    reply = await raw.next_text(3.0)
    assert (reply["type"], reply["code"]) == ("error", "invalid_message")
    raw.send_text_bytes(b"\xc3\x28")
    code, reason, _ = await raw.wait_close(3.0)
    assert (code, reason) == (4400, "invalid_message")
    raw.close()


async def test_invalid_utf8_before_auth_closes_init_required(start_server: Factory) -> None:
    server = start_server()
    raw = RawClient(server.ws_url)
    await raw.connect()
    raw.send_text_bytes(b"\xff\xfe")
    code, reason, _ = await raw.wait_close(3.0)
    assert (code, reason) == (4401, "init_required")
    raw.close()


async def test_a_frame_over_max_frame_bytes_closes_1009_message_too_big(start_server: Factory) -> None:
    server = start_server(max_frame_bytes=4096)
    ws = await ready(server)
    await ws.send(json.dumps({"type": "run.start", "request_id": "r", "input": "x" * 5000}))
    code, reason, _ = await expect_close(ws)
    assert (code, reason) == (1009, "message_too_big")
    # The client sees the WebSocket layer's close at once; the session records it a moment later.
    import asyncio

    async with asyncio.timeout(5):
        while not [ln for ln in server.audit_lines() if ln["machine"] == "connection" and ln["to"] == "CLOSED"]:
            await asyncio.sleep(0.05)
        while open_sockets(server) > 0:
            await asyncio.sleep(0.05)
    closes = [ln for ln in server.audit_lines() if ln["machine"] == "connection" and ln["to"] == "CLOSED"]
    assert closes[-1]["event"] == "recv_oversized"


@pytest.mark.parametrize("request_id", ["r" * (ID_MAX + 1), "a\x00b", ""], ids=["too long", "NUL", "empty"])
async def test_request_ids_are_capped_and_nul_free(start_server: Factory, request_id: str) -> None:
    server = start_server()
    ws = await ready(server)
    await ws.send(json.dumps({"type": "run.start", "request_id": request_id, "input": "hi"}))
    reply = await recv_json(ws)
    assert (reply["type"], reply["code"]) == ("error", "invalid_message")
    assert request_id not in (reply.get("detail") or "") or request_id == ""
    await ws.close()


@pytest.mark.parametrize("seq", ["true", "3.0", str(2**63), str(SEQ_MAX + 1), "-1", '"5"'])
async def test_ack_seq_is_a_plain_integer_in_range(start_server: Factory, seq: str) -> None:
    server = start_server()
    ws = await ready(server)
    await ws.send('{"type":"ack","seq":' + seq + "}")
    reply = await recv_json(ws)
    assert (reply["type"], reply["code"]) == ("error", "invalid_message"), seq
    await ws.close()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_after_beyond_the_seq_range_is_a_400_on_every_store(start_server: Factory) -> None:
    server = start_server()
    headers = {"Authorization": f"Bearer {mint_token(server.settings, 'alice')}"}
    import httpx

    for after, status in ((str(SEQ_MAX), 200), (str(SEQ_MAX + 1), 400), ("9" * 5000, 400)):
        answer = httpx.get(f"{server.http_url}/v1/events", params={"after": after}, headers=headers)
        assert answer.status_code == status, (after, answer.text)
        if status == 400:
            assert answer.json()["error"]["code"] == "invalid_query"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_a_sub_with_nul_is_user_unknown_not_a_store_error(start_server: Factory) -> None:
    server = start_server()
    bad = mint_token(server.settings, "ali\x00ce")
    import httpx

    answer = httpx.get(f"{server.http_url}/v1/events", headers={"Authorization": f"Bearer {bad}"})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "user_unknown"
    ws = await open_ws(server)
    await ws.send(init_frame(bad))
    code, reason, _ = await expect_close(ws)
    assert (code, reason) == (4401, "user_unknown")


async def test_a_bare_token_or_another_scheme_is_token_malformed(start_server: Factory) -> None:
    server = start_server()
    import httpx

    good = mint_token(server.settings, "alice")
    for header in (good, f"Basic {good}", f"Token {good}"):
        answer = httpx.get(f"{server.http_url}/v1/events", headers={"Authorization": header})
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "token_malformed", header
    ok = httpx.get(f"{server.http_url}/v1/events", headers={"Authorization": f"Bearer {good}"})
    assert ok.status_code == 200


async def test_prod_serves_no_interactive_docs_or_openapi(start_server: Factory) -> None:
    import secrets

    server = start_server(env="prod", jwt_secret=secrets.token_urlsafe(40))
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert server.get(path).status_code == 404, path
    assert server.get("/healthz").status_code == 200


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_a_run_input_with_nul_fits_every_store(start_server: Factory) -> None:
    from pipeproof.impl.runs import AgentRuntime

    server = start_server({"handler": AgentRuntime()})
    ws = await ready(server)
    await ws.send(json.dumps({"type": "run.start", "request_id": "r-nul", "input": "a\x00b"}))
    frames = []
    import asyncio

    async with asyncio.timeout(10):
        while not any(f.get("event") in ("agent_completed", "agent_failed") for f in frames):
            frame = await recv_json(ws)
            frames.append(frame)
            if frame["type"] == "event":
                await ws.send(json.dumps({"type": "ack", "seq": frame["seq"]}))
            assert frame["type"] != "error" or frame["code"] == "invalid_input", frame
    await ws.close()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("context_id", ["\x00", "x" * 5000, "../../etc"])
async def test_a_strange_context_id_is_not_found_on_every_store(start_server: Factory, context_id: str) -> None:
    import httpx

    server = start_server()
    headers = {"Authorization": f"Bearer {mint_token(server.settings, 'alice')}"}
    for path in ("/v1/events", "/v1/escalations"):
        answer = httpx.get(f"{server.http_url}{path}", params={"context_id": context_id}, headers=headers)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "context_not_found", answer.text


async def test_broken_websocket_framing_closes_1002_protocol_error(start_server: Factory) -> None:
    server = start_server()
    raw = RawClient(server.ws_url)
    await raw.connect()
    raw.send_text(init_frame(mint_token(server.settings, "alice")))
    assert (await raw.next_text(3.0))["type"] == "connection_ack"
    raw.writer.write(b"\x81\x05hello")  # a client frame without a mask (RFC 6455 5.1: must be masked)
    await raw.writer.drain()
    code, reason, _ = await raw.wait_close(3.0)
    assert (code, reason) == (1002, "protocol_error")
    raw.close()
    import asyncio

    async with asyncio.timeout(5):
        while not [ln for ln in server.audit_lines() if ln.get("event") == "recv_bad_framing"]:
            await asyncio.sleep(0.05)
    await no_open_sockets(server)
