"""event_storm: many clients submit and walk away while the model is still loading.

The model loads slowly; a crowd of clients submits chat requests and abandons
each within a couple of seconds. Each abandoned request may cost at most
``abandoned_events_max`` indexed events (invariant 6, target 3: created,
cancelled, and at most one status), and the storm must not disturb the
election: no node's session or election clock may change during it. After
the storm the model finishes loading and ordinary clients are served.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from chaos.stage import ScenarioStuck
from chaos.scenarios import Stage, scenario
from sim.options import SimOptions


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    return opts.with_(
        model_id="sim/qwen-7b",
        # 4.3 GB at 40-100 MB/s: about 40-110 s of loading, so the storm hits a loading model.
        runner_load_gbps=rng.uniform(0.04, 0.1),
        storm_clients=rng.randint(40, 160),
        storm_duration_s=rng.uniform(10.0, 30.0),
        chaos_s=rng.uniform(20.0, 40.0),
        fault_kinds=(),
        abandoned_events_max=3,
    )


@scenario("event_storm", "clients abandon requests en masse against a loading model: bounded events, no election churn", adjust=_adjust)
def event_storm(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    iid = yield from stage.place()
    loading = yield from stage.wait_until(lambda: _any_loading(stage, iid), timeout_s=opts.ready_deadline_s)
    if not loading:
        raise ScenarioStuck(f"no runner of {iid} started loading")
    sessions = {h.id: h.node.session for h in world.running_hosts()}  # type: ignore[union-attr]
    clocks = {h.id: h.node.election.clock for h in world.running_hosts()}  # type: ignore[union-attr]
    changes_before = len(world.session_log)
    start = world.env.now
    until = start + opts.storm_duration_s
    stage.start_clients(
        until,
        count=opts.storm_clients,
        prefix="storm",
        abandon_probability=1.0,
        abandon_after_s_max=2.0,
        think_s_mean=0.5,
    )
    yield stage.sleep(opts.storm_duration_s + 3.0)
    if stage.instance_serving(iid):
        stage.metrics["note"] = "the model finished loading during the storm"
    churn = world.session_log[changes_before:]
    now_sessions = {h.id: h.node.session for h in world.running_hosts()}  # type: ignore[union-attr]
    now_clocks = {h.id: h.node.election.clock for h in world.running_hosts()}  # type: ignore[union-attr]
    if churn or now_sessions != sessions or now_clocks != clocks:
        raise ScenarioStuck(
            f"election churn during the storm: {len(churn)} session change(s); clocks {clocks} -> {now_clocks}"
        )
    storm = [r for r in world.clients.requests.values() if r.cid.startswith("storm-")]
    stage.metrics["storm_requests"] = len(storm)
    stage.metrics["storm_abandoned"] = sum(1 for r in storm if r.abandoned)
    stage.metrics["max_events_per_abandoned_request"] = stage.checker.max_abandoned_events
    ok = yield from stage.wait_until(lambda: stage.instance_serving(iid), timeout_s=opts.ready_deadline_s)
    if not ok:
        raise ScenarioStuck(f"instance {iid} never became ready after the storm")
    stage.start_clients(world.env.now + opts.chaos_s)
    yield stage.sleep(opts.chaos_s)


def _any_loading(stage: Stage, iid: Any) -> bool:
    master = stage.master_host()
    if master is None or master.node is None or master.node.replica.current is None:
        return False
    state = master.node.replica.current
    inst = state.instances.get(iid)
    if inst is None:
        return False
    return any(state.runners.get(r) is not None for r in inst.shard_assignments.runner_to_shard)
