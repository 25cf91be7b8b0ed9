"""Model cards (``skulk.core.cards``): TOML layout, validation, derivation from mlx-lm configs, the wire.
"""

from __future__ import annotations

import importlib

import msgspec
import pytest

from skulk.core.cards import (
    TENSOR_SHARDING_FAMILIES,
    CardError,
    ModelCard,
    card_from_mlx_config,
    card_from_toml,
    card_to_toml,
)
from skulk.core.memory import kv_bytes_per_token
from tests.core.builders import GENERATOR_CARD, LLAMA_31_8B_CONFIG


def test_the_generator_layout_parses_and_empty_draft_means_none():
    card = card_from_toml(GENERATOR_CARD)
    assert card == ModelCard(
        model_id="skulk/tiny-qwen2",
        family="qwen2",
        weight_bytes=4608145,
        n_layers=6,
        hidden_size=128,
        num_kv_heads=2,
        head_dim=32,
        context_length=8192,
        supports_tensor=True,
    )
    assert card.draft_model is None and card.mtp_max_depth == 0 and card.speculative_multi_node


def test_cards_round_trip_through_toml_with_every_optional_field():
    card = ModelCard(
        model_id="org/big-4bit",
        family="deepseek_v3",
        weight_bytes=377_606_822_912,
        n_layers=61,
        hidden_size=7168,
        num_kv_heads=128,
        head_dim=128,
        context_length=163_840,
        supports_tensor=True,
        mtp_max_depth=2,
        speculative_multi_node=False,
        draft_model="org/small-4bit",
        kv_bytes_per_token=70_272,
        pipeline_refusal="a reason",
        prompt_lookup_depth=5,
    )
    text = card_to_toml(card, comment="line one\nline two")
    assert text.startswith("# line one\n# line two\n")
    assert card_from_toml(text) == card
    assert 'draft_model = "org/small-4bit"' in text and "kv_bytes_per_token = 70272" in text
    assert 'pipeline_refusal = "a reason"' in text and "prompt_lookup_depth = 5" in text


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("n_layers = 6", "n_layerz = 6"), "unknown keys ['n_layerz']"),
        (lambda t: t.replace("mtp_max_depth = 0", "mtp_depth = 0"), "unknown keys ['runtime.mtp_depth']"),
        (lambda t: t.replace("n_layers = 6\n", ""), "missing required keys ['n_layers']"),
        (lambda t: t.replace("n_layers = 6", "n_layers = true"), "n_layers must be int, got bool"),
        (lambda t: t.replace("n_layers = 6", 'n_layers = "6"'), "n_layers must be int, got str"),
        (lambda t: t.replace("supports_tensor = true", "supports_tensor = 1"), "supports_tensor must be bool"),
        (lambda t: t.replace("weight_bytes = 4608145", "weight_bytes = 0"), "weight_bytes must be a positive integer"),
        (lambda t: t.replace("mtp_max_depth = 0", "mtp_max_depth = -1"), "mtp_max_depth must be a non-negative"),
        (lambda t: t.replace('draft_model = ""', 'draft_model = "skulk/tiny-qwen2"'), "draft_model must name another model"),
        (lambda t: t.replace('model_id = "skulk/tiny-qwen2"', 'model_id = ""'), "model_id must be a non-empty"),
        (lambda t: t + "[runtime]\n", "invalid TOML"),
        (lambda t: t.replace("[runtime]\n", "runtime = 3\n").split("mtp")[0], "runtime must be a table"),
    ],
)
def test_malformed_cards_are_refused_naming_the_source_and_key(edit, expected):
    with pytest.raises(CardError) as info:
        card_from_toml(edit(GENERATOR_CARD), source="cards/x.toml")
    assert str(info.value).startswith("cards/x.toml: ")
    assert expected in str(info.value)


