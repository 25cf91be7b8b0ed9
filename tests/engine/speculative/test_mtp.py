"""``skulk.engine.speculative.mtp``: MTP heads load from both checkpoint layouts, or say why not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from skulk.engine.speculative.mtp import MTP_SIDECAR, MtpUnsupported, load_mtp


def test_mtp_weights_load_from_a_deepseek_layout(spec_loaded: Any, spec_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """Qwen3-Next ``mtp.*`` keys and DeepSeek ``model.layers.<n>.*`` keys give the same heads."""
    target_dir = spec_dirs[0]
    model = spec_loaded.shard.model
    sidecar = load_mtp(model, target_dir, spec_loaded.config)
    n = spec_loaded.n_layers
    renames = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm", "norm": "shared_head.norm"}
    deepseek = {}
    for key, value in mx.load(str(target_dir / MTP_SIDECAR)).items():
        rest = key[len("mtp.") :]
        head, _, tail = rest.partition(".")
        if head == "layers":
            block, _, tail = tail.partition(".")
            assert block in ("0", "1")
            # A DeepSeek MTP layer holds one block; keep the layout honest by
            # using a one-block copy when the sidecar has more.
            if block != "0":
                continue
            deepseek[f"model.layers.{n}.{tail}"] = value
        else:
            deepseek[f"model.layers.{n}.{renames[head]}.{tail}"] = value
    ds_dir = tmp_path / "deepseek"
    ds_dir.mkdir()
    shutil.copy(target_dir / "config.json", ds_dir / "config.json")
    mx.save_safetensors(str(ds_dir / "model-mtp.safetensors"), deepseek)
    (ds_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model-mtp.safetensors" for k in deepseek}})
    )
    loaded = load_mtp(model, ds_dir, spec_loaded.config)
    assert loaded.count == 1 and len(loaded.modules_[0].layers) == 1
    from mlx.utils import tree_flatten

    ds = dict(tree_flatten(loaded.parameters()))
    ref = dict(tree_flatten(sidecar.parameters()))
    for key, value in ds.items():
        assert mx.array_equal(value, ref[key]), key
    with pytest.raises(MtpUnsupported, match="no MTP weights"):
        load_mtp(model, spec_dirs[1], spec_loaded.config)
