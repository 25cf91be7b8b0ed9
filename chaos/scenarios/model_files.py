"""Model files under faults (issue 14): copies, downloads, the store node, a full disk.

Three scenarios, each checked after every step by invariants 9 (a runner never
loads an unverified file) and 10 (no instance's files are evicted while it is
placed) besides the others:

- ``store_crash_mid_copy``: only the store node holds the model; it is placed
  on the other nodes, which copy their shards from the store; the store
  crashes in the middle (for good, or until it restarts). The copying nodes
  notice the stall and fetch elsewhere: a peer that already has the files,
  the hub, or the store again once it is back (resuming the partial bytes).
- ``partition_during_download``: nobody holds the model (only the hub); it is
  placed, and while files move the cluster is partitioned (in two, or one
  downloading node cut off), then healed. Downloads and copies that lost their
  source re-source; the model serves after the heal.
- ``disk_full_mid_download``: a node serves one model while it downloads
  another; its disk fills in the middle of the download. The transfer ends
  with a clear ``disk_full`` failure on the copy and on the runner (which never
  starts on the half-written files), the first model keeps serving on that
  node, and once the disk has room again the download is retried and the
  second model serves too.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import msgspec

from chaos.scenarios import Stage, scenario
from chaos.stage import ScenarioStuck
from sim.options import SimOptions
from skulk.core.files import ModelCopy
from skulk.core.ids import InstanceId, ModelId, NodeId
from skulk.core.instances import RunnerFailed
from skulk.core.state import State


def _state(stage: Stage) -> State | None:
    master = stage.master_host()
    if master is None or master.node is None:
        return None
    return master.node.replica.current


def _copy(stage: Stage, node: NodeId, model: str) -> ModelCopy | None:
    state = _state(stage)
    return None if state is None else state.model_copies.get(node, {}).get(ModelId(model))


def _hosts_of(stage: Stage, iid: InstanceId) -> list[NodeId]:
    state = _state(stage)
    if state is None or iid not in state.instances:
        return []
    return sorted(state.instances[iid].shard_assignments.node_to_runner)


def _moving(stage: Stage, nodes: list[NodeId], model: str, source: str | None = None) -> bool:
    """Some node in ``nodes`` has bytes of ``model`` in flight (from ``source``, if given)."""
    for node in nodes:
        c = _copy(stage, node, model)
        if c is not None and c.status == "downloading" and c.done_bytes > 0 and (source is None or c.source == source):
            return True
    return False


def _slow_links(opts: SimOptions, rng: Any) -> dict[str, Any]:
    """Link and hub rates that make a multi-GB copy take tens of seconds (so faults land mid-copy)."""
    return {
        "link_rate_mbps_thunderbolt": rng.uniform(200.0, 800.0),
        "link_rate_mbps_ethernet": rng.uniform(60.0, 300.0),
        "link_rate_mbps_wifi": rng.uniform(15.0, 60.0),
        "link_rate_mbps_vpn": rng.uniform(5.0, 30.0),
        "hub_rate_mbps": rng.uniform(40.0, 200.0),
    }


# --- store_crash_mid_copy ----------------------------------------------------------------------


def _adjust_store_crash(opts: SimOptions, rng: Any) -> SimOptions:
    core = msgspec.structs.replace(opts.core, store_node="n1", transfer_stall_s=rng.choice((10.0, 20.0, 30.0)),
                                   transfer_retry_s=rng.choice((2.0, 5.0, 10.0)))
    return opts.with_(
        model_id="sim/qwen-7b",
        node_count=max(3, opts.node_count),
        ram_total_gib=tuple((opts.ram_total_gib * 2)[: max(3, opts.node_count)]),
        models_on_disk="store",
        hub_available=rng.random() < 0.6,
        fault_kinds=(),
        client_count=0,
        ready_deadline_s=900.0,
        core=core,
        **_slow_links(opts, rng),
    )


@scenario("store_crash_mid_copy", "the store node crashes while others copy from it: they re-source from a peer or the "
          "hub, or resume from the store when it returns; no runner starts on unverified files", adjust=_adjust_store_crash)
def store_crash_mid_copy(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    store = world.hosts[NodeId("n1")]
    model = stage.opts.model_id
    k = min(3, len(world.host_ids) - 1)
    others = [h for h in world.host_ids if h != store.id]
    iid = yield from stage.place(min_nodes=k, excluded=(store.id,))
    hosts = _hosts_of(stage, iid) or others
    ok = yield from stage.wait_until(lambda: _moving(stage, hosts, model, "peer:n1"), timeout_s=120.0)
    if not ok:
        raise ScenarioStuck("no node started copying from the store within 120 s")
    yield stage.sleep(stage.rng.uniform(0.5, 5.0))
    # For good only when the model can still come from somewhere else (the hub).
    mode = "crash_stop" if stage.opts.hub_available and stage.rng.random() < 0.5 else "crash_restart"
    stage.metrics["store_loss"] = mode
    if store.node is not None:
        if mode == "crash_stop":
            world.faults.crash_stop(store)
        else:
            world.faults.heal_after(world.faults.crash_restart(store), stage.rng.uniform(5.0, 60.0))
    crashed_at = world.env.now
    ok = yield from stage.wait_until(lambda: stage.instance_serving(iid), timeout_s=stage.opts.ready_deadline_s)
    if not ok:
        raise ScenarioStuck(f"instance {iid} never served after the store node crashed ({mode})")
    stage.metrics["served_after_crash_s"] = round(world.env.now - crashed_at, 3)
    sources = sorted({c.source for h in hosts if (c := _copy(stage, h, model)) is not None})
    stage.metrics["copy_sources"] = ",".join(sources)


# --- partition_during_download -----------------------------------------------------------------


def _adjust_partition(opts: SimOptions, rng: Any) -> SimOptions:
    store = "n1" if rng.random() < 0.5 else None
    core = msgspec.structs.replace(opts.core, store_node=store, transfer_stall_s=rng.choice((10.0, 20.0, 30.0)),
                                   transfer_retry_s=rng.choice((2.0, 5.0, 10.0)))
    return opts.with_(
        model_id="sim/qwen-7b",
        node_count=max(3, opts.node_count),
        ram_total_gib=tuple((opts.ram_total_gib * 2)[: max(3, opts.node_count)]),
        models_on_disk="none",
        hub_available=True,
        fault_kinds=(),
        client_count=0,
        ready_deadline_s=900.0,
        core=core,
        **_slow_links(opts, rng),
    )


@scenario("partition_during_download", "the cluster is partitioned while model files download and copy; transfers "
          "that lost their source re-source and the model serves after the heal", adjust=_adjust_partition)
def partition_during_download(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    model = stage.opts.model_id
    k = stage.rng.randint(1, min(3, len(world.host_ids)))
    iid = yield from stage.place(min_nodes=k)
    everyone = list(world.host_ids)
    ok = yield from stage.wait_until(lambda: _moving(stage, everyone, model), timeout_s=120.0)
    if not ok:
        raise ScenarioStuck("no model file was moving within 120 s of placing")
    yield stage.sleep(stage.rng.uniform(0.5, 8.0))
    moving = [h for h in everyone if _moving(stage, [h], model)] or everyone
    if stage.rng.random() < 0.5:
        fault = world.faults.isolate(world.hosts[stage.rng.choice(moving)])
    else:
        ids = list(everyone)
        stage.rng.shuffle(ids)
        cut = stage.rng.randint(1, len(ids) - 1)
        fault = world.faults.partition([sorted(ids[:cut]), sorted(ids[cut:])])
    stage.metrics["partition"] = fault.describe()
    held = stage.rng.uniform(5.0, 60.0)
    yield stage.sleep(held)
    fault.heal()
    healed_at = world.env.now
    # A partition longer than node_timeout_s prunes the cut-off nodes and the instances
    # they hosted (the protocol, not a loss: invariant 5 spares what the survivors host).
    # Then the model is placed again, as its user would, and the files already moved count.
    yield stage.sleep(stage.opts.core.campaign_timeout_s + 5.0)
    if iid not in (_state(stage) or State()).instances:
        stage.metrics["replaced_after_heal"] = True
        iid = yield from stage.place(min_nodes=k, name="place-again")
    ok = yield from stage.wait_until(lambda: stage.instance_serving(iid), timeout_s=stage.opts.ready_deadline_s)
    if not ok:
        raise ScenarioStuck(f"instance {iid} never served after the partition healed")
    stage.metrics["served_after_heal_s"] = round(world.env.now - healed_at, 3)


# --- disk_full_mid_download --------------------------------------------------------------------

SERVING = "sim/qwen-1.5b"
DOWNLOADED = "sim/qwen-7b"


def _adjust_disk_full(opts: SimOptions, rng: Any) -> SimOptions:
    core = msgspec.structs.replace(opts.core, transfer_retry_s=rng.choice((2.0, 5.0, 10.0)),
                                   transfer_retry_max_s=30.0)
    return opts.with_(
        model_id=SERVING,
        models_on_disk="everywhere",
        hub_only_models=(DOWNLOADED,),
        hub_available=True,
        fault_kinds=(),
        client_count=max(2, opts.client_count),
        client_abandon_probability=min(0.1, opts.client_abandon_probability),
        ram_total_gib=tuple(max(32, r) for r in opts.ram_total_gib),
        ready_deadline_s=600.0,
        core=core,
        **_slow_links(opts, rng),
    )


class _Served:
    """Observer: when served requests ended (the clients here ask for the serving model only)."""

    def __init__(self) -> None:
        self.ended: list[float] = []

    def request_ended(self, req: Any) -> None:
        if req.served:
            self.ended.append(req.ended_at)

    def after_step(self, *args: Any) -> None:
        return

    def between(self, start: float, end: float) -> int:
        return sum(1 for t in self.ended if start <= t < end)


@scenario("disk_full_mid_download", "a node's disk fills while it downloads a model: a clear disk_full error, nothing "
          "half-written is loaded, the model it already serves keeps serving, the download is retried once there is "
          "room", adjust=_adjust_disk_full)
def disk_full_mid_download(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    served = _Served()
    world.observers.append(served)
    first = yield from stage.place_and_wait(SERVING, name="place-serving")
    (victim_id, *_) = _hosts_of(stage, first) or [world.host_ids[0]]
    victim = world.hosts[victim_id]
    until = world.env.now + 100_000.0
    stage.start_clients(until)
    others = tuple(h for h in world.host_ids if h != victim_id)
    second = yield from stage.place(DOWNLOADED, excluded=others, name="place-downloaded")
    ok = yield from stage.wait_until(lambda: _moving(stage, [victim_id], DOWNLOADED), timeout_s=120.0)
    if not ok:
        raise ScenarioStuck(f"{victim_id} never started downloading {DOWNLOADED}")
    yield stage.sleep(stage.rng.uniform(0.5, 5.0))
    if victim.node is None:
        raise ScenarioStuck(f"{victim_id} went down before its disk could fill")
    full_for = stage.rng.uniform(10.0, 40.0)
    fault = world.faults.disk_full(victim)
    full_at = world.env.now

    def failed_clearly() -> bool:
        copy = _copy(stage, victim_id, DOWNLOADED)
        state = _state(stage)
        if copy is None or copy.status != "failed" or not copy.error.startswith("disk_full") or state is None:
            return False
        inst = state.instances.get(second)
        if inst is None:
            return False
        runner = inst.shard_assignments.node_to_runner[victim_id]
        status = state.runners.get(runner)
        return isinstance(status, RunnerFailed) and status.code == "files_disk_full"

    ok = yield from stage.wait_until(failed_clearly, timeout_s=full_for)
    if not ok:
        raise ScenarioStuck(f"no clear disk_full failure on {victim_id} while its disk was full")
    yield stage.sleep(max(0.0, full_at + full_for - world.env.now))
    fault.heal()
    stage.metrics["served_while_full"] = served.between(full_at, world.env.now)
    if stage.metrics["served_while_full"] == 0:
        raise ScenarioStuck(f"no request on {SERVING} was served while {victim_id}'s disk was full")
    ok = yield from stage.wait_until(lambda: stage.instance_serving(second), timeout_s=stage.opts.ready_deadline_s)
    if not ok:
        raise ScenarioStuck(f"{DOWNLOADED} never served on {victim_id} after its disk had room again")
    world.observers.remove(served)
