"""Calibration reads election phases from the nodes' JSON logs; a campaign that timed out is no vote round."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.calibrate import Trial, _phases


def _log(path: Path, node: str, rows: list[tuple[float, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"ts": ts, "level": "info", "logger": logger, "msg": msg, "node_id": node}) + "\n"
                            for ts, logger, msg in rows), encoding="utf-8")


def test_a_campaign_that_counted_only_its_own_vote_marks_the_survivors_deaf(tmp_path: Path) -> None:
    # As measured on a lost host: m-2's campaign heard m-1 (2 votes, 0.2 s after its member change);
    # m-1's ended on the 3 s campaign timeout counting only its own vote.
    _log(tmp_path / "logs" / "m-1.log", "m-1", [
        (100.0, "skulk.transport", "members: m-2, m-3"),
        (112.0, "skulk.transport", "members: m-2"),
        (115.2, "skulk.core", "campaign at clock 4 chose m-1 (new session m-1@4) from 1 votes"),
        (115.2, "skulk.core", "master of session m-1@4: carried over 1 instance(s)"),
    ])
    _log(tmp_path / "logs" / "m-2.log", "m-2", [
        (112.0, "skulk.transport", "members: m-1"),
        (112.2, "skulk.core", "campaign at clock 4 chose m-2 (new session m-2@4) from 2 votes"),
    ])
    trial = Trial(kind="host", lost_at=110.0, master="m-3")
    _phases(tmp_path / "logs", trial, ["m-1", "m-2"])
    assert trial.detect_s == [2.0, 2.0]
    assert [round(c, 3) for c in trial.campaign_s] == [3.2, 0.2]
    assert trial.campaign_votes == [1, 2] and trial.survivors == 2
    assert trial.survivors_deaf


def test_survivors_that_voted_for_each_other_are_not_deaf(tmp_path: Path) -> None:
    for node, other in (("m-1", "m-2"), ("m-2", "m-1")):
        _log(tmp_path / "logs" / f"{node}.log", node, [
            (112.0, "skulk.transport", f"members: {other}"),
            (112.21, "skulk.core", "campaign at clock 4 chose m-2 (new session m-2@4) from 2 votes"),
        ])
    trial = Trial(kind="host", lost_at=110.0, master="m-3")
    _phases(tmp_path / "logs", trial, ["m-1", "m-2"])
    assert trial.campaign_votes == [2, 2] and not trial.survivors_deaf
