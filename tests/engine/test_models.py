"""The embedded models: deterministic, real mlx-lm format, shardable, atomic to create."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from skulk.core.cards import card_from_toml
from skulk.engine.models import (
    CARD_FILENAME,
    CHATML_TEMPLATE,
    TINY_MODEL_ID,
    PRESETS,
    SMALL_MODEL_ID,
    ensure_model,
    model_fingerprint,
    resolve_model_path,
)


def test_presets_split_across_three_pipeline_ranks_and_two_tensor_ranks() -> None:
    for preset in PRESETS.values():
        assert preset.num_hidden_layers % 3 == 0 and preset.num_hidden_layers >= 3
        for dim in (preset.hidden_size, preset.num_attention_heads, preset.num_key_value_heads, preset.intermediate_size):
            assert dim % 2 == 0, (preset.model_id, dim)


def test_default_model_is_complete_mlx_lm_directory(tiny_path: Path) -> None:
    for name in ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", CARD_FILENAME):  # fmt: skip
        assert (tiny_path / name).is_file(), name
    config = json.loads((tiny_path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["torch_dtype"] == "float32"
    index = json.loads((tiny_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    # Every layer's weights are indexed: pipeline loading reads the index.
    layers = {int(k.split(".")[2]) for k in index["weight_map"] if k.startswith("model.layers.")}
    assert layers == set(range(config["num_hidden_layers"]))
    tok_config = json.loads((tiny_path / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHATML_TEMPLATE
    card = card_from_toml((tiny_path / CARD_FILENAME).read_text())
    assert card.model_id == TINY_MODEL_ID and card.n_layers == config["num_hidden_layers"]
    assert card.weight_bytes == (tiny_path / "model.safetensors").stat().st_size
    assert card.supports_tensor and card.num_kv_heads == config["num_key_value_heads"]
    assert card.head_dim == config["hidden_size"] // config["num_attention_heads"]
    assert card.mtp_max_depth == 0 and card.speculative_multi_node and card.draft_model is None


def test_default_model_loads_with_mlx_lm_and_chats(tiny_path: Path, loaded: object) -> None:
    from mlx_lm.utils import get_total_parameters

    model = loaded.shard.model  # type: ignore[attr-defined]
    tokenizer = loaded.tokenizer  # type: ignore[attr-defined]
    assert 0.8e6 < get_total_parameters(model) < 1.6e6
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert tokenizer.decode(ids) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tokenizer.eos_token_ids


def test_generation_is_deterministic(tmp_path: Path, tiny_path: Path) -> None:
    again = ensure_model(TINY_MODEL_ID, root=tmp_path)
    assert again != tiny_path
    assert model_fingerprint(again) == model_fingerprint(tiny_path)


def test_small_preset_has_about_ten_million_parameters(models_root: Path) -> None:
    path = ensure_model(SMALL_MODEL_ID, root=models_root)
    config = json.loads((path / "config.json").read_text())
    total = json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_parameters"]
    assert 8e6 < total < 12e6, total
    assert config["num_hidden_layers"] == PRESETS[SMALL_MODEL_ID].num_hidden_layers


def test_concurrent_creation_is_atomic(tmp_path: Path, tiny_path: Path) -> None:
    # Three processes race to create the same model; all must see one
    # complete directory and nothing half-written may be left behind.
    code = (
        "import sys; from pathlib import Path; from skulk.engine.models import ensure_model, model_fingerprint; "
        "p = ensure_model(sys.argv[1], root=Path(sys.argv[2])); print(model_fingerprint(p))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, TINY_MODEL_ID, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs == [model_fingerprint(tiny_path)] * 3
    leftovers = [p.name for p in (tmp_path / "skulk").iterdir() if p.name != "tiny-qwen2"]
    assert leftovers == []


def test_resolve_model_path(tmp_path: Path, tiny_path: Path, models_root: Path) -> None:
    assert resolve_model_path(str(tiny_path)) == tiny_path  # any mlx-lm directory, by path
    assert resolve_model_path(TINY_MODEL_ID, root=models_root) == tiny_path  # a preset id
    with pytest.raises(FileNotFoundError, match="presets"):
        resolve_model_path("someone/unknown-model", root=tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_model_path("../escape", root=tmp_path)
    with pytest.raises(KeyError):
        ensure_model("skulk/../tiny-qwen2", root=tmp_path)  # only presets are generated
