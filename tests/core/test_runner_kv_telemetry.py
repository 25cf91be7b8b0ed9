"""Runners' KV ledgers reach every node's replicated state with the periodic telemetry, never as extra events.

A rank-0 runner's KV budget and prefix cache change with every request; the
node learns them from heartbeats (``InfoObserved(runner_kv=...)``) and puts
them only on its periodic telemetry report, so the log grows by no event for
them, at most one update per telemetry interval reaches the state, and a
node that times out takes its ledgers with it.
"""

from __future__ import annotations

from sim.manual import ManualCluster
from skulk.core.ids import NodeId, RunnerId
from skulk.core.inputs import InfoObserved
from skulk.core.instances import KvUse
from skulk.core.messages import LocalEventMessage

KV = KvUse(budget_positions=8447, rows_positions=1510, cache_positions=900, cache_entries=2, bytes_per_position=3072, prefix_hits=3)


def _local_events(c: ManualCluster, origin: str) -> int:
    return sum(1 for m in c.inflight if isinstance(m.message, LocalEventMessage) and m.sender == origin)


def test_kv_ledgers_ride_on_the_periodic_telemetry() -> None:
    c = ManualCluster(2)
    c.boot_all()
    c.settle(until=10.0)
    master = c.node("n1").master_id
    assert master is not None
    reporter = "n2" if master == "n1" else "n1"
    before = _local_events(c, reporter)
    c.submit(reporter, InfoObserved(runner_kv={RunnerId("r-a"): KV}))
    # No event of its own: nothing new leaves the node for it.
    assert _local_events(c, reporter) == before
    assert NodeId(reporter) not in c.node(master).state.node_kv
    # The next periodic report carries it, to every node.
    c.settle(until=c.now + c.node(reporter).config.telemetry_interval_s + 1.0)
    for nid in ("n1", "n2"):
        assert c.node(nid).state.node_kv[NodeId(reporter)] == {RunnerId("r-a"): KV}
    # A runner that is gone is dropped with the next report; an empty map removes the node's entry.
    c.submit(reporter, InfoObserved(runner_kv={}))
    c.settle(until=c.now + c.node(reporter).config.telemetry_interval_s + 1.0)
    assert NodeId(reporter) not in c.node(master).state.node_kv
