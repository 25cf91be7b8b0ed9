"""Model cards: TOML layout, validation, derivation from mlx-lm configs, built-ins and loading."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import msgspec
import pytest

from skulk import modelcards
from skulk.core.cards import (
    TENSOR_SHARDING_FAMILIES,
    CardError,
    ModelCard,
    card_from_mlx_config,
    card_from_toml,
    card_to_toml,
)
from skulk.core.memory import kv_bytes_per_token

# Exactly what Skulk's model generator writes (skulk.engine.models.write_model_card).
GENERATOR_CARD = """\
model_id = "skulk/tiny-qwen2"
family = "qwen2"
weight_bytes = 4608145
n_layers = 6
hidden_size = 128
num_kv_heads = 2
head_dim = 32
context_length = 8192
supports_tensor = true

[runtime]
mtp_max_depth = 0
speculative_multi_node = true
draft_model = ""
"""

LLAMA_31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "quantization": {"group_size": 64, "bits": 4},
}


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
    )
    text = card_to_toml(card, comment="line one\nline two")
    assert text.startswith("# line one\n# line two\n")
    assert card_from_toml(text) == card
    assert 'draft_model = "org/small-4bit"' in text and "kv_bytes_per_token = 70272" in text


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


# --- built-in cards -----------------------------------------------------------------


def test_builtin_cards_are_consistent():
    cards = modelcards.builtin_cards()
    assert len(cards) >= 14
    assert {"skulk/tiny-qwen2", "skulk/small-qwen2-10m"} <= set(cards)
    for model_id, card in cards.items():
        assert model_id == card.model_id
        assert card.supports_tensor == (card.family in TENSOR_SHARDING_FAMILIES), model_id
        if card.draft_model is not None:
            assert card.draft_model in cards, f"{model_id}: draft {card.draft_model} has no card"
            assert cards[card.draft_model].weight_bytes < card.weight_bytes / 4
        if model_id.startswith("mlx-community/"):
            assert any(q in model_id for q in ("4bit", "8bit", "MXFP4")), f"{model_id}: quantisation not in the id"
    root = Path(modelcards.__file__).parent / "cards"
    names = sorted(p.name for p in root.glob("*.toml"))
    assert names == sorted(m.replace("/", "--") + ".toml" for m in cards)


def test_builtin_cards_match_the_generated_presets(tmp_path):
    models = pytest.importorskip("skulk.engine.models")
    builtin = modelcards.builtin_cards()
    for model_id, preset in models.PRESETS.items():
        card = builtin[model_id]
        assert (card.n_layers, card.hidden_size, card.num_kv_heads, card.head_dim, card.context_length) == (
            preset.num_hidden_layers,
            preset.hidden_size,
            preset.num_key_value_heads,
            preset.head_dim,
            preset.context_length,
        )
    # The tiny preset is small enough to generate here. Its weight bytes depend
    # on the tokenizer's trained vocabulary, so the built-in figure may lag the
    # generator by a little; a large gap means the built-in card needs updating.
    path = models.ensure_model(models.TINY_MODEL_ID, root=tmp_path)
    written = modelcards.card_for_model_dir(path)
    expected = builtin[models.TINY_MODEL_ID]
    assert msgspec.structs.replace(written, weight_bytes=expected.weight_bytes) == expected
    assert abs(written.weight_bytes - expected.weight_bytes) <= expected.weight_bytes // 10
    # Deriving from config.json and the weight files gives exactly the generator's own card.
    (path / modelcards.CARD_FILENAME).unlink()
    assert modelcards.card_for_model_dir(path) == written


# --- loading from disk ------------------------------------------------------------------


def _card_text(model_id: str, weight_bytes: int = 1000) -> str:
    return GENERATOR_CARD.replace('"skulk/tiny-qwen2"', json.dumps(model_id)).replace("4608145", str(weight_bytes))


def test_operator_cards_override_builtins_by_id_and_add_new_models(tmp_path):
    ops = tmp_path / "cards"
    ops.mkdir()
    (ops / "a.toml").write_text(_card_text("skulk/tiny-qwen2", 123))
    (ops / "b.toml").write_text(_card_text("me/custom", 456))
    (ops / "notes.txt").write_text("not a card")
    cards = modelcards.load_cards([ops, tmp_path / "missing"])
    assert cards["skulk/tiny-qwen2"].weight_bytes == 123
    assert cards["me/custom"].weight_bytes == 456
    assert set(modelcards.builtin_cards()) < set(cards)
    assert list(cards) == sorted(cards)


def test_later_directories_win_but_duplicates_within_one_are_an_error(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    (first / "x.toml").write_text(_card_text("me/m", 1))
    (second / "x.toml").write_text(_card_text("me/m", 2))
    assert modelcards.load_cards([first, second])["me/m"].weight_bytes == 2
    (second / "y.toml").write_text(_card_text("me/m", 3))
    with pytest.raises(CardError, match="also defined by"):
        modelcards.load_cards([second])


def test_bad_operator_cards_raise_or_are_reported_and_skipped(tmp_path):
    (tmp_path / "bad.toml").write_text("model_id = 3\n")
    (tmp_path / "good.toml").write_text(_card_text("me/ok"))
    with pytest.raises(CardError, match="bad.toml"):
        modelcards.load_cards([tmp_path])
    seen: list[tuple[Path, CardError]] = []
    cards = modelcards.load_cards([tmp_path], on_error=lambda p, e: seen.append((p, e)))
    assert "me/ok" in cards
    assert [p.name for p, _ in seen] == ["bad.toml"]


def test_load_default_cards_reads_the_data_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SKULK_HOME", str(tmp_path))
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "m.toml").write_text(_card_text("me/from-home"))
    assert modelcards.operator_cards_dir() == tmp_path / "cards"
    assert "me/from-home" in modelcards.load_default_cards()


def _fake_model_dir(path: Path, config: dict, weights: dict[str, int], index: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    for name, size in weights.items():
        (path / name).write_bytes(b"\0" * size)
    if index is not None:
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def test_a_card_for_a_local_model_directory_sums_its_weight_files(tmp_path):
    path = _fake_model_dir(
        tmp_path / "Llama-8B", LLAMA_31_8B_CONFIG, {"model-00001-of-00002.safetensors": 700, "model-00002-of-00002.safetensors": 300}
    )
    card = modelcards.card_for_model_dir(path)
    assert (card.model_id, card.weight_bytes, card.n_layers) == ("Llama-8B", 1000, 32)
    assert modelcards.card_for_model_dir(path, model_id="me/llama").model_id == "me/llama"


def test_mtp_depth_survives_only_when_the_weights_hold_mtp_layers(tmp_path):
    config = {
        "model_type": "deepseek_v3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 4096,
        "num_nextn_predict_layers": 1,
    }
    weights = {"model.safetensors": 10}
    main_only = {"weight_map": {"model.layers.1.mlp.weight": "model.safetensors"}}
    with_mtp = {"weight_map": {"model.layers.2.eh_proj.weight": "model.safetensors"}}  # layer 2 of 2: the MTP layer
    stripped = _fake_model_dir(tmp_path / "a", config, weights, main_only)
    assert modelcards.card_for_model_dir(stripped).mtp_max_depth == 0
    kept = _fake_model_dir(tmp_path / "b", config, weights, with_mtp)
    assert modelcards.card_for_model_dir(kept).mtp_max_depth == 1


def test_a_model_directory_card_file_wins_and_errors_name_the_path(tmp_path):
    path = _fake_model_dir(tmp_path / "m", LLAMA_31_8B_CONFIG, {"model.safetensors": 10})
    (path / modelcards.CARD_FILENAME).write_text(_card_text("me/hand-written", 99))
    assert modelcards.card_for_model_dir(path).weight_bytes == 99
    with pytest.raises(CardError, match="not an mlx-lm model directory"):
        modelcards.card_for_model_dir(tmp_path / "nothing")
    empty = _fake_model_dir(tmp_path / "e", LLAMA_31_8B_CONFIG, {})
    with pytest.raises(CardError, match="no \\*.safetensors"):
        modelcards.card_for_model_dir(empty)


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
    # Absent from a card's text, the field is empty (every built-in card can be split).
    assert all(c.pipeline_refusal == "" for c in modelcards.builtin_cards().values())
