"""Placement: smallest fitting ring, proportional splits, refusals with arithmetic, previews.

The builders at the top are shared with the property tests
(``test_placement_properties.py``); states are always built through the real
``apply`` so they are states the cluster can actually reach.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec
import pytest

from skulk.core import placement
from skulk.core.cards import ModelCard
from skulk.core.commands import PlaceInstance
from skulk.core.config import CoreConfig
from skulk.core.context import context_ceiling
from skulk.core.events import (
    Carryover,
    ConnectionLost,
    ConnectionObserved,
    Event,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    NodeGatheredInfo,
    RunnerStatusUpdated,
    SessionStarted,
)
from skulk.core.ids import CommandId, ModelId, NodeId, derive_id
from skulk.core.instances import (
    Instance,
    MlxJacclInstance,
    MlxRingInstance,
    PipelineShardMetadata,
    RunnerLoaded,
    TensorShardMetadata,
)
from skulk.core.memory import node_budget, shard_footprint, shard_share, usable_bytes
from skulk.core.nodes import Connection, Memory, MemoryInfo
from skulk.core.session import Session
from skulk.core.state import EMPTY_STATE, State, apply

GB = 10**9
CONFIG = CoreConfig()


# --- builders (shared) ------------------------------------------------------------------


def mem(total: int, available: int | None = None) -> MemoryInfo:
    return MemoryInfo(ram_total=Memory(in_bytes=total), ram_available=Memory(in_bytes=total if available is None else available))


def link(source: str, sink: str, address: str, kind: str = "ethernet") -> Connection:
    return Connection(source=NodeId(source), sink=NodeId(sink), address=address, kind=kind)  # type: ignore[arg-type]


def apply_events(state: State, events: Iterable[Event]) -> State:
    for event in events:
        state = apply(state, IndexedEvent(index=state.last_index + 1, event=event, at=float(state.last_index + 1)))
    return state


def build_state(
    nodes: dict[str, MemoryInfo | None],
    links: Sequence[Connection] = (),
    *,
    next_port_offset: int = 0,
) -> State:
    """A session with ``nodes`` (None: no memory telemetry yet) and observed ``links``."""
    state = apply(
        EMPTY_STATE,
        IndexedEvent(
            index=0,
            event=SessionStarted(session=Session(clock=1, master=NodeId("m")), carryover=Carryover(next_port_offset=next_port_offset)),
            at=0.0,
        ),
    )
    events: list[Event] = [NodeGatheredInfo(node_id=NodeId(n), memory=m) for n, m in nodes.items()]
    events += [ConnectionObserved(connection=c) for c in links]
    return apply_events(state, events)


def full_mesh(names: Sequence[str], kind: str = "ethernet", prefix: str = "10.0.0") -> list[Connection]:
    """Links between every ordered pair; node i's address is prefix.(i+1)."""
    addr = {n: f"{prefix}.{i + 1}" for i, n in enumerate(names)}
    return [link(a, b, addr[b], kind) for a in names for b in names if a != b]


def make_card(**over: object) -> ModelCard:
    base: dict[str, object] = dict(
        model_id="test/model",
        family="llama",
        weight_bytes=40 * GB,
        n_layers=80,
        hidden_size=8192,
        num_kv_heads=8,
        head_dim=128,
        context_length=131_072,
        supports_tensor=True,
    )
    base.update(over)
    return ModelCard(**base)  # type: ignore[arg-type]


def cards_of(*cards: ModelCard) -> dict[ModelId, ModelCard]:
    return {c.model_id: c for c in cards}


def command(model_id: str = "test/model", cid: str = "cmd-1", **over: object) -> PlaceInstance:
    return PlaceInstance(command_id=CommandId(cid), model_id=ModelId(model_id), **over)  # type: ignore[arg-type]


def placed(result: placement.Placed | placement.PlacementRefused) -> Instance:
    assert isinstance(result, placement.Placed), result
    return result.instance


def layers_by_node(inst: Instance) -> dict[NodeId, int]:
    sa = inst.shard_assignments
    out = {}
    for node, runner in sa.node_to_runner.items():
        shard = sa.runner_to_shard[runner]
        assert isinstance(shard, PipelineShardMetadata)
        out[node] = shard.end_layer - shard.start_layer
    return out


def rank_order(inst: Instance) -> list[NodeId]:
    sa = inst.shard_assignments
    return sorted(sa.node_to_runner, key=lambda n: sa.runner_to_shard[sa.node_to_runner[n]].device_rank)


