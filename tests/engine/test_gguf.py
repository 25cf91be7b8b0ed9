"""GGUF import (``skulk.engine.gguf``): exact weights, exact logits, a faithful tokenizer, clear refusals.

Oracles, all independent of the import code:
- for float files: the same weights loaded from safetensors by mlx-lm (logits must be equal, bit for bit);
- for quantized files: ``gguf.quants.dequantize`` (weights must be equal) and a float64 forward pass over
  the file's own tensors in llama.cpp's conventions (``tests/engine/gguf_reference.py``);
- for the tokenizer: the original tokenizer, and a textbook BPE over the file's merges.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from skulk.engine.archmodels import write_arch_model
from skulk.engine.gguf import GGUFImportError, ensure_imported, import_gguf
from tests.engine.gguf_files import write_gguf
from tests.engine.gguf_reference import GGUFReference

PROMPT = "What is the capital of France? The capital of France is Paris. 12345 numbers, don't stop."


def _load(path: Path, *, upcast: bool = False) -> tuple[Any, Any]:
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model, load_tokenizer

    model, config = load_model(path)
    if upcast:  # float16 scales would make MLX compute in float16; the oracle is float64
        model.update(tree_map(lambda a: a.astype(mx.float32) if a.dtype == mx.float16 else a, model.parameters()))
    return model, load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))


def _logits(model: Any, ids: list[int]) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch")
    return {f: write_arch_model(f, root / f) for f in ("llama", "qwen2", "qwen3")}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_a_float_file_imports_to_exactly_the_safetensors_model(family: str, arch_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = arch_dirs[family]
    gguf_file = write_gguf(src, tmp_path / f"{family}.gguf")
    report = import_gguf(gguf_file, tmp_path / "imported", model_id=f"test/{family}")
    assert report.architecture == family and report.kept_float == {"F32": report.n_tensors}
    assert not report.dequantized and not report.warnings
    original, tok_a = _load(src)
    imported, tok_b = _load(tmp_path / "imported")
    ids = tok_a.encode(PROMPT)
    # The rebuilt tokenizer splits text as the original does ...
    assert tok_b.encode(PROMPT) == ids
    chat = [{"role": "user", "content": "Hello there"}]
    assert tok_b.apply_chat_template(chat, add_generation_prompt=True) == tok_a.apply_chat_template(
        chat, add_generation_prompt=True
    )
    # ... and the model computes exactly the same logits (llama's Q/K rows were un-permuted).
    assert np.array_equal(_logits(imported, ids), _logits(original, ids))
    config = json.loads((tmp_path / "imported" / "config.json").read_text())
    assert config["model_type"] == family and config["rope_traditional"] is False
    assert config["tie_word_embeddings"] == json.loads((src / "config.json").read_text())["tie_word_embeddings"]


@pytest.mark.parametrize(("family", "kind"), [("llama", "Q4_1"), ("qwen2", "Q4_0"), ("qwen3", "Q8_0")])
def test_kept_quant_types_stay_quantized_and_dequantize_exactly(
    family: str, kind: str, arch_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import gguf
    import mlx.core as mx
    from gguf import quants

    src = arch_dirs[family]
    gguf_file = write_gguf(src, tmp_path / "q.gguf", types=lambda name: kind if name.endswith("proj.weight") else "Q8_0")
    report = import_gguf(gguf_file, tmp_path / "imported", model_id="test/q")
    assert set(report.kept_quantized) <= {kind, "Q8_0"} and not report.dequantized
    stored = mx.load(str(tmp_path / "imported" / "model.safetensors"))
    reader = gguf.GGUFReader(str(gguf_file))
    (down,) = [t for t in reader.tensors if t.name == "blk.1.ffn_down.weight"]
    expect = quants.dequantize(np.asarray(down.data), down.tensor_type)
    m = "model.layers.1.mlp.down_proj"
    got = mx.dequantize(stored[m + ".weight"], stored[m + ".scales"].astype(mx.float32),
                        stored[m + ".biases"].astype(mx.float32), group_size=32, bits=8 if kind == "Q8_0" else 4)  # fmt: skip
    assert np.array_equal(np.array(got), expect)
    model, tok = _load(tmp_path / "imported", upcast=True)
    ids = tok.encode(PROMPT)
    ref = GGUFReference(gguf_file).logits(ids)
    assert np.abs(_logits(model, ids) - ref).max() < 1e-3


def test_other_types_are_dequantized_to_float16_with_a_warning_or_refused(
    arch_dirs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import gguf
    import mlx.core as mx
    from gguf import quants

    # K-quant super-blocks hold 256 values: widths of 256 and 512.
    src = write_arch_model("qwen2", tmp_path / "wide", overrides={"hidden_size": 256, "intermediate_size": 512})

    def kinds(name: str) -> str | None:
        return "Q4_K" if "mlp" in name else ("Q6_K" if "o_proj" in name else None)

    gguf_file = write_gguf(src, tmp_path / "k.gguf", types=kinds)
    with pytest.raises(GGUFImportError, match="Q4_K"):
        import_gguf(gguf_file, tmp_path / "refused", model_id="test/k", dequantize=False)
    with caplog.at_level(logging.WARNING, logger="skulk.engine.gguf"):
        report = import_gguf(gguf_file, tmp_path / "imported", model_id="test/k")
    assert report.dequantized == {"Q4_K": 12, "Q6_K": 4}
    assert any("dequantized to float16" in r.getMessage() for r in caplog.records)
    assert report.warnings and "Q4_K" in report.warnings[0]
    stored = mx.load(str(tmp_path / "imported" / "model.safetensors"))
    (up,) = [t for t in gguf.GGUFReader(str(gguf_file)).tensors if t.name == "blk.0.ffn_up.weight"]
    expect = quants.dequantize(np.asarray(up.data), up.tensor_type).astype(np.float16)
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == mx.float16
    assert np.array_equal(np.array(stored["model.layers.0.mlp.up_proj.weight"]), expect)


def test_unsupported_files_are_refused_with_the_reason(arch_dirs: dict[str, Path], tmp_path: Path) -> None:
    import gguf

    with pytest.raises(GGUFImportError, match="no such file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "x", model_id="t/x")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFImportError, match="not a readable GGUF"):
        import_gguf(tmp_path / "junk.gguf", tmp_path / "y", model_id="t/y")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFImportError, match="architecture 'gpt2' is not supported"):
        import_gguf(tmp_path / "gpt2.gguf", tmp_path / "z", model_id="t/z")
    with pytest.raises(GGUFImportError, match="tokenizer.ggml.pre 'made-up'"):
        import_gguf(write_gguf(arch_dirs["qwen2"], tmp_path / "pre.gguf", pre="made-up"), tmp_path / "w", model_id="t/w")
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z"))


def test_ensure_imported_is_idempotent(arch_dirs: dict[str, Path], tmp_path: Path) -> None:
    gguf_file = write_gguf(arch_dirs["qwen3"], tmp_path / "a.gguf")
    path, report = ensure_imported(gguf_file, tmp_path / "models" / "org" / "a", model_id="org/a")
    assert report is not None and report.path == path
    again, none = ensure_imported(gguf_file, tmp_path / "models" / "org" / "a", model_id="org/a")
    assert again == path and none is None
    assert sorted(p.name for p in (tmp_path / "models" / "org").iterdir()) == ["a"]  # no staging left behind


# --- the real default model -------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(default_model: Path) -> Path:
    # The session's one import of the default model from its wheel (tests/conftest.py: ensure_model).
    return default_model


def test_the_default_model_imports_from_its_wheel(smollm: Path) -> None:
    from skulk.engine.models import DEFAULT_MODEL_ID
    from skulk.cards import builtin_cards, card_for_model_dir

    config = json.loads((smollm / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert config["quantization"]["bits"] == 4 and config["quantization"]["model.embed_tokens"]["bits"] == 8
    assert config["tie_word_embeddings"] is True and config["eos_token_id"] == [2]
    # The built-in card is the card the import writes.
    assert card_for_model_dir(smollm) == builtin_cards()[DEFAULT_MODEL_ID]


@pytest.mark.slow
def test_the_default_models_logits_match_exact_math_on_its_gguf(smollm: Path) -> None:
    from skulk.engine.models import DEFAULT_MODEL_ID, packaged_file

    model, tok = _load(smollm, upcast=True)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True)  # fmt: skip
    ref = GGUFReference(packaged_file(DEFAULT_MODEL_ID)).logits(ids)
    got = _logits(model, ids)
    assert np.abs(got - ref).max() < 2e-3, np.abs(got - ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert tok.decode([int(ref[-1].argmax())]) == "The"


def test_the_default_models_tokenizer_is_the_files_bpe(smollm: Path) -> None:
    from skulk.engine.gguf import read_metadata
    from skulk.engine.models import DEFAULT_MODEL_ID, packaged_file
    from tests.engine.gguf_reference import SMOLLM_SPLIT, bpe_encode

    meta = read_metadata(packaged_file(DEFAULT_MODEL_ID))
    assert meta["tokenizer.ggml.pre"] == "smollm"
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    _, tok = _load(smollm)
    for text in [PROMPT, "Hello world's 2024 année, naïve café!\n\n  indented\tTab", "x = [1, 22, 333]  # done"]:
        assert tok.encode(text) == bpe_encode(text, vocab, meta["tokenizer.ggml.merges"], SMOLLM_SPLIT), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user") == [1, 4093]  # a control token is one token
