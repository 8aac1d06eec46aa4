"""The report renders in headless Chromium: every machine's diagram and the mutant matrix are visible.

Chromium is driven over the DevTools protocol (a plain websocket client), so the test can ask the
page for bounding boxes instead of guessing from pixels; the screenshot goes to tmp, not the repo.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pipeproof.drawing.record import load
from pipeproof.drawing.source import DEFAULT_SOURCE

DIAGRAMS = Path(__file__).resolve().parents[2] / "diagrams"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

CHECK_JS = """
(() => {
  const box = (el) => { if (!el) return null; const r = el.getBoundingClientRect();
    return {w: r.width, h: r.height, natural: el.naturalWidth === undefined ? -1 : el.naturalWidth,
            complete: el.complete === undefined ? true : el.complete}; };
  const machines = {};
  for (const name of NAMES) machines[name] = box(document.getElementById('diagram-' + name));
  const matrix = document.getElementById('mutant-matrix');
  const links = matrix ? [...matrix.querySelectorAll('a')].map(a => a.getAttribute('href')) : [];
  return JSON.stringify({machines, matrix: box(matrix), rows: matrix ? matrix.rows.length : 0, links,
                         closeCodes: box(document.getElementById('close-codes')),
                         messageTypes: box(document.getElementById('message-types'))});
})()
"""


class DevTools:
    def __init__(self, url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(url, max_size=None, open_timeout=10)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == n:
                assert "error" not in msg, msg
                return msg["result"]  # type: ignore[no-any-return]

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1400,4000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_report_shows_every_machine_and_the_mutant_matrix(browser, tmp_path):
    names = [m.name for m in DEFAULT_SOURCE.machines()]
    browser.call("Page.enable")
    browser.call("Page.navigate", url=(DIAGRAMS / "index.html").as_uri())
    deadline = time.monotonic() + 30
    while browser.evaluate("document.readyState === 'complete' && [...document.images].every(i => i.complete)") \
            is not True:
        assert time.monotonic() < deadline, "the report did not finish loading"
        time.sleep(0.1)
    state = json.loads(browser.evaluate(CHECK_JS.replace("NAMES", json.dumps(names))))

    for name in names:
        box = state["machines"][name]
        assert box is not None, f"no diagram for {name}"
        assert box["w"] > 100 and box["h"] > 50, (name, box)
        assert box["natural"] > 0, f"{name}'s SVG did not load"
    assert state["matrix"]["w"] > 0 and state["matrix"]["h"] > 0
    record = load(DIAGRAMS / "verdicts.json")
    assert state["rows"] == 1 + len(record.mutants)
    for link in state["links"]:
        assert (DIAGRAMS / link).is_file(), link
    assert state["closeCodes"]["h"] > 0 and state["messageTypes"]["h"] > 0

    shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    out = tmp_path / "report.png"
    out.write_bytes(base64.b64decode(shot["data"]))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_counterexample_page_shows_its_sequence_diagram(browser):
    record = load(DIAGRAMS / "verdicts.json")
    name = record.mutants[0].name
    browser.call("Page.navigate", url=(DIAGRAMS / "counterexamples" / f"{name}.html").as_uri())
    deadline = time.monotonic() + 30
    js = f"(() => {{ const e = document.getElementById('sequence-{name}'); if (!e) return null; " \
         f"const r = e.getBoundingClientRect(); return [r.width, r.height]; }})()"
    while (box := browser.evaluate(js)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert box[0] > 100 and box[1] > 100