# --- choosing nodes ---------------------------------------------------------------------


def test_a_model_that_fits_one_node_is_placed_on_one_node_the_smallest_cycle():
    state = build_state({"a": mem(64 * GB), "b": mem(64 * GB)}, full_mesh(["a", "b"]))
    inst = placed(placement.place(state, command(), cards_of(make_card(weight_bytes=10 * GB)), CONFIG))
    assert list(inst.shard_assignments.node_to_runner) == ["a"]  # tie on memory: smallest id
    assert inst.ring == ()
    (shard,) = inst.shard_assignments.runner_to_shard.values()
    assert isinstance(shard, PipelineShardMetadata)
    assert (shard.start_layer, shard.end_layer, shard.world_size) == (0, 80, 1)


def test_the_node_with_more_free_memory_wins_between_equal_single_node_choices():
    state = build_state({"a": mem(32 * GB), "b": mem(64 * GB)}, ())
    inst = placed(placement.place(state, command(), cards_of(make_card(weight_bytes=10 * GB)), CONFIG))
    assert list(inst.shard_assignments.node_to_runner) == ["b"]


def test_a_model_that_fits_only_across_nodes_is_split_in_proportion_to_memory():
    # 40 GB of weights: too big for any one node, fits on a (64 GB) + b (32 GB).
    state = build_state({"a": mem(64 * GB), "b": mem(32 * GB), "c": mem(16 * GB)}, full_mesh(["a", "b", "c"]))
    inst = placed(placement.place(state, command(), cards_of(make_card()), CONFIG))
    split = layers_by_node(inst)
    assert split == {"a": 53, "b": 27}  # 1 + 78 x 2/3 = 53, 1 + 78 x 1/3 = 27
    assert sum(split.values()) == 80


def test_heterogeneous_cluster_gets_layer_splits_in_proportion_to_usable_memory():
    state = build_state({"a": mem(128 * GB), "b": mem(64 * GB), "c": mem(32 * GB)}, full_mesh(["a", "b", "c"]))
    inst = placed(placement.place(state, command(min_nodes=3), cards_of(make_card(n_layers=71)), CONFIG))
    # 1 each, then 68 more by 4:2:1 -> 38.86, 19.43, 9.71 -> 38, 19, 9 + largest remainders (c .71, a .86)
    assert layers_by_node(inst) == {"a": 40, "b": 20, "c": 11}
    footprints = inst.memory_by_node
    assert footprints["a"] > footprints["b"] > footprints["c"]


def test_pipeline_shards_cover_every_layer_once_in_rank_order():
    state = build_state({n: mem(24 * GB) for n in "abcd"}, full_mesh(list("abcd")))
    inst = placed(placement.place(state, command(min_nodes=4), cards_of(make_card(n_layers=61)), CONFIG))
    sa = inst.shard_assignments
    shards = sorted(sa.runner_to_shard.values(), key=lambda s: s.device_rank)
    assert [s.device_rank for s in shards] == [0, 1, 2, 3]
    assert shards[0].start_layer == 0 and shards[-1].end_layer == 61
    assert all(a.end_layer == b.start_layer for a, b in zip(shards, shards[1:]))
    assert all(isinstance(s, PipelineShardMetadata) and s.world_size == 4 and s.n_layers == 61 for s in shards)


def test_min_nodes_and_excluded_nodes_are_honoured():
    state = build_state({n: mem(64 * GB) for n in "abc"}, full_mesh(list("abc")))
    card = make_card(weight_bytes=5 * GB)
    inst = placed(placement.place(state, command(min_nodes=2, excluded_nodes=("a",)), cards_of(card), CONFIG))
    assert sorted(inst.shard_assignments.node_to_runner) == ["b", "c"]


def test_tensor_sharding_gives_every_rank_all_layers_and_an_equal_share():
    state = build_state({n: mem(40 * GB) for n in "ab"}, full_mesh(["a", "b"]))
    inst = placed(placement.place(state, command(sharding="Tensor"), cards_of(make_card()), CONFIG))
    shards = list(inst.shard_assignments.runner_to_shard.values())
    assert all(isinstance(s, TensorShardMetadata) and s.world_size == 2 and s.n_layers == 80 for s in shards)
    assert sorted(s.device_rank for s in shards) == [0, 1]
    assert len(set(inst.memory_by_node.values())) == 1


