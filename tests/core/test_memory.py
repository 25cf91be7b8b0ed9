"""The one memory model: usable memory, footprints, reservations and refusal wording."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skulk.core import memory, placement
from skulk.core.events import InstanceCreated, RunnerStatusUpdated
from skulk.core.ids import NodeId
from skulk.core.instances import (
    PipelineShardMetadata,
    RunnerConnecting,
    RunnerFailed,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    TensorShardMetadata,
)
from tests.core.builders import CONFIG, GB, apply_events, build_state, cards_of, command, make_card, mem, placed

MIB = 1024 * 1024


def test_usable_memory_is_the_smaller_of_available_and_three_quarters_of_ram():
    assert memory.usable_bytes(mem(16 * GB, 14 * GB)) == 12 * GB
    assert memory.usable_bytes(mem(16 * GB, 5 * GB)) == 5 * GB
    assert memory.static_capacity_bytes(mem(16 * GB, 0)) == 12 * GB
    assert memory.usable_bytes(mem(3, 3)) == 2  # rounded down, never up


def test_kv_bytes_per_token_matches_the_reference_example():
    card = make_card(n_layers=24, num_kv_heads=8, head_dim=128)
    assert memory.kv_bytes_per_token(card) == 98_304
    assert memory.kv_bytes_per_token(make_card(kv_bytes_per_token=70_272)) == 70_272


def test_a_footprint_is_weights_times_1_3_plus_kv_at_8192_tokens_plus_256_mib():
    card = make_card(weight_bytes=10 * GB, n_layers=24, num_kv_heads=8, head_dim=128)
    fp = memory.shard_footprint(card, Fraction(1, 2))
    assert fp.weights_bytes == 5 * GB
    assert fp.overhead_bytes == 1_500_000_000
    assert fp.kv_bytes == 98_304 * 8_192 // 2
    assert fp.floor_bytes == 256 * MIB
    assert fp.total_bytes == 6_500_000_000 + 98_304 * 4_096 + 256 * MIB
    assert fp.headroom_bytes == 1_500_000_000 + 256 * MIB
    assert memory.shard_footprint_bytes(card, 0.5) == fp.total_bytes


def test_footprint_arithmetic_is_exact_and_rounds_up_once():
    card = make_card(weight_bytes=10, n_layers=3, num_kv_heads=1, head_dim=1)
    fp = memory.shard_footprint(card, Fraction(1, 3), kv_tokens=1)
    assert fp.weights_bytes == 4  # ceil(10/3)
    assert fp.weights_bytes + fp.overhead_bytes == 5  # ceil(13/3), not ceil(10/3) * 1.3
    assert fp.kv_bytes == 4  # ceil(2 * 3 * 1 * 1 * 2 / 3)
    assert memory.as_share(0.1) == Fraction(0.1)  # floats convert exactly, no re-rounding
    with pytest.raises(AssertionError):
        memory.as_share(0)
    with pytest.raises(AssertionError):
        memory.as_share(Fraction(3, 2))


def test_shard_share_of_pipeline_and_tensor_shards():
    pipe = PipelineShardMetadata(model_id="m", device_rank=1, world_size=3, start_layer=10, end_layer=17, n_layers=32)
    assert memory.shard_share(pipe) == Fraction(7, 32)
    tensor = TensorShardMetadata(model_id="m", device_rank=0, world_size=4, n_layers=32)
    assert memory.shard_share(tensor) == Fraction(1, 4)


def test_the_shortfall_sentence_reads_like_the_issue():
    card = make_card(weight_bytes=11_200_000_000, n_layers=24, num_kv_heads=8, head_dim=128)
    fp = memory.shard_footprint(card, 1)
    text = memory.describe_shortfall("B", fp, 12 * GB)
    assert text == "node B needs ~15.6 GB (11.2 GB weights + 0.8 GB KV at 8192 tokens + headroom) but can use 12.0 GB"
    assert memory.describe_shortfall("B", fp, -5).endswith("but can use 0.0 GB")
    assert memory.format_gb(15_630_000_000) == "15.6 GB"


# --- reservations ----------------------------------------------------------------------


def _one_instance(status=None):
    state = build_state({"a": mem(64 * GB)})
    inst = placed(placement.place(state, command(), cards_of(make_card(weight_bytes=10 * GB, n_layers=10)), CONFIG))
    state = apply_events(state, [InstanceCreated(instance=inst)])
    if status is not None:
        ((node, runner),) = inst.shard_assignments.node_to_runner.items()
        state = apply_events(state, [RunnerStatusUpdated(runner_id=runner, node_id=node, instance_id=inst.instance_id, status=status)])
    return state, inst


@pytest.mark.parametrize(
    ("status", "reserved_fraction"),
    [
        (None, Fraction(1)),
        (RunnerConnecting(), Fraction(1)),
        (RunnerFailed(error_message="crashed"), Fraction(1)),  # the breaker may restart it
        (RunnerLoading(layers_loaded=4, layers_total=10), Fraction(6, 10)),
        (RunnerLoading(layers_loaded=0, layers_total=10), Fraction(1)),
        (RunnerReady(), Fraction(0)),
        (RunnerRunning(active_tasks=2), Fraction(0)),
    ],
)
def test_instances_not_yet_loaded_reserve_what_telemetry_does_not_show(status, reserved_fraction):
    state, inst = _one_instance(status)
    need = inst.memory_by_node["a"]
    budget = memory.node_budget(state, NodeId("a"))
    assert budget is not None
    assert budget.committed_bytes == need
    assert budget.reserved_bytes == -(-need * reserved_fraction.numerator // reserved_fraction.denominator)
    assert budget.free_bytes == min(48 * GB - budget.reserved_bytes, 48 * GB - need)
    assert memory.reserved_bytes(state, NodeId("a")) == budget.reserved_bytes
    # An instance being re-placed gives its memory back.
    freed = memory.node_budget(state, NodeId("a"), ignore=[inst.instance_id])
    assert freed is not None and (freed.committed_bytes, freed.free_bytes) == (0, 48 * GB)


def test_a_node_without_memory_telemetry_has_no_budget():
    assert memory.node_budget(build_state({"a": None}), NodeId("a")) is None


@settings(max_examples=200, deadline=None)
@given(
    weight=st.integers(1, 500 * GB),
    layers=st.integers(1, 128),
    kv_heads=st.sampled_from((1, 2, 4, 8, 16, 64)),
    head_dim=st.sampled_from((64, 128, 256)),
    num=st.integers(1, 128),
)
def test_footprints_of_a_split_add_up_to_at_least_the_whole_model(weight, layers, kv_heads, head_dim, num):
    card = make_card(weight_bytes=weight, n_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim)
    num = min(num, layers)
    whole = memory.shard_footprint(card, 1)
    part = memory.shard_footprint(card, Fraction(num, layers))
    rest = memory.shard_footprint(card, Fraction(layers - num, layers)) if num < layers else None
    assert part.total_bytes <= whole.total_bytes
    if rest is not None:
        # Two shards need what one does plus a second floor: rounding up (two terms per
        # shard) adds under 4 bytes, and never takes any away.
        assert part.total_bytes + rest.total_bytes >= whole.total_bytes + memory.RUNNER_FLOOR_BYTES
        assert part.total_bytes + rest.total_bytes <= whole.total_bytes + memory.RUNNER_FLOOR_BYTES + 3
