"""Event storm on real processes (smoke): abandoned requests against a loading model.

Three real nodes on loopback whose runners stay loading for a while
(``SKULK_TEST_LOAD_DELAY_SECONDS``). Locust's abandoning clients send 100
streamed chats through all three nodes and walk away from each. Targets
(issue 8): at most 3 indexed events per abandoned request, no election, no
placement lost, the master's event rate back to idle within seconds; then
the model loads and serves. The run is recorded, and the chaos checkers,
unchanged, judge the trace; the simulated ``event_storm`` is run beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests.cluster import loopback_cluster
from loadtests.parity import parity_rows, real_verdict, sim_summary
from loadtests.recorder import TraceRecorder
from loadtests.storm import LOAD_DELAY_ENV, StormConfig, run_storm

pytestmark = [pytest.mark.cluster, pytest.mark.reliability]

CFG = StormConfig(requests=100, users=10, abandon_after_s=0.5, baseline_s=3.0, settle_s=5.0, load_delay_s=30.0)


def test_abandoned_requests_against_a_loading_model(models: Path, tmp_path: Path, artifacts: Path) -> None:
    with loopback_cluster(tmp_path, 3, models=models, env={LOAD_DELAY_ENV: str(CFG.load_delay_s)}) as cluster:
        recorder = TraceRecorder(cluster, interval_s=0.25).start()
        try:
            figures = run_storm(cluster, artifacts, CFG, recorder=recorder)
        finally:
            recorder.stop()
        trace = artifacts / "storm-trace.jsonl"
        recorder.write(trace)
    (artifacts / "storm-figures.json").write_text(json.dumps(figures, indent=1))
    print(f"\n[storm] {figures['requests_abandoned']} abandoned in {figures['storm_s']} s "
          f"({figures['abandon_rate_per_s']}/s); task events per request: max {figures['task_events_per_abandoned_max']}, "
          f"mean {figures['task_events_per_abandoned_mean']} ({figures['task_events_histogram']}); all events per request "
          f"{figures['events_per_abandoned_all']}; elections {figures['elections_during_storm']}; events/s idle "
          f"{figures['baseline_events_per_s']} -> storm {figures['storm_events_per_s']} -> after "
          f"{figures['post_storm_events_per_s']} (task events stopped {figures['task_events_stop_after_s']} s after the clients)")
    # The storm really was a storm of abandoned requests against a loading model.
    assert figures["requests_abandoned"] == CFG.requests and figures["requests_failed"] == 0, figures["failed_by_error"]
    # (A client that walked away before the answer started has no command id to attribute events to.)
    assert figures["abandoned_with_command_id"] >= 0.9 * CFG.requests
    assert figures["model_loading_through_storm"], "the model finished loading before the storm ended"
    assert figures["api_abandoned_total"] >= CFG.requests
    # Targets.
    assert figures["task_events_per_abandoned_max"] <= 3, figures["task_events_histogram"]
    assert figures["events_per_abandoned_all"] <= 3
    assert figures["elections_during_storm"] == 0 and figures["same_session"]
    assert figures["placements_lost"] == 0, figures["nodes_missing_instance"]
    assert figures["idle_again"] and figures["task_events_stop_after_s"] <= 3.0
    # Nothing left behind, and the placement works once loaded.
    assert figures["tasks_left_in_state"] == 0 and figures["open_streams_after"] == 0
    assert figures["served_after_storm"]
    # Sim-to-real parity: the chaos checkers judge the real trace; the simulated storm runs beside it.
    verdict = real_verdict(trace)
    assert verdict["ok"], verdict["line"]
    assert verdict["checks"]["abandoned_requests"] == figures["abandoned_with_command_id"]
    assert verdict["checks"]["max_events_per_abandoned_request"] == figures["task_events_per_abandoned_max"]
    sim = sim_summary("event_storm", range(1, 2))
    real = {**figures, "verdict_ok": verdict["ok"], "verdict_line": verdict["line"]}
    for row in parity_rows(None, real, None, sim):
        print(f"[storm parity] {row['figure']}: real {row['real']} | sim {row['sim']}")
    assert sim["available"], sim
