"""``python -m chaos digests``: record many runs' trace digests, compare a later run against them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chaos import digests, exitcodes
from chaos.harness import run_scenario

ROOT = Path(__file__).resolve().parents[2]


def _chaos(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chaos", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_digests_record_then_compare_names_every_differing_run(tmp_path: Path) -> None:
    """``digests --out`` records runs; ``--compare`` re-runs them and fails on any difference."""
    recorded = tmp_path / "digests.json"
    proc = _chaos("digests", "--scenario", "oversized_placement", "--seeds", "2", "--jobs", "1",
                  "--out", str(recorded), cwd=ROOT)
    assert proc.returncode == exitcodes.OK, proc.stdout + proc.stderr
    body = json.loads(recorded.read_text())
    assert sorted(body) == ["oversized_placement:1", "oversized_placement:2"]
    assert all(status == "ok" and len(digest) == 64 for digest, status in body.values())
    assert body["oversized_placement:1"][0] == run_scenario("oversized_placement", 1, quiet=True).digest

    same = _chaos("digests", "--compare", str(recorded), "--jobs", "1", cwd=ROOT)
    assert same.returncode == exitcodes.OK, same.stdout + same.stderr
    assert "all 2 runs have the recorded digest and status" in same.stdout

    tampered = dict(body)
    tampered["oversized_placement:2"] = ["0" * 64, "ok"]
    tampered["oversized_placement:3"] = [body["oversized_placement:1"][0], "ok"]
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    diff = _chaos("digests", "--compare", str(tmp_path / "tampered.json"), "--jobs", "1", cwd=ROOT)
    assert diff.returncode == exitcodes.NONDETERMINISM, diff.stdout + diff.stderr
    assert f"oversized_placement:2: recorded {'0' * 16} ok, now {body['oversized_placement:2'][0][:16]} ok" in diff.stdout
    assert "oversized_placement:3: recorded" in diff.stdout
    assert "oversized_placement:1:" not in diff.stdout
    assert "2 of 3 runs differ" in diff.stdout


def test_compare_lists_runs_missing_on_either_side_and_keys_parse_back() -> None:
    recorded = {"a:1": ("d1", "ok"), "a:2": ("d2", "ok")}
    now = {"a:1": ("d1", "ok"), "a:3": ("d3", "liveness")}
    assert digests.compare(recorded, now) == [
        "a:2: recorded d2 ok, now (absent)",
        "a:3: recorded (absent), now d3 liveness",
    ]
    assert digests.compare(recorded, dict(recorded)) == []
    assert digests.parse_key(digests.run_key("master_failover", 17)) == ("master_failover", 17)
    with pytest.raises(ValueError):
        digests.parse_key("no-seed")
