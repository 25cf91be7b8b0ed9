"""partition_heal: split the cluster, let each side carry on, heal, converge.

Rounds of partitions while clients stream: a symmetric split, the master
alone or in the minority, and a one-way cut from the master. Each lasts
longer than the membership lease, so sides really elect their own masters
(availability over a split); after each heal the cluster must settle on one
session and one state. The first round always takes the master away from the
majority, so every seed exercises a deposed master rejoining (the path the
double-master canary breaks).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from chaos.stage import ScenarioStuck
from chaos.scenarios import Stage, scenario
from sim.options import SimOptions

KINDS = ("split", "master_minority", "isolate_master", "oneway_from_master")


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    n = max(3, opts.node_count)
    return opts.with_(
        node_count=n,
        ram_total_gib=tuple(opts.ram_total_gib[i % len(opts.ram_total_gib)] for i in range(n)),
        model_id="sim/qwen-7b",
        chaos_s=rng.uniform(60.0, 120.0),
        fault_kinds=(),
    )


@scenario("partition_heal", "partition the cluster (master in the minority, isolated, one-way), heal, converge", adjust=_adjust)
def partition_heal(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    rng = stage.rng
    yield from stage.place_and_wait()
    until = world.env.now + stage.opts.chaos_s
    stage.start_clients(until)
    rounds = 0
    kinds_run = []
    while world.env.now < until - 5.0:
        yield stage.sleep(rng.uniform(1.0, 5.0))
        master = stage.master_host()
        if master is None:
            continue
        ids = list(world.host_ids)
        others = [h for h in ids if h != master.id]
        kind = "master_minority" if rounds == 0 else rng.choice(KINDS)
        if kind == "split":
            rng.shuffle(ids)
            cut = rng.randint(1, len(ids) - 1)
            fault = world.faults.partition([sorted(ids[:cut]), sorted(ids[cut:])])
        elif kind == "master_minority":
            rng.shuffle(others)
            company = others[: max(0, (len(ids) - 1) // 2 - 1)]
            rest = others[len(company) :]
            fault = world.faults.partition([sorted([master.id, *company]), sorted(rest)])
        elif kind == "isolate_master":
            fault = world.faults.isolate(master)
        else:
            fault = world.faults.partition_oneway(master.id, rng.choice(others))
        kinds_run.append(kind)
        rounds += 1
        yield stage.sleep(stage.opts.lease_s + rng.uniform(1.0, 20.0))
        fault.heal()
        ok = yield from stage.wait_until(lambda: stage.master_host() is not None, timeout_s=stage.opts.liveness_bound_s)
        if not ok:
            raise ScenarioStuck(f"no single master within {stage.opts.liveness_bound_s:g} s after healing {fault.describe()}")
        yield stage.sleep(rng.uniform(3.0, 10.0))
    stage.metrics["partitions"] = ",".join(kinds_run)
    yield stage.sleep(until - world.env.now)