def test_tensor_sharding_needs_divisible_dimensions_and_card_support():
    state = build_state({n: mem(64 * GB) for n in "abc"}, full_mesh(list("abc")))
    refused = placement.place(state, command(sharding="Tensor", min_nodes=3), cards_of(make_card()), CONFIG)
    assert isinstance(refused, placement.PlacementRefused) and not refused.pending
    assert refused.code == "tensor_unsupported"
    assert "divide hidden size 8192 and KV heads 8" in refused.message
    gemma = make_card(supports_tensor=False, family="gemma3")
    refused = placement.place(state, command(sharding="Tensor"), cards_of(gemma), CONFIG)
    assert isinstance(refused, placement.PlacementRefused) and refused.code == "tensor_unsupported"
    assert "does not support tensor sharding" in refused.message


def test_a_model_that_cannot_be_split_into_stages_is_refused_a_pipeline_with_the_reason():
    """What cannot run across ranks is refused at placement, never at load (issue 12)."""
    state = build_state({n: mem(64 * GB) for n in "ab"}, full_mesh(list("ab")))
    shared = make_card(family="gemma4", supports_tensor=False, weight_bytes=10 * GB,
                       pipeline_refusal="its last 20 layers reuse earlier layers' keys and values across the depth")
    refused = placement.place(state, command(sharding="Pipeline", min_nodes=2), cards_of(shared), CONFIG)
    assert isinstance(refused, placement.PlacementRefused) and not refused.pending
    assert refused.code == "invalid_request"
    assert "cannot be split into pipeline stages: its last 20 layers reuse" in refused.message
    # One node holds the whole model: nothing is split, so nothing is refused.
    inst = placed(placement.place(state, command(sharding="Pipeline"), cards_of(shared), CONFIG))
    assert len(inst.shard_assignments.runner_to_shard) == 1
    assert placement.static_refusal(shared, "Pipeline", 1) is None
    assert placement.static_refusal(make_card(), "Pipeline", 2) is None


# --- refusals ----------------------------------------------------------------------------


def test_the_refusal_names_the_node_and_the_arithmetic():
    # The example: 11.2 GB of weights, 98,304 KV bytes per token (24 layers,
    # 8 KV heads, head dim 128), on a 16 GB node that can use 12.0 GB.
    card = make_card(weight_bytes=11_200_000_000, n_layers=24, hidden_size=4096)
    state = build_state({"B": mem(16 * GB)})
    refused = placement.place(state, command(), cards_of(card), CONFIG)
    assert isinstance(refused, placement.PlacementRefused)
    assert (refused.code, refused.pending) == ("insufficient_memory", False)
    assert (
        "node B needs ~15.6 GB (11.2 GB weights + 0.8 GB KV at 8192 tokens + headroom) but can use 12.0 GB"
        in refused.message
    )


def test_a_model_that_fits_nowhere_is_refused_as_impossible_with_every_short_node():
    state = build_state({"a": mem(64 * GB), "b": mem(32 * GB), "c": mem(16 * GB)}, full_mesh(["a", "b", "c"]))
    refused = placement.place(state, command(), cards_of(make_card(weight_bytes=100 * GB)), CONFIG)
    assert isinstance(refused, placement.PlacementRefused)
    assert (refused.code, refused.pending) == ("insufficient_memory", False)
    assert "Best split over 3 node(s)" in refused.message
    for node in "abc":
        assert f"node {node} needs ~" in refused.message
    assert "can use 84.0 GB in total" in refused.message


def test_an_unknown_model_is_not_found():
    state = build_state({"a": mem(64 * GB)})
    refused = placement.place(state, command("nope/model"), cards_of(make_card()), CONFIG)
    assert isinstance(refused, placement.PlacementRefused)
    assert (refused.code, refused.pending) == ("model_not_found", False)


def test_missing_memory_telemetry_is_pending_not_impossible():
    state = build_state({"a": mem(32 * GB), "b": None}, full_mesh(["a", "b"]))
    refused = placement.place(state, command(), cards_of(make_card()), CONFIG)
    assert isinstance(refused, placement.PlacementRefused)
    assert (refused.code, refused.pending) == ("pending_telemetry", True)
    assert "waiting for memory telemetry from node(s) b" in refused.message
    # Once b reports, the same command is placed.
    state = apply_events(state, [NodeGatheredInfo(node_id=NodeId("b"), memory=mem(64 * GB))])
    assert isinstance(placement.place(state, command(), cards_of(make_card()), CONFIG), placement.Placed)


