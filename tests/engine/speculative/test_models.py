"""``skulk.engine.speculative.models``: the generated target/draft pair and its cards agree."""

from __future__ import annotations

import json
from pathlib import Path

from skulk.engine.speculative.models import SPEC_TINY, read_card
from skulk.engine.speculative.mtp import MTP_SIDECAR


def test_generated_models_are_consistent(spec_dirs: tuple[Path, Path]) -> None:
    target_dir, draft_dir = spec_dirs
    target, draft = read_card(target_dir), read_card(draft_dir)
    assert target.n_layers == SPEC_TINY.target.num_hidden_layers and draft.n_layers == SPEC_TINY.draft_layers
    assert target.draft_model == SPEC_TINY.draft_id and target.mtp_max_depth == SPEC_TINY.mtp_max_depth
    assert (target_dir / MTP_SIDECAR).is_file()
    weights = sum(p.stat().st_size for p in target_dir.glob("*.safetensors"))
    assert target.weight_bytes == weights, "the card counts the MTP sidecar the runner loads"
    assert json.loads((target_dir / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert (target_dir / "tokenizer.json").read_bytes() == (draft_dir / "tokenizer.json").read_bytes()
    report = json.loads((target_dir / "skulk_spec.json").read_text())
    assert report["mtp"]["agreement_after"] >= report["mtp"]["agreement_before"]
