"""Every carded architecture is correct across ranks (issue 12, item 6).

- ``skulk.engine.stages`` rebuilds each architecture's forward pass from parts (embedding, one mask per
  layer from its own cache, layer calls, head): the parts must give exactly the model's own logits, step
  after step, with the model's own caches (sliding-window layers get rotating caches);
- ``python -m skulk.bench ranks``: for every family among the built-in cards, greedy tokens of a 2-rank
  pipeline and of 2-rank tensor shards (real ranks over mx.distributed's ring on loopback, through
  ``load_shard`` and the engine's ``BatchState``) equal one process's, alone and batched; where placement
  refuses a sharding, the refusal carries its reason and the sharding is never loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from skulk.bench.ranks import PROMPTS, carded_families, format_table, run_table
from skulk.engine.archmodels import ARCH_CONFIGS, write_arch_model


@pytest.fixture(scope="module")
def arch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arch-ranks")


def test_every_carded_family_has_a_shrunk_architecture() -> None:
    assert set(carded_families()) <= set(ARCH_CONFIGS)
    assert {"llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "gemma3", "gemma4", "gpt_oss", "deepseek_v3"} <= set(
        carded_families()
    )


@pytest.mark.parametrize("family", sorted(ARCH_CONFIGS))
def test_stage_parts_reproduce_the_models_own_forward(family: str, arch_root: Path) -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import RotatingKVCache
    from mlx_lm.utils import load_model, load_tokenizer

    from skulk.engine.stages import make_layer_caches, stage_model

    path = arch_root / family
    if not (path / "config.json").is_file():
        write_arch_model(family, path)
    model, config = load_model(path)
    stage = stage_model(model, config)
    ids = load_tokenizer(path).encode(PROMPTS[0])
    theirs, ours = make_layer_caches(model), make_layer_caches(model)
    windows = [c.max_size for c in ours if isinstance(c, RotatingKVCache)]
    assert all(w < len(ids) for w in windows), "prompts must outgrow the sliding windows"
    inputs = mx.array([ids])
    for _ in range(6):
        expected = model(inputs, cache=theirs)
        h = stage.embed(inputs)
        for layer, c in zip(stage.inner.layers, ours):
            h = stage.run_layer(layer, h, stage.layer_mask(h, c), c)
        got = stage.head(h)
        assert np.array_equal(np.array(got), np.array(expected)), family
        inputs = mx.argmax(expected[:, -1:], axis=-1)


@pytest.mark.slow
def test_pipeline_and_tensor_ranks_decode_as_one_process(arch_root: Path) -> None:
    rows = run_table(arch_root)
    table = format_table(rows)
    assert [r.family for r in rows] == list(carded_families())
    for row in rows:
        assert row.single_batched_equal, table
        assert row.pipeline == "equal", table
        assert row.tensor == "equal" or row.tensor.startswith("refused: "), table
        assert not row.notes, table
    refused = {r.family: r.tensor for r in rows if r.tensor.startswith("refused")}
    # mlx-lm has no tensor split for Gemma; the reason says so.
    assert set(refused) == {"gemma3", "gemma4"}, table
    assert all("mlx-lm has no tensor split for gemma" in reason for reason in refused.values())


@pytest.mark.slow
def test_the_default_model_quantized_and_tied_decodes_across_ranks_as_one_process(tmp_path: Path, default_model: Path) -> None:
    """SmolLM2 as served: 4/8-bit weights dequantized per rank (pipeline stages, and tensor slices of
    quantized layers), the tied embedding as the head on rank 0. 2 tensor ranks are refused by placement
    (3 KV heads); 3 divide every width."""
    from skulk.bench.ranks import compare, run_ranks, single_process
    from skulk.cards import builtin_cards
    from skulk.core.placement import static_refusal
    from skulk.engine.models import DEFAULT_MODEL_ID

    card = builtin_cards()[DEFAULT_MODEL_ID]
    assert "divide hidden size 576 and KV heads 3" in (static_refusal(card, "Tensor", 2) or "")
    assert static_refusal(card, "Tensor", 3) is None and static_refusal(card, "Pipeline", 2) is None
    path = default_model
    single = single_process(path, 8)
    job = {"family": "llama", "path": str(path), "model_id": DEFAULT_MODEL_ID, "n_layers": 30}
    piped = run_ranks([{**job, "sharding": "pipeline"}], 8, tmp_path / "p", world=2)
    assert compare(single, piped["llama:pipeline"])[0] == "equal"
    sliced = run_ranks([{**job, "sharding": "tensor"}], 8, tmp_path / "t", world=3)
    assert compare(single, sliced["llama:tensor"])[0] == "equal"
