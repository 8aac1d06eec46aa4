"""The OpenAPI document describes the running server (impl/openapi.py): schemathesis generates
requests from it, valid and invalid, with a real bearer token, and checks every response against
it (status codes, content types, bodies) and for server errors."""


from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import ServerPool, ServerThread

from pipeproof.impl.auth import mint_token


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    pool = ServerPool(tmp_path_factory.mktemp("openapi"), "sqlite", "pp_api")
    yield pool.start()
    pool.close()


@pytest.mark.slow
def test_schemathesis_finds_no_issue_with_auth(api_server: ServerThread) -> None:
    # The CLI, not the pytest plugin: the plugin does not run on this pytest. Every phase runs:
    # coverage, fuzzing, and stateful, which follows the pages' links (context_id, next_after).
    token = mint_token(api_server.settings, "alice")
    cli = Path(sys.executable).parent / "schemathesis"
    command = [str(cli), "run", f"{api_server.http_url}/openapi.json", "-H", f"Authorization: Bearer {token}",
               "--max-examples", "30", "--seed", "1"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "No issues found" in proc.stdout
    assert "✅ Stateful" in proc.stdout, proc.stdout[-2000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert generated is not None and int(generated.group(1)) > 50, proc.stdout[-2000:]
    out = Path(".artifacts")
    out.mkdir(exist_ok=True)
    summary = proc.stdout[proc.stdout.find("Test Phases:"):].strip() if "Test Phases:" in proc.stdout else proc.stdout
    (out / "schemathesis-summary.txt").write_text(summary[-3000:])


def test_the_document_declares_parameters_security_errors_and_text_metrics(api_server: ServerThread) -> None:
    doc = api_server.get("/openapi.json").json()
    events = doc["paths"]["/v1/events"]["get"]
    assert {p["name"] for p in events["parameters"]} >= {"after", "limit", "context_id"}
    assert {"200", "400", "401", "403", "503"} <= set(events["responses"])
    assert events["security"] and "HTTPBearer" in doc["components"]["securitySchemes"]
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
