"""heterogeneous_cluster: nodes of different memory sizes get layer splits in proportion.

Every node has a different amount of RAM (32 to 128 GiB).

1. The 70B model is placed over every node. On a fresh cluster a node's free
   memory is exactly 0.75 x its RAM (other apps leave more than that
   available), so the pipeline split is fixed by the RAM sizes alone: one
   layer each, the rest in proportion by largest remainder. Each node's
   layer count must be exactly that, within one layer of its exact
   proportional share, never fewer than a node with less memory; the
   layers must be contiguous in rank order and cover the model once; each
   node's stamped footprint is the memory model's for its share and fits its
   free memory.
2. With the 70B loaded (telemetry now shows its memory, unevenly), the 7B
   model is placed over some of the nodes: its split must follow the free
   memory placement saw at that moment (taken from the master's state at
   the step it indexed the instance), by the same rules.

Both instances then serve requests.
"""

from __future__ import annotations

from collections.abc import Generator
from fractions import Fraction
from typing import Any

from skulk.core.ids import NodeId
from skulk.core.instances import Instance, PipelineShardMetadata

from chaos import oracles

from chaos.scenarios import Stage, scenario
from chaos.scenarios._support import (
    Ledger,
    expect,
    place_on,
    served_after,
    wait_links_observed,
    wait_serving,
)
from sim.clients import chat_client
from sim.options import SimOptions

BIG = "sim/llama-70b"
SMALL = "sim/qwen-7b"
SIZES_GIB = (32, 48, 64, 96, 128)


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    n = rng.choice((3, 4, 5))
    return opts.with_(
        node_count=n,
        ram_total_gib=tuple(rng.sample(SIZES_GIB, n)),
        model_id=BIG,
        fault_kinds=(),
        client_count=max(2, min(opts.client_count, 4)),
    )


def _check_split(stage: Stage, inst: Instance, free: dict[NodeId, int], what: str) -> str:
    """The instance's pipeline split is ``layer_split`` of ``free`` (see the module docstring)."""
    card = stage.world.cards[inst.shard_assignments.model_id]
    sa = inst.shard_assignments
    shards = {node: sa.runner_to_shard[r] for node, r in sa.node_to_runner.items()}
    expect(all(isinstance(s, PipelineShardMetadata) for s in shards.values()), f"{what}: pipeline shards")
    by_rank = sorted(shards.items(), key=lambda kv: kv[1].device_rank)
    start = 0
    for rank, (node, shard) in enumerate(by_rank):
        assert isinstance(shard, PipelineShardMetadata)
        expect(shard.device_rank == rank and shard.start_layer == start and shard.end_layer > start,
               f"{what}: rank {rank} on {node} continues at layer {start}, got {shard}")
        start = shard.end_layer
    expect(start == card.n_layers, f"{what}: every one of {card.n_layers} layers assigned once, got up to {start}")
    counts = {node: s.end_layer - s.start_layer for node, s in shards.items()}  # type: ignore[union-attr]
    hosting = sorted(counts)
    weights = {node: free[node] for node in hosting}
    want = oracles.layer_split(card.n_layers, weights)  # the documented rule, not the core's function
    expect(counts == want, f"{what}: layers {counts} to follow free memory {weights}: {want}")
    k, total = len(hosting), sum(weights.values())
    for node in hosting:
        exact = 1 + Fraction((card.n_layers - k) * weights[node], total)
        expect(abs(counts[node] - exact) < 1, f"{what}: {node}'s {counts[node]} layers within one of {float(exact):.2f}")
        for other in hosting:
            if weights[node] > weights[other]:
                expect(counts[node] >= counts[other],
                       f"{what}: {node} (more free memory) holds no fewer layers than {other}: {counts}")
        fp = oracles.footprint_bytes(card, Fraction(counts[node], card.n_layers))
        expect(inst.memory_by_node[node] == fp, f"{what}: {node}'s stamped footprint is the documented one ({fp})")
        expect(fp <= free[node], f"{what}: {node}'s footprint {fp} within its free {free[node]}")
    return ",".join(f"{node}={counts[node]}" for node in hosting)


@scenario(
    "heterogeneous_cluster",
    "nodes with different memory sizes get pipeline layer splits in proportion to their free memory",
    adjust=_adjust,
)
def heterogeneous_cluster(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    n = opts.node_count
    ledger = Ledger(stage)
    yield from wait_links_observed(stage)

    # 1. The 70B over every node: the split follows 0.75 x RAM.
    big = yield from place_on(stage, BIG, min_nodes=n, name="place-big")
    inst = yield from wait_serving(stage, BIG, timeout_s=opts.ready_deadline_s)
    expect(inst.instance_id == big and len(inst.shard_assignments.node_to_runner) == n, f"{BIG} on all {n} nodes")
    static = {h: int(world.hosts[h].ram_total_bytes * oracles.USABLE) for h in world.host_ids}
    seen = {node: b.free_bytes for node, b in ledger.created[big].budgets.items()}
    expect(seen == static, f"free memory on a fresh cluster to be 0.75 x RAM: {seen} vs {static}")
    stage.metrics["big_layers"] = _check_split(stage, inst, static, BIG)
    stage.metrics["ram_gib"] = ",".join(str(g) for g in opts.ram_total_gib)

    # 2. The 7B over some nodes once the 70B is loaded: the split follows free memory then.
    yield stage.sleep(2 * opts.telemetry_sample_s)  # telemetry shows the 70B's memory by now
    k = stage.rng.randint(2, n)
    small = yield from place_on(stage, SMALL, min_nodes=k, name="place-small")
    served_small = yield from wait_serving(stage, SMALL, timeout_s=opts.ready_deadline_s)
    expect(served_small.instance_id == small and len(served_small.shard_assignments.node_to_runner) == k,
           f"{SMALL} on {k} nodes")
    seen = {node: b.free_bytes for node, b in ledger.created[small].budgets.items()}
    expect(sorted(seen) == sorted(served_small.shard_assignments.node_to_runner), f"budgets for every node of {small}")
    stage.metrics["small_layers"] = _check_split(stage, served_small, seen, SMALL)

    # Both serve.
    since = world.env.now
    for i, model in enumerate((BIG, SMALL)):
        for c in range(opts.client_count):
            world.process(chat_client(world, c, until=world.env.now + 10_000.0, model_id=model, prefix=f"chat{i}"))  # type: ignore[arg-type]

    def requests(model: str) -> list[Any]:
        return [r for r in world.clients.requests.values() if r.kind == "SubmitTask" and r.command.model_id == model]

    ok = yield from stage.wait_until(
        lambda: served_after(requests(BIG), since) > 0 and served_after(requests(SMALL), since) > 0, timeout_s=60.0
    )
    expect(ok, "requests served by both instances")
    yield stage.sleep(stage.rng.uniform(2.0, 8.0))
