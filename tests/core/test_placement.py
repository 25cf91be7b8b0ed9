"""Placement: smallest fitting ring, proportional splits, refusals with arithmetic, previews.

States come from ``tests.core.builders`` (always through the real ``apply``).
The Hypothesis properties at the end check the same rules over generated
clusters.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from skulk.core import interconnect, placement
from skulk.core.cards import ModelCard
from skulk.core.commands import PlaceInstance
from skulk.core.context import context_ceiling
from skulk.core.events import (
    ConnectionLost,
    ConnectionObserved,
    InstanceCreated,
    InstanceDeleted,
    NodeGatheredInfo,
    RunnerStatusUpdated,
)
from skulk.core.ids import CommandId, ModelId, NodeId, derive_id
from skulk.core.instances import (
    MlxJacclInstance,
    MlxRingInstance,
    PipelineShardMetadata,
    RunnerLoaded,
    TensorShardMetadata,
)
from skulk.core.memory import node_budget, shard_footprint, shard_share, usable_bytes
from skulk.core.state import State
from skulk.core.topology import Connection
from tests.core.builders import (
    CONFIG,
    GB,
    apply_events,
    build_state,
    cards_of,
    command,
    full_mesh,
    layers_by_node,
    link,
    make_card,
    mem,
    placed,
    rank_order,
)


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


def test_the_worked_example_in_the_docs_is_what_placement_computes():
    from pathlib import Path

    from skulk.cards import builtin_cards
    from skulk.core import memory

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


# --- placement knows the files (issue 14) ------------------------------------------------------


def _disk(state: State, node: str, free: int) -> State:
    from skulk.core.files import DiskInfo

    info = DiskInfo(total_bytes=free * 4, free_bytes=free, models_bytes=0)
    return apply_events(state, [NodeGatheredInfo(node_id=NodeId(node), disk=info)])


def test_a_node_that_already_holds_the_files_wins_over_one_with_more_free_memory():
    from tests.core.builders import files_on

    card = make_card(weight_bytes=10 * GB)
    state = build_state({"a": mem(32 * GB), "b": mem(64 * GB)}, ())
    # Without files anywhere, more free memory wins (b); with the files on a, a wins.
    assert list(placed(placement.place(state, command(), cards_of(card), CONFIG)).shard_assignments.node_to_runner) == ["b"]
    state = files_on(state, card, ["a"])
    outcome = placement.place(state, command(), cards_of(card), CONFIG)
    assert list(placed(outcome).shard_assignments.node_to_runner) == ["a"]
    assert isinstance(outcome, placement.Placed) and outcome.transfer_bytes_by_node == {}


def test_a_node_short_of_disk_for_the_files_is_refused_with_the_arithmetic():
    card = make_card(weight_bytes=10 * GB)
    state = build_state({"a": mem(64 * GB)}, ())
    state = _disk(state, "a", 3 * GB)
    refused = placement.place(state, command(), cards_of(card), CONFIG)
    assert isinstance(refused, placement.PlacementRefused) and not refused.pending
    assert refused.code == "insufficient_disk"
    assert "node a needs 10.0 GB of disk for the files of test/model, has 3.0 GB free" in refused.message
    # Enough disk, or the files already there, and it places.
    assert isinstance(placement.place(_disk(state, "a", 20 * GB), command(), cards_of(card), CONFIG), placement.Placed)


def test_disk_is_counted_per_node_so_a_split_needs_room_only_for_each_stage():
    card = make_card(weight_bytes=40 * GB)  # fits only across a and b
    state = build_state({"a": mem(64 * GB), "b": mem(32 * GB)}, full_mesh(["a", "b"]))
    state = _disk(_disk(state, "a", 32 * GB), "b", 20 * GB)
    inst = placed(placement.place(state, command(), cards_of(card), CONFIG))
    assert sorted(inst.shard_assignments.node_to_runner) == ["a", "b"]


def test_previews_show_the_bytes_each_node_would_fetch():
    from tests.core.builders import files_on

    card = make_card(weight_bytes=10 * GB)
    state = files_on(build_state({"a": mem(64 * GB), "b": mem(64 * GB)}, full_mesh(["a", "b"])), card, ["a"])
    rows = placement.previews(state, ModelId("test/model"), (), cards_of(card), CONFIG)
    one = next(p for p in rows if p.sharding == "Pipeline" and p.instance_meta == "MlxRing" and p.node_count == 1)
    assert one.instance is not None and list(one.instance.shard_assignments.node_to_runner) == ["a"]
    assert one.transfer_bytes_by_node == {}
    two = next(p for p in rows if p.sharding == "Pipeline" and p.instance_meta == "MlxRing" and p.node_count == 2)
    assert set(two.transfer_bytes_by_node) == {"b"} and 0 < two.transfer_bytes_by_node["b"] < card.weight_bytes
