"""Efficiency invariants (chaos.efficiency, issue 17 item 5): storms and silent slowness fail a run.

Each test plants the slowness in the running core (``monkeypatch``) and runs
one cheap seed: the matching invariant must name it. A healthy seed passes
all of them and reports its figures.
"""

from __future__ import annotations

import pytest

from chaos import exitcodes
from chaos.efficiency import EfficiencyBounds
from chaos.harness import run_scenario
from skulk.core import replica as replica_module
from skulk.core.output import Output


def test_a_healthy_run_passes_and_reports_its_figures() -> None:
    r = run_scenario("heterogeneous_cluster", 1, quiet=True)
    assert r.ok, r.message
    for key in ("peak_control_msgs_per_node_s", "quiet_nacks", "events_timed", "messages_disturbed"):
        assert key in r.checks
    assert r.checks["events_timed"] > 0


def test_a_follower_that_drops_the_event_it_waits_for_is_slow_e3(monkeypatch: pytest.MonkeyPatch) -> None:
    original = replica_module.Replica.on_global_event

    def drop_in_order(self, now, sender, msg):  # type: ignore[no-untyped-def]
        if self.session is not None and msg.session == self.session and msg.indexed.index == self.next_index:
            return Output()  # the issue's `<=` for `<`: converges only through NACKs
        return original(self, now, sender, msg)

    monkeypatch.setattr(replica_module.Replica, "on_global_event", drop_in_order)
    r = run_scenario("heterogeneous_cluster", 1, quiet=True)
    assert (r.status, r.exit_code, r.caught_by) == ("liveness", exitcodes.LIVENESS, "efficiency E3"), r.message
    assert "was not applied" in r.message


def test_a_nack_storm_is_too_many_nacks_e2(monkeypatch: pytest.MonkeyPatch) -> None:
    original = replica_module.Replica.on_global_event

    def nack_everything(self, now, sender, msg):  # type: ignore[no-untyped-def]
        out = original(self, now, sender, msg)
        if self.session is not None and self.next_index > 1:
            out.effects += self._request(now, self.next_index - 1, None)  # ask again for what it has
        return out

    monkeypatch.setattr(replica_module.Replica, "on_global_event", nack_everything)
    clean = {"loss_probability": "0", "duplicate_probability": "0", "reorder_probability": "0",
             "latency_tail_probability": "0"}
    r = run_scenario("heterogeneous_cluster", 1, quiet=True, overrides=clean,
                     efficiency=EfficiencyBounds(apply_bound_s=1e9))
    assert r.caught_by == "efficiency E2", r.message
    assert "0 lost or late messages" in r.message


def test_the_bounds_can_be_turned_off_for_a_measurement() -> None:
    r = run_scenario("heterogeneous_cluster", 1, quiet=True, efficiency=None)
    assert r.ok and "events_timed" not in r.checks
