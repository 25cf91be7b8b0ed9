"""oversized_placement: what fits nowhere is refused with the arithmetic; what fits only across nodes spans them.

A cluster of small machines (4 to 7 GiB of RAM each, little used by other
apps, so every node's usable memory is exactly 0.75 x its RAM):

1. The 70B model fits nowhere. Placing it is refused at once (not "pending",
   no retry) with code ``insufficient_memory`` and the arithmetic: the whole
   model's footprint, the memory the cluster can offer in total, and for the
   best split over every node, each node's need (weights, KV cache at 8,192
   tokens, headroom) against what it can use, exactly as the memory model
   computes them. Nothing is spawned: no runner starts and no instance of it
   is ever indexed.
2. The 7B model fits on no single node but fits across several. It is placed
   across the smallest number of nodes that can hold it (computed here
   independently, by trying every subset with the memory model's split), and
   every rank serves.
3. With the 7B in place, the 70B is refused again, nodes hosting the 7B now
   explaining the memory already placed on them; still nothing is spawned.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator
from fractions import Fraction
from typing import Any

from skulk.core.commands import PlaceInstance
from skulk.core.ids import CommandId, ModelId, NodeId
from skulk.core.memory import (
    NodeBudget,
    describe_shortfall,
    format_gb,
    node_budget,
    shard_footprint,
)

from chaos import oracles
from chaos.scenarios import Stage, scenario
from chaos.scenarios._support import (
    Ledger,
    expect,
    master_state,
    place_on,
    served_after,
    wait_links_observed,
    wait_serving,
)
from sim.options import SimOptions

HUGE = "sim/llama-70b"
SPLIT = "sim/qwen-7b"
# An impossible placement is answered at once, never retried until the command deadline.
_ANSWER_S_MAX = 5.0


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    n = rng.choice((3, 4, 5))
    return opts.with_(
        node_count=n,
        ram_total_gib=tuple(rng.choice((4, 5, 6, 7)) for _ in range(n)),
        # Other apps hold 0.5 +/- 0.25 GiB: available memory stays above 0.75 x RAM,
        # so usable memory (the smaller) is exactly 0.75 x RAM and the arithmetic exact.
        ram_base_used_gib=0.5,
        ram_noise_gib=0.25,
        model_id=SPLIT,
        fault_kinds=(),
        client_count=min(opts.client_count, 3),
    )


def _budgets(stage: Stage) -> dict[NodeId, NodeBudget]:
    state = master_state(stage)
    assert state is not None
    out = {}
    for n in stage.world.host_ids:
        b = node_budget(state, n)
        expect(b is not None, f"{n}'s memory known to the master")
        assert b is not None
        out[n] = b
    return out


def _split(card: Any, free: dict[NodeId, int]) -> dict[NodeId, Any]:
    """The footprints of a pipeline split over ``free``'s nodes: the documented split and arithmetic.

    The split and each total come from ``chaos.oracles`` (independent of the
    core); the core's ``shard_footprint`` only breaks the total down for the
    refusal's wording, and must agree with the documented total.
    """
    layers = oracles.layer_split(card.n_layers, free)
    out = {}
    for n in sorted(free):
        share = Fraction(layers[n], card.n_layers)
        fp = out[n] = shard_footprint(card, share)
        want = oracles.footprint_bytes(card, share)
        expect(fp.total_bytes == want, f"the footprint of {share} of {card.model_id} to be the documented {want}, "
                                       f"the memory model says {fp.total_bytes}")
    return out


def _smallest_fit(card: Any, budgets: dict[NodeId, NodeBudget]) -> int | None:
    nodes = sorted(budgets)
    for k in range(1, len(nodes) + 1):
        for subset in itertools.combinations(nodes, k):
            fps = _split(card, {n: budgets[n].free_bytes for n in subset})
            if all(fps[n].total_bytes <= budgets[n].free_bytes for n in subset):
                return k
    return None


def _refuse(stage: Stage, ledger: Ledger, name: str) -> Generator[Any, Any, Any]:
    """Ask to place the 70B; it must be refused at once, with nothing spawned."""
    world = stage.world
    starts = len(ledger.starts)
    host = world.hosts[stage.rng.choice(list(world.host_ids))]
    req = world.clients.submit(host, PlaceInstance(command_id=CommandId(name), model_id=ModelId(HUGE)))
    yield req.done
    expect(req.outcome == "rejected" and req.code == "insufficient_memory",
           f"{HUGE} refused as insufficient_memory, got {req.outcome} ({req.code}): {req.message}")
    took = req.ended_at - req.submitted_at
    expect(took <= _ANSWER_S_MAX, f"an impossible placement answered at once, it took {took:.3f} s")
    yield stage.sleep(1.0)  # anything a placement would have started would be starting now
    expect(len(ledger.starts) == starts, f"no runner started by the refused placement: {ledger.starts[starts:]}")
    expect(not ledger.of_model(HUGE), f"no instance of {HUGE} ever indexed: {ledger.of_model(HUGE)}")
    state = master_state(stage)
    expect(state is not None and all(i.shard_assignments.model_id != HUGE for i in state.instances.values()),
           f"no instance of {HUGE} in the state")
    return req.message


@scenario(
    "oversized_placement",
    "a model that fits nowhere is refused with the memory arithmetic and nothing spawned; one that fits only across nodes spans them",
    adjust=_adjust,
)
def oversized_placement(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    n = stage.opts.node_count
    ledger = Ledger(stage)
    yield from wait_links_observed(stage)
    huge, split = world.cards[HUGE], world.cards[SPLIT]
    budgets = _budgets(stage)
    for node, b in budgets.items():
        static = int(world.hosts[node].ram_total_bytes * oracles.USABLE)
        expect(b.free_bytes == b.usable_bytes == static, f"{node} free to use exactly 0.75 x RAM ({static}), got {b}")

    # 1. The 70B fits nowhere: refused with the arithmetic.
    message = yield from _refuse(stage, ledger, "place-huge")
    free = {node: b.free_bytes for node, b in budgets.items()}
    whole = shard_footprint(huge, 1)
    expect(whole.total_bytes == oracles.footprint_bytes(huge, Fraction(1)), f"{HUGE}'s footprint the documented one")
    expect(f"it does not fit in memory on 1 to {n} node(s)" in message, f"the node counts tried in {message!r}")
    total = f"the whole model needs ~{format_gb(whole.total_bytes)} and the {n} available node(s) can use " \
            f"{format_gb(sum(free.values()))} in total"
    expect(total in message, f"{total!r} in {message!r}")
    fps = _split(huge, free)
    for node in sorted(fps):
        expect(fps[node].total_bytes > free[node], f"{node} to fall short in the {n}-node split")
        line = describe_shortfall(node, fps[node], free[node], budget=budgets[node])
        expect(line in message, f"the refusal to carry {line!r}: {message!r}")
    expect(f"Best split over {n} node(s)" in message, f"the best split over all {n} nodes in {message!r}")

    # 2. The 7B fits only across several nodes: placed across the fewest that hold it.
    k = _smallest_fit(split, budgets)
    expect(k is not None and k >= 2, f"{SPLIT} to fit only across several nodes here (smallest fit: {k})")
    iid = yield from place_on(stage, SPLIT)
    inst = yield from wait_serving(stage, SPLIT, timeout_s=stage.opts.ready_deadline_s)
    expect(inst.instance_id == iid, f"the placed instance {iid} to serve, got {inst.instance_id}")
    hosts = sorted(inst.shard_assignments.node_to_runner)
    expect(len(hosts) == k, f"{SPLIT} across the {k} node(s) that suffice, got {hosts}")
    seen = ledger.created[iid].budgets
    for node in hosts:
        expect(inst.memory_by_node[node] <= seen[node].free_bytes,
               f"{node}'s share ({inst.memory_by_node[node]} bytes) within its free {seen[node].free_bytes}")
    expect(len(ledger.starts_of(iid)) == k, f"one runner per node of {iid}, got {len(ledger.starts_of(iid))}")
    stage.metrics["split_nodes"] = k
    since = world.env.now
    stage.start_clients(world.env.now + 10_000.0)
    ok = yield from stage.wait_until(
        lambda: served_after([r for r in world.clients.requests.values() if r.kind == "SubmitTask"], since) > 0,
        timeout_s=60.0,
    )
    expect(ok, f"a request served by {SPLIT} across {k} nodes")

    # 3. Refused again; nodes hosting the 7B say what is already placed on them.
    message = yield from _refuse(stage, ledger, "place-huge-again")
    parts = message.split("; node ")
    for node in hosts:
        part = next((p for p in parts if p.startswith(f"{node} needs") or f"node {node} needs" in p), None)
        expect(part is not None and "already placed there" in part,
               f"{node} (hosting {SPLIT}) to explain the memory already placed there: {message!r}")
    yield stage.sleep(stage.rng.uniform(2.0, 10.0))
