"""Golden transcripts: the election, a failover, a partition heal and a placement, line by line.

Each scenario of ``sim.transcript`` runs on the hand-stepped cluster and its
transcript must equal the checked-in file in ``tests/sim/transcripts/``. A
difference is either a regression or an intended change of behaviour: then
rewrite them with ``python -m sim.transcript --update`` and review the diff
like code.
"""

from __future__ import annotations

import difflib

import pytest

from sim.transcript import DEFAULT_DIR, SCENARIOS, main, render


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_transcript_is_the_checked_in_one(name: str) -> None:
    path = DEFAULT_DIR / f"{name}.txt"
    assert path.exists(), f"no transcript {path}; write it with: python -m sim.transcript --update"
    want, got = path.read_text(encoding="utf-8"), render(name)
    diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True), str(path), "now", n=2))
    assert got == want, f"{name} changed; if on purpose: python -m sim.transcript --update\n{diff[:6000]}"


def test_every_transcript_shows_who_became_master_and_what_was_indexed() -> None:
    for name in sorted(SCENARIOS):
        text = render(name)
        assert "becomes master of" in text and "indexes #0 SessionStarted" in text, name
    assert "n2   becomes master of n2@3" in render("failover")
    placement = render("placement")
    assert "answers place-1: accepted" in placement and "delivers chat-1 #2 't2' (stop) to the API" in placement


def test_a_transcript_is_a_pure_function_of_its_scenario() -> None:
    assert render("failover") == render("failover")


def test_the_command_reports_a_difference_and_update_rewrites(tmp_path, capsys) -> None:
    assert main(["--update", "--dir", str(tmp_path), "election"]) == 0
    assert main(["--dir", str(tmp_path), "election"]) == 0
    (tmp_path / "election.txt").write_text("# stale\n")
    assert main(["--dir", str(tmp_path), "election"]) == 1
    assert "-# stale" in capsys.readouterr().out
