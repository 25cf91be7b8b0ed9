"""Context ceiling: how many tokens an instance may hold, the same on every rank.

Theory of operation
-------------------
Per hosting node, the KV tokens that fit beside the node's weight share are::

    floor((0.75 x total RAM - weight share x 1.30 - 256 MiB) / (KV bytes per token x share))

and the instance's ceiling is the smallest of those, capped by the card's
advertised context length. Only *static* inputs enter (total RAM, the card,
the shares), never available memory, so every rank and every master computes
the same number; placement stamps it on the instance and every runner enforces
exactly that (invariant 7).

Consistency with placement: a shard whose footprint (KV at 8,192 tokens) fits
under 0.75 x total RAM always gets a per-node capacity of at least 8,192
tokens, because both use the same exact arithmetic (``skulk.core.memory``).
A capacity at or below zero means the weights alone do not fit: placement
refuses, it never stamps a ceiling of 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction

from skulk.core.cards import ModelCard
from skulk.core.ids import NodeId
from skulk.core.memory import (
    RUNNER_FLOOR_BYTES,
    USABLE_FRACTION_OF_TOTAL,
    WEIGHT_OVERHEAD_FACTOR,
    Share,
    as_share,
    format_gb,
    kv_bytes_per_token,
)

__all__ = ["node_token_capacity", "context_ceiling", "explain_node_capacity"]


def node_token_capacity(card: ModelCard, share: Share, ram_total_bytes: int) -> int:
    """KV tokens that fit on a node of ``ram_total_bytes`` holding ``share`` of ``card``.

    May be zero or negative: then the weight share alone overflows 75 % of
    the node's RAM. Not capped by the card's context length.
    """
    frac = as_share(share)
    assert ram_total_bytes >= 0, ram_total_bytes
    capacity = math.floor(ram_total_bytes * USABLE_FRACTION_OF_TOTAL)
    weights = math.ceil(card.weight_bytes * frac * WEIGHT_OVERHEAD_FACTOR)
    room = capacity - weights - RUNNER_FLOOR_BYTES
    per_token = kv_bytes_per_token(card) * frac
    assert per_token > 0
    return math.floor(Fraction(room) / per_token)


def context_ceiling(card: ModelCard, shares: Mapping[NodeId, Share], ram_total: Mapping[NodeId, int]) -> int:
    """The instance's context ceiling, or 0 when some node cannot hold its share at all.

    Inputs: the card, each hosting node's share (pipeline: its layers over all
    layers; tensor: 1 / world size) and each hosting node's total RAM in
    bytes. Output: ``min(card.context_length, min over nodes of
    node_token_capacity)``, clipped at 0. Independent of mapping order.
    """
    assert shares, "an instance has at least one hosting node"
    missing = sorted(set(shares) - set(ram_total))
    assert not missing, f"no total RAM for hosting nodes {missing}"
    ceiling = card.context_length
    for node in sorted(shares):
        ceiling = min(ceiling, node_token_capacity(card, shares[node], ram_total[node]))
    return max(0, ceiling)


def explain_node_capacity(card: ModelCard, share: Share, ram_total_bytes: int) -> str:
    """The ceiling arithmetic for one node, for refusals and docs."""
    frac = as_share(share)
    capacity = math.floor(ram_total_bytes * USABLE_FRACTION_OF_TOTAL)
    weights = math.ceil(card.weight_bytes * frac)
    per_token = kv_bytes_per_token(card) * frac
    tokens = node_token_capacity(card, frac, ram_total_bytes)
    return (
        f"({format_gb(capacity)} (75% of {format_gb(ram_total_bytes)} RAM) - {format_gb(weights)} weights x 1.30 "
        f"- 256 MiB) / {float(per_token):,.0f} KV bytes per token = {tokens:,} tokens"
    )