def test_no_nodes_yet_is_pending():
    refused = placement.place(build_state({}), command(), cards_of(make_card()), CONFIG)
    assert isinstance(refused, placement.PlacementRefused) and refused.pending and refused.code == "no_nodes"


def test_fitting_in_memory_without_an_observed_ring_is_pending():
    state = build_state({"a": mem(32 * GB), "b": mem(64 * GB)}, [link("a", "b", "10.0.0.2")])
    refused = placement.place(state, command(), cards_of(make_card()), CONFIG)
    assert isinstance(refused, placement.PlacementRefused)
    assert (refused.code, refused.pending) == ("no_ring", True)
    assert "nodes a, b" in refused.message
    state = apply_events(state, [ConnectionObserved(connection=link("b", "a", "10.0.0.1"))])
    assert isinstance(placement.place(state, command(), cards_of(make_card()), CONFIG), placement.Placed)


def test_min_nodes_beyond_the_cluster_and_all_excluded_are_invalid():
    state = build_state({"a": mem(64 * GB)})
    refused = placement.place(state, command(min_nodes=3), cards_of(make_card(weight_bytes=GB)), CONFIG)
    assert isinstance(refused, placement.PlacementRefused) and (refused.code, refused.pending) == ("invalid_request", False)
    refused = placement.place(state, command(excluded_nodes=("a",)), cards_of(make_card(weight_bytes=GB)), CONFIG)
    assert isinstance(refused, placement.PlacementRefused) and (refused.code, refused.pending) == ("invalid_request", False)
    refused = placement.place(state, command(min_nodes=0), cards_of(make_card(weight_bytes=GB)), CONFIG)
    assert isinstance(refused, placement.PlacementRefused) and refused.code == "invalid_request"


# --- what the instance carries ----------------------------------------------------------------


def test_ids_port_ceiling_and_memory_are_stamped_deterministically():
    state = build_state({"a": mem(64 * GB), "b": mem(32 * GB)}, full_mesh(["a", "b"]), next_port_offset=5_003)
    card = make_card()
    inst = placed(placement.place(state, command(cid="cmd-42"), cards_of(card), CONFIG))
    assert isinstance(inst, MlxRingInstance)
    assert inst.instance_id == derive_id("inst", "cmd-42", 0)
    assert inst.generation == 0
    blocks = CONFIG.port_span // CONFIG.max_ring_ranks
    assert inst.ephemeral_port == CONFIG.base_port + (5_003 % blocks) * CONFIG.max_ring_ranks == 52_676
    for node, runner in inst.shard_assignments.node_to_runner.items():
        assert runner == derive_id("runner", inst.instance_id, node)
    sa = inst.shard_assignments
    shares = {n: shard_share(sa.runner_to_shard[r]) for n, r in sa.node_to_runner.items()}
    assert inst.memory_by_node == {n: shard_footprint(card, shares[n]).total_bytes for n in shares}
    totals = {n: state.node_memory[n].ram_total.in_bytes for n in shares}
    assert inst.context_ceiling == context_ceiling(card, shares, totals)
    assert 8_192 <= inst.context_ceiling <= card.context_length
    assert [h.address for h in inst.ring] == ["10.0.0.1:52676", "10.0.0.2:52677"]


def test_a_placed_instance_applies_and_advances_the_port_offset():
    state = build_state({"a": mem(64 * GB)})
    inst = placed(placement.place(state, command(), cards_of(make_card(weight_bytes=GB)), CONFIG))
    after = apply_events(state, [InstanceCreated(instance=inst, command_id=CommandId("cmd-1"))])
    assert after.next_port_offset == state.next_port_offset + 1
    again = placed(placement.place(after, command(cid="cmd-2"), cards_of(make_card(weight_bytes=GB)), CONFIG))
    assert again.ephemeral_port == inst.ephemeral_port + CONFIG.max_ring_ranks  # a fresh block


def test_mlx_jaccl_needs_a_thunderbolt_mesh():
    names = ["a", "b"]
    eth = build_state({n: mem(40 * GB) for n in names}, full_mesh(names))
    refused = placement.place(eth, command(instance_meta="MlxJaccl"), cards_of(make_card()), CONFIG)
    assert isinstance(refused, placement.PlacementRefused) and refused.code == "no_ring" and "thunderbolt" in refused.message
    tb = build_state({n: mem(40 * GB) for n in names}, full_mesh(names) + full_mesh(names, "thunderbolt", "169.254.0"))
    inst = placed(placement.place(tb, command(instance_meta="MlxJaccl"), cards_of(make_card()), CONFIG))
    assert isinstance(inst, MlxJacclInstance)
    assert {h.kind for h in inst.ring} == {"thunderbolt"}


