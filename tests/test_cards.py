"""Model cards on disk (``skulk.cards``): built-ins, operator cards, local model directories.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from skulk import cards as disk_cards
from skulk.core.cards import (
    TENSOR_SHARDING_FAMILIES,
    CardError,
)
from tests.core.builders import GENERATOR_CARD, LLAMA_31_8B_CONFIG


def _card_text(model_id: str, weight_bytes: int = 1000) -> str:
    return GENERATOR_CARD.replace('"skulk/tiny-qwen2"', json.dumps(model_id)).replace("4608145", str(weight_bytes))


def _fake_model_dir(path: Path, config: dict, weights: dict[str, int], index: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    for name, size in weights.items():
        (path / name).write_bytes(b"\0" * size)
    if index is not None:
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path




def test_builtin_cards_are_consistent():
    cards = disk_cards.builtin_cards()
    assert len(cards) >= 14
    assert {"skulk/tiny-qwen2", "skulk/small-qwen2-10m", "HuggingFaceTB/SmolLM2-135M-Instruct"} <= set(cards)
    # Every built-in card can be split into pipeline stages.
    assert all(c.pipeline_refusal == "" for c in cards.values())
    for model_id, card in cards.items():
        assert model_id == card.model_id
        assert card.supports_tensor == (card.family in TENSOR_SHARDING_FAMILIES), model_id
        if card.draft_model is not None:
            assert card.draft_model in cards, f"{model_id}: draft {card.draft_model} has no card"
            assert cards[card.draft_model].weight_bytes < card.weight_bytes / 4
        if model_id.startswith("mlx-community/"):
            assert any(q in model_id for q in ("4bit", "8bit", "MXFP4")), f"{model_id}: quantisation not in the id"
    root = Path(disk_cards.__file__).parent
    names = sorted(p.name for p in root.glob("*.toml"))
    assert names == sorted(m.replace("/", "--") + ".toml" for m in cards)


def test_builtin_cards_match_the_generated_presets(tmp_path):
    models = pytest.importorskip("skulk.engine.models")
    builtin = disk_cards.builtin_cards()
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
    written = disk_cards.card_for_model_dir(path)
    expected = builtin[models.TINY_MODEL_ID]
    assert msgspec.structs.replace(written, weight_bytes=expected.weight_bytes) == expected
    assert abs(written.weight_bytes - expected.weight_bytes) <= expected.weight_bytes // 10
    # Deriving from config.json and the weight files gives exactly the generator's own card.
    (path / disk_cards.CARD_FILENAME).unlink()
    assert disk_cards.card_for_model_dir(path) == written


def test_operator_cards_override_builtins_by_id_and_add_new_models(tmp_path):
    ops = tmp_path / "cards"
    ops.mkdir()
    (ops / "a.toml").write_text(_card_text("skulk/tiny-qwen2", 123))
    (ops / "b.toml").write_text(_card_text("me/custom", 456))
    (ops / "notes.txt").write_text("not a card")
    cards = disk_cards.load_cards([ops, tmp_path / "missing"])
    assert cards["skulk/tiny-qwen2"].weight_bytes == 123
    assert cards["me/custom"].weight_bytes == 456
    assert set(disk_cards.builtin_cards()) < set(cards)
    assert list(cards) == sorted(cards)


def test_later_directories_win_but_duplicates_within_one_are_an_error(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    (first / "x.toml").write_text(_card_text("me/m", 1))
    (second / "x.toml").write_text(_card_text("me/m", 2))
    assert disk_cards.load_cards([first, second])["me/m"].weight_bytes == 2
    (second / "y.toml").write_text(_card_text("me/m", 3))
    with pytest.raises(CardError, match="also defined by"):
        disk_cards.load_cards([second])


def test_bad_operator_cards_raise_or_are_reported_and_skipped(tmp_path):
    (tmp_path / "bad.toml").write_text("model_id = 3\n")
    (tmp_path / "good.toml").write_text(_card_text("me/ok"))
    with pytest.raises(CardError, match="bad.toml"):
        disk_cards.load_cards([tmp_path])
    seen: list[tuple[Path, CardError]] = []
    cards = disk_cards.load_cards([tmp_path], on_error=lambda p, e: seen.append((p, e)))
    assert "me/ok" in cards
    assert [p.name for p, _ in seen] == ["bad.toml"]


def test_load_default_cards_reads_the_data_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SKULK_HOME", str(tmp_path))
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "m.toml").write_text(_card_text("me/from-home"))
    assert disk_cards.operator_cards_dir() == tmp_path / "cards"
    assert "me/from-home" in disk_cards.load_default_cards()


def test_a_card_for_a_local_model_directory_sums_its_weight_files(tmp_path):
    path = _fake_model_dir(
        tmp_path / "Llama-8B", LLAMA_31_8B_CONFIG, {"model-00001-of-00002.safetensors": 700, "model-00002-of-00002.safetensors": 300}
    )
    card = disk_cards.card_for_model_dir(path)
    assert (card.model_id, card.weight_bytes, card.n_layers) == ("Llama-8B", 1000, 32)
    assert disk_cards.card_for_model_dir(path, model_id="me/llama").model_id == "me/llama"


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
    assert disk_cards.card_for_model_dir(stripped).mtp_max_depth == 0
    kept = _fake_model_dir(tmp_path / "b", config, weights, with_mtp)
    assert disk_cards.card_for_model_dir(kept).mtp_max_depth == 1


def test_a_model_directory_card_file_wins_and_errors_name_the_path(tmp_path):
    path = _fake_model_dir(tmp_path / "m", LLAMA_31_8B_CONFIG, {"model.safetensors": 10})
    (path / disk_cards.CARD_FILENAME).write_text(_card_text("me/hand-written", 99))
    assert disk_cards.card_for_model_dir(path).weight_bytes == 99
    with pytest.raises(CardError, match="not an mlx-lm model directory"):
        disk_cards.card_for_model_dir(tmp_path / "nothing")
    empty = _fake_model_dir(tmp_path / "e", LLAMA_31_8B_CONFIG, {})
    with pytest.raises(CardError, match="no \\*.safetensors"):
        disk_cards.card_for_model_dir(empty)
