"""Each seeded defect is caught by the live kit and by trace-check of its own audit log
(docs/conformance.md, "Seeded defects"). A kit that catches none is broken."""

from __future__ import annotations

from pathlib import Path

import pytest
from broken import DEFECTS, start_server
from server_harness import SECRET

from pipeproof.conformance.kit import Target, run_kit
from pipeproof.conformance.serve import DISABLED_USER
from pipeproof.conformance.timing import FAST
from pipeproof.conformance.tracecheck import ModelParams, check_file
from pipeproof.conformance.wire import Tokens

# The property each defect must be caught by, live and in the trace. Live, a defect may show first
# through another rule it breaks (model_transition: an observation no machine allows), so the live
# set can hold more than one; the trace check names the mutant's own property.
EXPECTED: dict[str, tuple[set[str], set[str]]] = {
    "handle_before_ready": ({"no_message_before_ready", "model_transition"}, {"no_message_before_ready"}),
    "ack_before_ready": ({"auth_errors_specific", "connection_limits_respected", "ready_before_ack",
                          "one_context_per_user"},
                         {"ready_before_ack"}),
    # Marking a failed send done also leaves the in-memory and stored states apart, so the same
    # server may first show an acked event written again.
    "swallow_send_failure": ({"every_event_acked_or_escalated", "acked_never_resent", "model_transition"},
                             {"every_event_acked_or_escalated"}),
    "no_escalation": ({"every_event_acked_or_escalated", "timeouts_honoured"}, {"every_event_acked_or_escalated"}),
    "resend_acked": ({"acked_never_resent"}, {"acked_never_resent"}),
    "unlocked_context_create": ({"one_context_per_user"}, {"one_context_per_user"}),
    "cross_user_route": ({"no_cross_user_read", "model_transition"}, {"no_cross_user_read"}),
    "event_after_terminal": ({"run_events_well_ordered"}, {"run_events_well_ordered"}),
    "race_1011": ({"no_1011"}, {"no_1011"}),
}
PARAMS = ModelParams(FAST.preready_buffer_frames, FAST.max_attempts, FAST.max_connections_per_user,
                     FAST.run_max_steps, FAST.error_budget)


@pytest.mark.slow
@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_seeded_defect_is_caught_live_and_from_its_trace(defect: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    live_props, trace_props = EXPECTED[defect]
    # Bounded by examples (derandomized first: the same client actions every run); the budget is a
    # safety net, and shrinking gets 3 s from the first failure. What the server does between the
    # client's actions depends on its timing, so on a loaded machine (CI runs this next to other
    # servers) a search can end before the defect shows: then up to two more searches, drawn at
    # random, on a fresh server each. A kit that never finds the defect still fails.
    for attempt in range(3):
        (tmp_path / str(attempt)).mkdir()
        server = start_server(tmp_path / str(attempt), DEFECTS[defect](monkeypatch), FAST)
        try:
            target = Target(f"ws://127.0.0.1:{server.port}", Tokens(SECRET), FAST, disabled_user=DISABLED_USER)
            result = run_kit(target, examples=40, steps=6, budget=40.0, shrink_budget=3.0, randomize=attempt > 0)
        finally:
            server.stop()
        if result.violation is not None and result.violation.prop in live_props:
            break
    v = result.violation
    assert v is not None, f"the kit missed {defect} ({result.examples} examples, {result.actions} actions)"
    assert v.prop in live_props, v.render()
    # Short: at most the initial connect, `steps` rules and the final read-back.
    assert 1 <= len(v.trace) <= 8, v.render()
    report = check_file(Path(str(server.settings.audit_log)), PARAMS, urgency=0.5)
    assert report.violation is not None, f"trace-check missed {defect}"
    assert report.violation.prop in trace_props, report.violation.render()
    print(f"\n{defect}: live {v.prop} in {len(v.trace)} actions; trace line {report.line_no}: {report.violation.prop}")