# --- interconnect selection in rings ---------------------------------------------------------


def _tb_eth_vpn_state(extra: Sequence[Connection] = ()) -> State:
    names = ["a", "b"]
    links = full_mesh(names, "thunderbolt", "169.254.0") + full_mesh(names, "ethernet", "192.168.1")
    links += full_mesh(names, "unknown", "100.100.0")  # Tailscale addresses on utun: VPN
    return build_state({"a": mem(32 * GB), "b": mem(64 * GB)}, [*links, *extra])


def test_the_ring_uses_thunderbolt_when_it_is_there():
    inst = placed(placement.place(_tb_eth_vpn_state(), command(), cards_of(make_card()), CONFIG))
    assert [(h.node_id, h.address, h.kind) for h in inst.ring] == [
        ("a", "169.254.0.1:52500", "thunderbolt"),
        ("b", "169.254.0.2:52501", "thunderbolt"),  # rank r listens on port + r
    ]


def test_cutting_thunderbolt_re_forms_the_ring_over_ethernet_and_vpn_only_as_a_last_resort():
    state = _tb_eth_vpn_state()
    lost = [ConnectionLost(connection=c) for c in state.topology.connections if c.kind == "thunderbolt"]
    state = apply_events(state, lost)
    inst = placed(placement.place(state, command(), cards_of(make_card()), CONFIG))
    assert {h.kind for h in inst.ring} == {"ethernet"}
    lost = [ConnectionLost(connection=c) for c in state.topology.connections if c.kind == "ethernet"]
    state = apply_events(state, lost)
    inst = placed(placement.place(state, command(), cards_of(make_card()), CONFIG))
    assert {h.kind for h in inst.ring} == {"vpn"}
    assert [h.address for h in inst.ring] == ["100.100.0.1:52500", "100.100.0.2:52501"]


def test_a_vpn_address_labelled_ethernet_still_ranks_below_wifi():
    names = ["a", "b"]
    links = full_mesh(names, "ethernet", "100.64.0") + full_mesh(names, "wifi", "192.168.7")
    state = build_state({"a": mem(32 * GB), "b": mem(64 * GB)}, links)
    inst = placed(placement.place(state, command(), cards_of(make_card()), CONFIG))
    assert {h.kind for h in inst.ring} == {"wifi"}


def test_ring_order_avoids_a_vpn_hop_when_another_order_has_none():
    names = ["a", "b", "c"]
    links = [
        link("a", "b", "10.0.0.2"), link("b", "c", "10.0.0.3"), link("c", "a", "100.64.0.1"),  # a->b->c->a: one VPN hop
        link("a", "c", "10.0.0.3"), link("c", "b", "10.0.0.2"), link("b", "a", "10.0.0.1"),  # a->c->b->a: all ethernet
    ]
    state = build_state({n: mem(16 * GB) for n in names}, links)
    inst = placed(placement.place(state, command(min_nodes=3), cards_of(make_card(weight_bytes=20 * GB)), CONFIG))
    assert rank_order(inst) == ["a", "c", "b"]
    assert {h.kind for h in inst.ring} == {"ethernet"}


# --- no double booking --------------------------------------------------------------------


def test_an_instance_whose_runner_has_not_loaded_reserves_its_memory():
    state = build_state({"a": mem(64 * GB)})
    card = make_card(weight_bytes=20 * GB)
    first = placed(placement.place(state, command(cid="c1"), cards_of(card), CONFIG))
    state = apply_events(state, [InstanceCreated(instance=first)])
    # Telemetry has not moved (nothing loaded): the second copy does not fit beside the first.
    refused = placement.place(state, command(cid="c2"), cards_of(card), CONFIG)
    assert isinstance(refused, placement.PlacementRefused) and refused.code == "insufficient_memory"
    assert "already placed there" in refused.message


