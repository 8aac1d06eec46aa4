"""The protocol's vocabularies against docs/protocol.md (pipeproof/protocol/names.py): the table of
``agent_failed`` codes lists exactly the codes the server sends (section 4), and every error
frame code is documented."""

from __future__ import annotations

import re
from pathlib import Path

from pipeproof.errors import LeaseLost, StoreError
from pipeproof.protocol import ErrorCode, FailureCode

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def _subclasses(cls: type[StoreError]) -> set[type[StoreError]]:
    out = {cls}
    for sub in cls.__subclasses__():
        out |= _subclasses(sub)
    return out


def failure_table_codes() -> set[str]:
    start = DOC.index("**`agent_failed` codes.**")
    table = DOC[start:].split("\n\n")[1]  # the paragraph after the heading's
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return {code for row in rows for code in re.findall(r"`([a-z_]+)`", row.split("|")[1])}


def test_the_agent_failed_table_lists_every_code_the_server_sends() -> None:
    # The server's own codes, and the store's (a run whose events the store refuses ends with the
    # refusal's code). A lost lease is no code of an event: the run stops without one there.
    store_codes = {cls.code for cls in _subclasses(StoreError)} - {LeaseLost.code}
    assert failure_table_codes() == {str(code) for code in FailureCode} | store_codes


def test_every_error_frame_code_is_documented() -> None:
    for code in ErrorCode:
        assert f"`{code}`" in DOC or f'"code":"{code}"' in DOC, code
