"""``skulk.bench.tune``: the best speculation depth is measured on the real engine and written to the card."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from skulk.engine.speculative.models import SPEC_TINY, read_card, update_card_runtime


def test_tune_picks_a_measured_depth_and_writes_it_to_the_card(
    spec_dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from skulk.bench.tune import choose_depth, main

    # The tuner enables fast BLAS first; in this process it must neither swap
    # the BLAS under later in-process tests nor build a shim in the user's
    # data directory, whichever test modules were imported before it.
    monkeypatch.setenv("SKULK_FAST_BLAS", "0")
    assert choose_depth(100.0, {1: 120.0, 2: 150.0, 3: 140.0}, 0.05) == 2
    assert choose_depth(100.0, {1: 103.0, 2: 90.0}, 0.05) == 0, "a gain under the threshold is no gain"
    assert choose_depth(100.0, {}, 0.05) == 0
    copy = tmp_path / "target"
    shutil.copytree(spec_dirs[0], copy)
    update_card_runtime(copy, mtp_max_depth=7)
    assert main([str(copy), "--drafter", "mtp", "--depths", "1,2", "--tokens", "12", "--repetitions", "1", "--write"]) == 0
    card = read_card(copy)
    assert card.mtp_max_depth in (0, 1, 2)
    assert card.draft_model == SPEC_TINY.draft_id and card.model_id == SPEC_TINY.target.model_id