def test_a_loaded_runner_is_counted_by_telemetry_not_twice():
    state = build_state({"a": mem(100 * GB)})
    card = make_card(weight_bytes=10 * GB)
    first = placed(placement.place(state, command(cid="c1"), cards_of(card), CONFIG))
    need = first.memory_by_node["a"]
    ((node, runner),) = first.shard_assignments.node_to_runner.items()
    state = apply_events(
        state,
        [
            InstanceCreated(instance=first),
            RunnerStatusUpdated(runner_id=runner, node_id=node, instance_id=first.instance_id, status=RunnerLoaded()),
            NodeGatheredInfo(node_id=node, memory=mem(100 * GB, 100 * GB - need)),
        ],
    )
    budget = node_budget(state, node)
    assert budget is not None
    assert budget.reserved_bytes == 0 and budget.committed_bytes == need
    assert budget.free_bytes == min(100 * GB - need, 75 * GB - need)
    # Stale telemetry (loaded, but available not dropped yet): the static bound still holds.
    stale = apply_events(state, [NodeGatheredInfo(node_id=node, memory=mem(100 * GB))])
    stale_budget = node_budget(stale, node)
    assert stale_budget is not None and stale_budget.free_bytes == 75 * GB - need


def test_sequential_placements_never_overcommit_a_node():
    state = build_state({"a": mem(64 * GB), "b": mem(32 * GB)}, full_mesh(["a", "b"]))
    card = make_card(weight_bytes=7 * GB)
    for i in range(20):
        out = placement.place(state, command(cid=f"c{i}"), cards_of(card), CONFIG)
        if isinstance(out, placement.PlacementRefused):
            break
        for node, need in out.instance.memory_by_node.items():
            budget = node_budget(state, node)
            assert budget is not None and need <= budget.free_bytes <= usable_bytes(state.node_memory[node])
        state = apply_events(state, [InstanceCreated(instance=out.instance)])
    else:
        pytest.fail("placement never ran out of memory")
    for node in ("a", "b"):
        budget = node_budget(state, NodeId(node))
        assert budget is not None and budget.committed_bytes <= budget.capacity_bytes


# --- re-placement and re-adoption ----------------------------------------------------------


def test_replace_bumps_the_generation_takes_a_fresh_port_and_may_avoid_a_node():
    names = ["a", "b", "c"]
    state = build_state({n: mem(40 * GB) for n in names}, full_mesh(names))
    old = placed(placement.place(state, command(), cards_of(make_card()), CONFIG))
    state = apply_events(state, [InstanceCreated(instance=old)])
    assert sorted(old.shard_assignments.node_to_runner) == ["a", "b"]
    new = placed(placement.replace(state, old, cards_of(make_card()), CONFIG, reason="group connect failed", avoid_nodes=["b"]))
    assert new.generation == 1
    assert new.instance_id == derive_id("inst", old.instance_id, 1)
    assert new.ephemeral_port == old.ephemeral_port + CONFIG.max_ring_ranks
    assert sorted(new.shard_assignments.node_to_runner) == ["a", "c"]
    # The old instance's memory was not counted against a: it is being given back.
    assert new.memory_by_node["a"] == old.memory_by_node["a"]


def test_replace_can_avoid_the_failed_link():
    names = ["a", "b"]
    links = full_mesh(names, "thunderbolt", "169.254.0") + full_mesh(names, "ethernet", "192.168.1")
    state = build_state({"a": mem(32 * GB), "b": mem(64 * GB)}, links)
    old = placed(placement.place(state, command(), cards_of(make_card()), CONFIG))
    assert old.ring[1].kind == "thunderbolt"
    bad = link("a", "b", "169.254.0.2", "thunderbolt")
    new = placed(placement.replace(state, old, cards_of(make_card()), CONFIG, reason="rank 1 unreachable", avoid_connections=[bad]))
    assert (new.ring[0].kind, new.ring[1].kind) == ("thunderbolt", "ethernet")
    assert new.ring[1].address.startswith("192.168.1.2:")


def test_replace_keeps_sharding_and_kind_and_reports_the_reason_when_refused():
    names = ["a", "b"]
    state = build_state({n: mem(40 * GB) for n in names}, full_mesh(names))
    old = placed(placement.place(state, command(sharding="Tensor"), cards_of(make_card()), CONFIG))
    new = placed(placement.replace(state, old, cards_of(make_card()), CONFIG, reason="x"))
    assert all(isinstance(s, TensorShardMetadata) for s in new.shard_assignments.runner_to_shard.values())
    refused = placement.replace(state, old, cards_of(make_card()), CONFIG, reason="rank 1 unreachable", avoid_nodes=["a", "b"])
    assert isinstance(refused, placement.PlacementRefused)
    assert "rank 1 unreachable" in refused.message


