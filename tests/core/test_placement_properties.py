"""Property tests for placement (Hypothesis).

For random clusters (memory, telemetry gaps, observed links of every kind,
instances already placed) and random cards and commands:

- a placement never exceeds any hosting node's free (hence usable) memory,
  and the footprints on a node never add up past 0.75 x its RAM;
- every layer is assigned exactly once, in rank order;
- every ring hop uses an observed link from the predecessor to the listener;
- the same inputs give the same placement, whatever the insertion order of
  the state's dicts, of the observed connections and of the cards mapping.
"""

from __future__ import annotations

import random

import msgspec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from skulk.core import interconnect, placement
from skulk.core.cards import ModelCard
from skulk.core.commands import PlaceInstance
from skulk.core.events import InstanceCreated
from skulk.core.ids import CommandId, ModelId, NodeId
from skulk.core.instances import PipelineShardMetadata, TensorShardMetadata
from skulk.core.memory import node_budget, shard_footprint, shard_share, usable_bytes
from skulk.core.topology import Connection
from skulk.core.state import State
from tests.core.test_placement import CONFIG, GB, apply_events, build_state, mem

KINDS = ("thunderbolt", "ethernet", "wifi", "unknown", "vpn")
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def clusters(draw: st.DrawFn) -> State:
    n = draw(st.sampled_from((1, 2, 3, 3, 4, 4, 5)))
    names = [f"n{i}" for i in range(n)]
    nodes = {}
    for name in names:
        if draw(st.integers(0, 9)) == 0:
            nodes[name] = None  # no memory telemetry yet
            continue
        total = draw(st.integers(2, 192)) * GB
        available = total * draw(st.integers(30, 100)) // 100
        nodes[name] = mem(total, available)
    links: list[Connection] = []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if a == b:
                continue
            # Mostly at least one link per direction, sometimes none (a ring must route around).
            at_least = draw(st.sampled_from((0, 1, 1, 1, 1)))
            for kind in draw(st.lists(st.sampled_from(KINDS), min_size=at_least, max_size=3, unique=True)):
                if kind == "vpn":
                    address, label = f"100.64.{j}.{i + 1}", draw(st.sampled_from(("unknown", "ethernet")))
                else:
                    address, label = f"10.{KINDS.index(kind)}.{j}.{i + 1}", kind
                links.append(Connection(source=NodeId(a), sink=NodeId(b), address=address, kind=label))  # type: ignore[arg-type]
    return build_state(nodes, links, next_port_offset=draw(st.integers(0, 20_000)))


