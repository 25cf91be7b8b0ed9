"""Model cards the simulator places: realistic sizes, no weights anywhere.

The figures follow popular 4-bit MLX conversions so the memory arithmetic the
core does (placement, context ceilings) meets the same numbers it meets in
production: a small model fits on any node, a large one needs several nodes
on small machines and one on a big one.
"""

from __future__ import annotations

from skulk.core.cards import ModelCard
from skulk.core.ids import ModelId

__all__ = ["SIM_CARDS", "sim_cards"]

_GB = 10**9

SIM_CARDS: tuple[ModelCard, ...] = (
    ModelCard(
        model_id=ModelId("sim/qwen-1.5b"),
        family="qwen2",
        weight_bytes=int(0.9 * _GB),
        n_layers=28,
        hidden_size=1536,
        num_kv_heads=2,
        head_dim=128,
        context_length=32_768,
        supports_tensor=True,
    ),
    ModelCard(
        model_id=ModelId("sim/qwen-7b"),
        family="qwen2",
        weight_bytes=int(4.3 * _GB),
        n_layers=28,
        hidden_size=3584,
        num_kv_heads=4,
        head_dim=128,
        context_length=32_768,
        supports_tensor=True,
    ),
    ModelCard(
        model_id=ModelId("sim/llama-70b"),
        family="llama",
        weight_bytes=int(39.7 * _GB),
        n_layers=80,
        hidden_size=8192,
        num_kv_heads=8,
        head_dim=128,
        context_length=131_072,
        supports_tensor=True,
    ),
)


def sim_cards() -> dict[str, ModelCard]:
    """The simulator's cards by model id (a fresh dict each call)."""
    return {card.model_id: card for card in SIM_CARDS}
