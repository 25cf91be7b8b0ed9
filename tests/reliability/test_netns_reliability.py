"""Failover under load across three network namespaces (root only; skipped cleanly otherwise).

The same run as ``test_failover_load`` on "machines" with their own
addresses (one pair also joined over a VPN-range address): Locust loads the
survivors from the root namespace, the master is killed, and the recorded
trace goes through the chaos checkers. (That rings avoid the VPN link is
tests/runtime/test_netns.py's subject; here the link only has to be seen.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests.failover import FailoverConfig, run_failover
from loadtests.parity import real_verdict
from loadtests.recorder import TraceRecorder
from loadtests.netns import VPN_PREFIX, netns_available, netns_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.netns, pytest.mark.reliability, pytest.mark.slow]

_ok, _why = netns_available()
if not _ok:
    pytest.skip(f"network namespaces unavailable: {_why}", allow_module_level=True)

CFG = FailoverConfig(users=4, pre_s=6.0, post_s=12.0)


def test_master_kill_under_load_across_namespaces(models: Path, tmp_path: Path, artifacts: Path) -> None:
    with netns_cluster(tmp_path, models) as cluster:
        master = cluster.wait_master(timeout_s=60)
        recorder = TraceRecorder(cluster, interval_s=0.25).start()
        try:
            figures = run_failover(cluster, artifacts, CFG, recorder=recorder)
        finally:
            recorder.stop()
        trace = artifacts / "netns-failover-trace.jsonl"
        recorder.write(trace)
        survivor = next(n for n in cluster.alive())
        state = cluster.state(survivor)
    (artifacts / "netns-failover-figures.json").write_text(json.dumps(figures, indent=1))
    print(f"\n[netns failover] killed {figures['killed']} (master {master}); failed {figures['failed']} "
          f"{figures['failed_by_error']}, hung {figures['hung']}; new master {figures['new_master']} agreed after "
          f"{figures['kill_to_agreed_master_s']} s; first request served again {figures['resume_s']} s after the kill")
    assert figures["hung"] == 0 and figures["failed"] == figures["failed_clear"]
    assert figures["resume_s"] is not None and figures["resume_s"] < 20
    assert figures["placements_lost"] == 0 and figures["runners_restarted"] == 0 and figures["instance_ready_after"]
    # The machines really are apart: the VPN-range link was probed and labelled by its address.
    vpn = [c for c in state["topology"]["connections"] if c["address"].startswith(VPN_PREFIX)]
    assert vpn and {c["kind"] for c in vpn} == {"vpn"}, state["topology"]["connections"]
    verdict = real_verdict(trace)
    assert verdict["ok"], verdict["line"]