def test_fits_accepts_a_re_reported_instance_unless_its_node_was_given_away():
    state = build_state({"a": mem(64 * GB)})
    card = make_card(weight_bytes=20 * GB)
    inst = placed(placement.place(state, command(cid="c1"), cards_of(card), CONFIG))
    assert placement.fits(state, inst) is None
    # The new master placed another instance on a meanwhile.
    other = placed(placement.place(state, command(cid="c2"), cards_of(card), CONFIG))
    crowded = apply_events(state, [InstanceCreated(instance=other)])
    problem = placement.fits(crowded, inst)
    assert problem is not None and "node a would hold" in problem
    # Right after a failover the new master may not have a's telemetry yet: nothing
    # can have been placed there since, so the instance is re-adopted, not lost.
    assert placement.fits(build_state({"a": None}), inst) is None
    assert placement.fits(build_state({"z": mem(GB)}), inst) is None


# --- previews ----------------------------------------------------------------------------------


def test_previews_list_every_combination_with_memory_or_a_reason():
    names = ["a", "b", "c"]
    state = build_state({"a": mem(64 * GB), "b": mem(32 * GB), "c": mem(16 * GB)}, full_mesh(names))
    previews = placement.previews(state, ModelId("test/model"), (), cards_of(make_card()), CONFIG)
    combos = [(p.sharding, p.instance_meta, p.node_count) for p in previews]
    assert combos == [(s, m, k) for s in ("Pipeline", "Tensor") for m in ("MlxRing", "MlxJaccl") for k in (1, 2, 3)]
    by = {(p.sharding, p.instance_meta, p.node_count): p for p in previews}
    ok = by[("Pipeline", "MlxRing", 2)]
    assert ok.error is None and ok.instance is not None
    assert ok.memory_delta_by_node == ok.instance.memory_by_node and len(ok.memory_delta_by_node) == 2
    assert "node a needs ~" in (by[("Pipeline", "MlxRing", 1)].error or "")
    assert by[("Pipeline", "MlxJaccl", 2)].pending  # no thunderbolt observed (yet)
    assert "divide hidden size" in (by[("Tensor", "MlxRing", 3)].error or "")
    assert sum(p.error is None for p in previews) == 2  # pipeline ring over 2 and over 3 nodes
    again = placement.previews(state, ModelId("test/model"), (), cards_of(make_card()), CONFIG)
    assert again == previews


def test_previews_of_an_unknown_model_and_with_exclusions():
    state = build_state({"a": mem(64 * GB), "b": mem(64 * GB)}, full_mesh(["a", "b"]))
    unknown = placement.previews(state, ModelId("x/y"), (), cards_of(make_card()), CONFIG)
    assert len(unknown) == 4 and all(p.instance is None and "not found" in (p.error or "") for p in unknown)
    only_b = placement.previews(state, ModelId("test/model"), (NodeId("a"),), cards_of(make_card(weight_bytes=GB)), CONFIG)
    assert {p.node_count for p in only_b} == {1}
    assert all(p.instance is None or list(p.instance.shard_assignments.node_to_runner) == ["b"] for p in only_b)


def test_removing_an_instance_gives_its_memory_back():
    state = build_state({"a": mem(64 * GB)})
    card = make_card(weight_bytes=20 * GB)
    inst = placed(placement.place(state, command(cid="c1"), cards_of(card), CONFIG))
    state = apply_events(state, [InstanceCreated(instance=inst)])
    assert isinstance(placement.place(state, command(cid="c2"), cards_of(card), CONFIG), placement.PlacementRefused)
    state = apply_events(state, [InstanceDeleted(instance_id=inst.instance_id)])
    assert isinstance(placement.place(state, command(cid="c2"), cards_of(card), CONFIG), placement.Placed)


def test_layer_split_is_exact_and_keeps_one_layer_per_node():
    assert placement.layer_split(3, {NodeId("a"): 1000, NodeId("b"): 1, NodeId("c"): 0}) == {"a": 1, "b": 1, "c": 1}
    assert placement.layer_split(10, {NodeId("a"): 0, NodeId("b"): 0}) == {"a": 5, "b": 5}
    split = placement.layer_split(7, {NodeId("a"): 1, NodeId("b"): 1})
    assert split == {"a": 4, "b": 3}  # equal remainders and weights: smaller id first
    with pytest.raises(AssertionError):
        placement.layer_split(2, {NodeId("a"): 1, NodeId("b"): 1, NodeId("c"): 1})