def test_a_card_derives_from_a_real_llama_config():
    card = card_from_mlx_config("mlx-community/Meta-Llama-3.1-8B-Instruct-4bit", LLAMA_31_8B_CONFIG, 4_517_404_672)
    assert (card.n_layers, card.hidden_size, card.num_kv_heads, card.head_dim) == (32, 4096, 8, 128)
    assert (card.context_length, card.family, card.supports_tensor) == (131_072, "llama", True)
    assert kv_bytes_per_token(card) == 2 * 32 * 8 * 128 * 2


def test_multimodal_configs_take_the_text_model_figures():
    config = {
        "model_type": "gemma3",
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 5376,
            "num_hidden_layers": 62,
            "num_attention_heads": 32,
            "num_key_value_heads": 16,
            "head_dim": 128,
            "max_position_embeddings": 131072,
        },
        "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27},
    }
    card = card_from_mlx_config("g/27b", config, 15 * 10**9)
    assert (card.family, card.n_layers, card.hidden_size, card.num_kv_heads, card.head_dim) == ("gemma3", 62, 5376, 16, 128)
    assert card.supports_tensor is False


def test_latent_attention_caches_the_latent_and_mtp_depth_is_read():
    config = {
        "model_type": "deepseek_v3",
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "max_position_embeddings": 163840,
        "num_nextn_predict_layers": 1,
    }
    card = card_from_mlx_config("d/v3", config, 10**12)
    assert card.kv_bytes_per_token == 61 * (512 + 64) * 2 == kv_bytes_per_token(card)
    assert (card.head_dim, card.mtp_max_depth, card.supports_tensor) == (128, 1, True)


def test_a_config_without_a_context_length_is_an_error_not_a_guess():
    config = dict(LLAMA_31_8B_CONFIG)
    del config["max_position_embeddings"]
    with pytest.raises(CardError, match="no context length"):
        card_from_mlx_config("x/y", config, 1)
    with pytest.raises(CardError, match="no model_type"):
        card_from_mlx_config("x/y", {k: v for k, v in LLAMA_31_8B_CONFIG.items() if k != "model_type"}, 1)


def test_tensor_families_really_shard_in_the_installed_mlx_lm():
    # Guards the constant against mlx-lm drift: every named architecture (after
    # mlx-lm's own aliasing) defines Model.shard.
    utils = importlib.import_module("mlx_lm.utils")
    for family in sorted(TENSOR_SHARDING_FAMILIES):
        arch = utils.MODEL_REMAPPING.get(family, family)
        module = importlib.import_module(f"mlx_lm.models.{arch}")
        assert hasattr(module.Model, "shard"), f"{family} ({arch}) has no tensor sharding in mlx-lm"


def test_cards_travel_on_the_wire():
    from skulk.core.codec import decode_json, encode_json

    card = card_from_toml(GENERATOR_CARD)
    assert decode_json(ModelCard, encode_json(card)) == card
    assert msgspec.json.decode(encode_json(card))["weightBytes"] == 4608145


def test_derived_cards_say_when_a_model_cannot_be_split_into_pipeline_stages():
    base = {"num_hidden_layers": 30, "hidden_size": 512, "num_attention_heads": 8, "max_position_embeddings": 4096}
    assert card_from_mlx_config("a/llama", {**base, "model_type": "llama"}, 10).pipeline_refusal == ""
    e4b = {"model_type": "gemma4", "text_config": {**base, "model_type": "gemma4_text", "num_kv_shared_layers": 18}}
    card = card_from_mlx_config("google/gemma-4-e4b", e4b, 10)
    assert "18 layers reuse earlier layers' keys and values" in card.pipeline_refusal
    assert card_from_toml(card_to_toml(card)) == card
    per_layer = {"model_type": "gemma4", "text_config": {**base, "hidden_size_per_layer_input": 256}}
    assert "per-layer input embeddings" in card_from_mlx_config("g/x", per_layer, 10).pipeline_refusal
    odd = card_from_mlx_config("x/mamba", {**base, "model_type": "mamba2"}, 10)
    assert odd.pipeline_refusal == "Skulk has no verified pipeline stage for the mamba2 architecture"