@st.composite
def cards(draw: st.DrawFn, model_id: str = "prop/model", cluster: State | None = None) -> ModelCard:
    kv_heads = draw(st.sampled_from((1, 2, 4, 8, 16)))
    if cluster is not None and cluster.node_memory:
        # Sized against the cluster, so that one node, several nodes and no node all happen.
        room = sum(usable_bytes(m) for m in cluster.node_memory.values())
        weight_bytes = max(50_000_000, room * draw(st.integers(2, 110)) // 140)
    else:
        weight_bytes = draw(st.integers(50_000_000, 250 * GB))
    return ModelCard(
        model_id=ModelId(model_id),
        family="qwen3",
        weight_bytes=weight_bytes,
        n_layers=draw(st.integers(1, 100)),
        hidden_size=kv_heads * 64 * draw(st.integers(1, 12)),
        num_kv_heads=kv_heads,
        head_dim=draw(st.sampled_from((64, 128))),
        context_length=draw(st.integers(1_024, 262_144)),
        supports_tensor=draw(st.booleans()),
    )


@st.composite
def commands(draw: st.DrawFn, state: State, cid: str = "cmd") -> PlaceInstance:
    nodes = list(state.topology.nodes)
    return PlaceInstance(
        command_id=CommandId(cid),
        model_id=ModelId("prop/model"),
        sharding=draw(st.sampled_from(("Pipeline", "Tensor"))),
        instance_meta=draw(st.sampled_from(("MlxRing", "MlxRing", "MlxRing", "MlxJaccl"))),
        min_nodes=draw(st.sampled_from((1, 1, 1, 2, 3))),
        excluded_nodes=tuple(draw(st.lists(st.sampled_from(nodes), max_size=1))) if nodes else (),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[State, ModelCard, PlaceInstance]:
    state = draw(clusters())
    # Instances already placed (runners not loaded yet): they must be reserved.
    for i in range(draw(st.integers(0, 2))):
        earlier = draw(cards(model_id="prop/earlier"))
        out = placement.place(
            state,
            PlaceInstance(command_id=CommandId(f"pre{i}"), model_id=ModelId("prop/earlier")),
            {earlier.model_id: earlier},
            CONFIG,
        )
        if isinstance(out, placement.Placed):
            state = apply_events(state, [InstanceCreated(instance=out.instance)])
    card = draw(cards(cluster=state))
    return state, card, draw(commands(state))


def _check(state: State, card: ModelCard, cmd: PlaceInstance, out: placement.Placed | placement.PlacementRefused) -> None:
    if isinstance(out, placement.PlacementRefused):
        assert out.message and out.code
        event(f"refused: {out.code}")
        return
    inst = out.instance
    event(f"placed: {cmd.sharding} on {len(inst.shard_assignments.node_to_runner)} node(s)")
    sa = inst.shard_assignments
    hosting = sorted(sa.node_to_runner)
    assert not set(hosting) & set(cmd.excluded_nodes)
    assert len(hosting) >= cmd.min_nodes
    # Memory: within free (hence usable) memory, and never double-booked.
    for node in hosting:
        budget = node_budget(state, node)
        assert budget is not None
        need = inst.memory_by_node[node]
        assert need == shard_footprint(card, shard_share(sa.runner_to_shard[sa.node_to_runner[node]])).total_bytes
        assert need <= budget.free_bytes <= usable_bytes(state.node_memory[node])
        assert budget.committed_bytes + need <= budget.capacity_bytes
    # Layers: each exactly once, in rank order; tensor ranks hold everything.
    shards = sorted(sa.runner_to_shard.values(), key=lambda s: s.device_rank)
    assert [s.device_rank for s in shards] == list(range(len(hosting)))
    if cmd.sharding == "Pipeline":
        assert all(isinstance(s, PipelineShardMetadata) for s in shards)
        covered = [layer for s in shards for layer in range(s.start_layer, s.end_layer)]  # type: ignore[union-attr]
        assert covered == list(range(card.n_layers))
        assert all(s.end_layer > s.start_layer for s in shards)  # type: ignore[union-attr]
    else:
        assert all(isinstance(s, TensorShardMetadata) and s.world_size == len(hosting) for s in shards)
        assert card.supports_tensor and card.hidden_size % len(hosting) == 0 and card.num_kv_heads % len(hosting) == 0
    # Ring: each hop is the best observed link from its predecessor to the listener.
    assert inst.ephemeral_port == placement.ring_port(state.next_port_offset, CONFIG)
    if len(hosting) == 1:
        assert inst.ring == ()
    order = [sa.runner_to_shard[sa.node_to_runner[n]].device_rank for n in hosting]
    by_rank = [hosting[order.index(r)] for r in range(len(hosting))]
    for hop in inst.ring:
        assert hop.node_id == by_rank[hop.rank]
        best = interconnect.best_link(state, by_rank[hop.rank - 1], hop.node_id)
        assert best is not None
        assert hop.address == interconnect.format_address(best.address, inst.ephemeral_port + hop.rank)
        assert hop.kind == interconnect.effective_kind(best)
        if cmd.instance_meta == "MlxJaccl":
            assert hop.kind == "thunderbolt"
    assert min(card.context_length, 8_192) <= inst.context_ceiling <= card.context_length


@SETTINGS
@given(scenarios())
def test_placement_respects_memory_layers_and_links(scenario: tuple[State, ModelCard, PlaceInstance]) -> None:
    state, card, cmd = scenario
    _check(state, card, cmd, placement.place(state, cmd, {card.model_id: card}, CONFIG))


def _shuffled(state: State, rng: random.Random) -> State:
    def reorder(d: dict) -> dict:
        keys = list(d)
        rng.shuffle(keys)
        return {k: d[k] for k in keys}

    conns = list(state.topology.connections)
    rng.shuffle(conns)
    nodes = list(state.topology.nodes)
    rng.shuffle(nodes)
    return msgspec.structs.replace(
        state,
        instances=reorder(state.instances),
        runners=reorder(state.runners),
        node_memory=reorder(state.node_memory),
        last_seen=reorder(state.last_seen),
        runner_instance=reorder(state.runner_instance),
        topology=msgspec.structs.replace(state.topology, connections=tuple(conns), nodes=tuple(nodes)),
    )


@SETTINGS
@given(scenarios(), st.randoms(use_true_random=False))
def test_same_inputs_give_the_same_placement_whatever_the_order(
    scenario: tuple[State, ModelCard, PlaceInstance], rng: random.Random
) -> None:
    state, card, cmd = scenario
    decoy = ModelCard(**{**msgspec.structs.asdict(card), "model_id": ModelId("prop/decoy")})
    first = placement.place(state, cmd, {card.model_id: card, decoy.model_id: decoy}, CONFIG)
    again = placement.place(_shuffled(state, rng), cmd, {decoy.model_id: decoy, card.model_id: card}, CONFIG)
    assert again == first
    assert msgspec.json.encode(again) == msgspec.json.encode(first)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_placing_until_full_never_overcommits(data: st.DataObject) -> None:
    state = data.draw(clusters())
    card = data.draw(cards(cluster=state))
    small = ModelCard(**{**msgspec.structs.asdict(card), "weight_bytes": max(50_000_000, card.weight_bytes // 4)})
    for i in range(12):
        cmd = PlaceInstance(command_id=CommandId(f"c{i}"), model_id=small.model_id)
        out = placement.place(state, cmd, {small.model_id: small}, CONFIG)
        _check(state, small, cmd, out)
        if isinstance(out, placement.PlacementRefused):
            break
        state = apply_events(state, [InstanceCreated(instance=out.instance)])
    for node in state.node_memory:
        budget = node_budget(state, node)
        assert budget is not None and budget.committed_bytes <= budget.capacity_bytes
