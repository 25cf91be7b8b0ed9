"""``python -m chaos speed``: a figure only from runs that passed.

A run that fails ends early, so a tree whose runs fail looks fast: a scratch
build that broke the core once "ran" 43x faster than main. The child that
measures a tree must refuse to give a figure then, and say which runs failed.
Both children here run real scenarios in real scratch trees (the working tree
is never written): this tree as it is, and a copy with a planted mutant that
``failover_grace`` seed 1 catches.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos import speed
from chaos.mutate import scratch_copy
from chaos.mutants import FAST, by_name


def test_trees_whose_runs_pass_get_their_least_cpu_wall_and_run_count(tmp_path: Path) -> None:
    scratch_copy(tmp_path)
    said: list[str] = []
    before, after = speed.side_by_side(tmp_path, speed.ROOT, seeds=2, repeat=2, scenarios=["failover_grace"],
                                       echo=said.append)
    assert said == ["# repeat 1 of 2 done", "# repeat 2 of 2 done"]
    for rows in (before, after):
        assert set(rows) == {"failover_grace"}
        cpu_s, wall_s, runs = rows["failover_grace"]
        assert runs == 2.0
        assert 0.0 < cpu_s and 0.0 < wall_s


def test_a_tree_whose_run_fails_gets_no_figure_and_the_failure_is_named(tmp_path: Path) -> None:
    scratch_copy(tmp_path)
    by_name(FAST).plant(tmp_path)
    with pytest.raises(speed.RunFailed, match=r"failover_grace seed 1: liveness") as caught:
        speed._run_child(tmp_path, seeds=1, start=1, scenarios=["failover_grace"])
    assert str(tmp_path) in str(caught.value)
