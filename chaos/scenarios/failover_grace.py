"""failover_grace: a new master waits for slow nodes to re-report before it prunes their placements.

After a failover the new master's state carries the instances over, but it
knows a node only once that node re-reports (DESIGN.md: liveness-based
pruning is suppressed for a topology-settle grace window, ``prune_grace_s``,
60 s). A node that is slow to re-report (frozen by swap, a long GC pause)
must not lose its placement meanwhile:

1. A model is placed on one follower F only; clients stream.
2. F freezes, and while it is frozen the master crashes: the others elect
   a new master, which carries F's instance over without having heard F.
3. F thaws well within the grace window and re-reports.
4. F's instance was never deleted, its runner never restarted, and the
   cluster serves it again.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from chaos.scenarios import Stage, scenario
from chaos.scenarios._support import Ledger, expect, master_state, place_on, served_after
from chaos.stage import ScenarioStuck
from sim.options import SimOptions

MODEL = "sim/qwen-1.5b"


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    n = rng.choice((3, 4, 5))
    return opts.with_(
        node_count=n,
        ram_total_gib=tuple(opts.ram_total_gib[i % len(opts.ram_total_gib)] for i in range(n)),
        model_id=MODEL,
        fault_kinds=(),
        client_count=max(2, min(opts.client_count, 4)),
    )


@scenario(
    "failover_grace",
    "a node frozen through a failover keeps its placement: the new master waits out the settle grace before pruning",
    adjust=_adjust,
)
def failover_grace(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    rng = stage.rng
    ledger = Ledger(stage)
    master = stage.master_host()
    if master is None:
        raise ScenarioStuck("no single master after boot")
    follower = world.hosts[rng.choice([h for h in world.host_ids if h != master.id])]
    others = tuple(h for h in world.host_ids if h != follower.id)
    iid = yield from place_on(stage, MODEL, excluded=others)
    ok = yield from stage.wait_until(lambda: stage.instance_serving(iid), timeout_s=opts.ready_deadline_s)
    expect(ok, f"{iid} serving on {follower.id}")
    until = world.env.now + 10_000.0
    stage.start_clients(until)
    yield stage.sleep(rng.uniform(2.0, 5.0))

    # 2. F freezes; the master crashes while F is frozen.
    frozen = world.faults.pause(follower)
    yield stage.sleep(rng.uniform(0.0, 1.0))
    master = stage.master_host()
    expect(master is not None and master.id != follower.id, "a master other than the frozen node")
    assert master is not None
    world.faults.heal_after(world.faults.crash_restart(master), rng.uniform(30.0, 50.0))
    lost_at = world.env.now
    ok = yield from stage.wait_until(
        lambda: (m := stage.master_host()) is not None and m.id != master.id, timeout_s=opts.settle_deadline_s)
    expect(ok, f"a new master after {master.id} crashed")

    # 3. F thaws within the grace window (60 s after the new session began, by default).
    grace = opts.core.prune_grace_s
    yield stage.sleep(rng.uniform(0.3, 0.6) * grace - (world.env.now - lost_at))
    frozen.heal()
    since = world.env.now
    ok = yield from stage.wait_until(
        lambda: served_after([r for r in world.clients.requests.values() if r.kind == "SubmitTask"], since) > 0,
        timeout_s=60.0)
    expect(ok, f"{MODEL} served again after {follower.id} thawed")

    # 4. Nothing was pruned, nothing restarted.
    expect(iid not in ledger.deleted, f"{iid} on the frozen {follower.id} never deleted, got {ledger.deleted.get(iid)}")
    expect(len(ledger.starts_of(iid)) == 1, f"{iid}'s runner started once, got {len(ledger.starts_of(iid))}")
    state = master_state(stage)
    expect(state is not None and iid in state.instances, f"{iid} still placed")
    stage.metrics["frozen_s"] = round(since - lost_at, 3)