def test_placed_and_refused_are_wire_records():
    from skulk.core.codec import decode_json, encode_json

    state = build_state({"a": mem(64 * GB)})
    out = placement.place(state, command(), cards_of(make_card(weight_bytes=GB)), CONFIG)
    assert decode_json(placement.Placed, encode_json(out)) == out
    refused = placement.place(state, command("x/y"), cards_of(make_card()), CONFIG)
    assert decode_json(placement.PlacementRefused, encode_json(refused)) == refused
    assert msgspec.structs.asdict(refused)["pending"] is False


# --- the worked example in docs/placement.md ------------------------------------------------


def test_the_worked_example_in_the_docs_is_what_placement_computes():
    from pathlib import Path

    from skulk.core import memory
    from skulk.modelcards import builtin_cards

    docs = " ".join((Path(__file__).resolve().parents[2] / "docs" / "placement.md").read_text().split())
    cards = builtin_cards()
    names = ["A", "B", "C"]
    links = [link("A", "B", "169.254.20.2", "thunderbolt"), link("B", "A", "169.254.20.1", "thunderbolt")]
    links += full_mesh(names, "ethernet", "192.168.1")
    links += [link("A", "C", "100.101.7.3", "unknown"), link("C", "A", "100.101.7.1", "unknown")]
    state = build_state({"A": mem(64 * GB, 58 * GB), "B": mem(32 * GB, 28 * GB), "C": mem(16 * GB, 13 * GB)}, links)
    llama = ModelId("mlx-community/Llama-3.3-70B-Instruct-4bit")
    inst = placed(placement.place(state, command(llama), cards, CONFIG))
    assert layers_by_node(inst) == {"A": 53, "B": 27}
    assert [(h.node_id, h.address, h.kind) for h in inst.ring] == [
        ("A", "169.254.20.1:52500", "thunderbolt"),
        ("B", "169.254.20.2:52501", "thunderbolt"),
    ]
    assert inst.context_ceiling == 57_131 and "**57,131** tokens" in docs
    sa = inst.shard_assignments
    for node in ("A", "B"):
        fp = memory.shard_footprint(cards[llama], shard_share(sa.runner_to_shard[sa.node_to_runner[NodeId(node)]]))
        assert f"{node} needs {memory.describe_footprint(fp)}" in docs or f"{node} {memory.describe_footprint(fp)}" in docs
    refused = placement.place(state, command("mlx-community/Qwen3-235B-A22B-4bit"), cards, CONFIG)
    assert isinstance(refused, placement.PlacementRefused)
    assert refused.message in docs
    # Pull the Thunderbolt cable: the same placement re-forms over Ethernet.
    cut = apply_events(state, [ConnectionLost(connection=c) for c in state.topology.connections if c.kind == "thunderbolt"])
    over_eth = placed(placement.place(cut, command(llama), cards, CONFIG))
    assert {h.kind for h in over_eth.ring} == {"ethernet"}


def test_speculation_follows_the_card_mtp_first_then_a_draft_model_and_respects_multi_node_opt_out():
    from skulk.core.instances import SpeculationConfig

    plain = make_card()
    assert placement.speculation_for(plain, 1) == SpeculationConfig()
    mtp = msgspec.structs.replace(plain, mtp_max_depth=2, draft_model="x/draft")
    assert placement.speculation_for(mtp, 1) == SpeculationConfig(drafter="mtp", depth=2)
    draft = msgspec.structs.replace(plain, draft_model="x/draft")
    assert placement.speculation_for(draft, 2) == SpeculationConfig(
        drafter="draft_model", depth=placement.DRAFT_MODEL_DEFAULT_DEPTH, draft_model_id="x/draft"
    )
    single_only = msgspec.structs.replace(mtp, speculative_multi_node=False)
    assert placement.speculation_for(single_only, 1).drafter == "mtp"
    assert placement.speculation_for(single_only, 2) == SpeculationConfig()
    small_mtp = msgspec.structs.replace(mtp, weight_bytes=GB)
    inst = placed(placement.place(build_state({"a": mem(64 * GB)}, []), command(), cards_of(small_mtp), CONFIG))
    assert inst.speculation == SpeculationConfig(drafter="mtp", depth=2)
