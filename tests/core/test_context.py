"""Context ceiling: static inputs only, the minimum over hosting nodes, consistent with placement."""

from __future__ import annotations

import math
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from skulk.core import memory
from skulk.core.context import context_ceiling, explain_node_capacity, node_token_capacity
from skulk.core.ids import NodeId
from tests.core.builders import GB, make_card

MIB = 1024 * 1024


def test_the_per_node_formula():
    # 24 layers x 8 KV heads x 128 dims: 98,304 KV bytes per token; 16 GB node, half the model.
    card = make_card(weight_bytes=10 * GB, n_layers=24, num_kv_heads=8, head_dim=128)
    room = 12 * GB - 6_500_000_000 - 256 * MIB
    assert node_token_capacity(card, Fraction(1, 2), 16 * GB) == math.floor(room / (98_304 / 2))
    assert node_token_capacity(card, Fraction(1, 2), 16 * GB) == 106_436


def test_the_instance_ceiling_is_the_smallest_node_capped_by_the_card():
    card = make_card(weight_bytes=10 * GB, n_layers=24, num_kv_heads=8, head_dim=128, context_length=131_072)
    shares = {NodeId("a"): Fraction(1, 2), NodeId("b"): Fraction(1, 2)}
    small = context_ceiling(card, shares, {NodeId("a"): 16 * GB, NodeId("b"): 64 * GB})
    assert small == node_token_capacity(card, Fraction(1, 2), 16 * GB) == 106_436
    assert context_ceiling(card, shares, {NodeId("a"): 64 * GB, NodeId("b"): 64 * GB}) == 131_072


def test_no_room_for_the_weights_gives_zero_never_a_negative_ceiling():
    card = make_card(weight_bytes=20 * GB)
    assert node_token_capacity(card, 1, 16 * GB) < 0
    assert context_ceiling(card, {NodeId("a"): Fraction(1)}, {NodeId("a"): 16 * GB}) == 0


def test_only_static_inputs_matter_and_mapping_order_does_not():
    card = make_card()
    shares = {NodeId("b"): Fraction(30, 80), NodeId("a"): Fraction(50, 80)}
    totals = {NodeId("a"): 128 * GB, NodeId("b"): 48 * GB}
    reordered = context_ceiling(card, dict(reversed(list(shares.items()))), dict(reversed(list(totals.items()))))
    assert context_ceiling(card, shares, totals) == reordered


def test_explanation_shows_the_arithmetic():
    card = make_card(weight_bytes=10 * GB, n_layers=24, num_kv_heads=8, head_dim=128)
    text = explain_node_capacity(card, Fraction(1, 2), 16 * GB)
    assert "12.0 GB (75% of 16.0 GB RAM)" in text and "5.0 GB weights x 1.30" in text
    assert text.endswith("/ 49,152 KV bytes per token = 106,436 tokens")


@settings(max_examples=300, deadline=None)
@given(
    weight=st.integers(1, 400 * GB),
    layers=st.integers(1, 128),
    kv_heads=st.sampled_from((1, 2, 4, 8, 16, 128)),
    head_dim=st.sampled_from((32, 64, 128, 256)),
    num=st.integers(1, 128),
    total=st.integers(1, 512 * GB),
    context=st.integers(1, 1_000_000),
)
def test_a_shard_that_fits_always_has_room_for_the_reference_context(weight, layers, kv_heads, head_dim, num, total, context):
    card = make_card(
        weight_bytes=weight, n_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, context_length=context
    )
    share = Fraction(min(num, layers), layers)
    fits = memory.shard_footprint(card, share).total_bytes <= math.floor(total * memory.USABLE_FRACTION_OF_TOTAL)
    capacity = node_token_capacity(card, share, total)
    assert fits == (capacity >= memory.REFERENCE_CONTEXT_TOKENS)
    ceiling = context_ceiling(card, {NodeId("n"): share}, {NodeId("n"): total})
    assert ceiling == max(0, min(context, capacity))
