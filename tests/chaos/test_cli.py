"""The chaos CLI: runs pass, seeds replay, the canary is caught, exit codes are distinct.

These run the real command line (``python -m chaos``) as CI does, on a few
seeds; the broader sample is ``python -m chaos ci``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from chaos import exitcodes
from chaos.cli import main
from chaos.harness import run_scenario
from chaos.scenarios import load_all

ROOT = Path(__file__).resolve().parents[2]


def _chaos(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chaos", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_list_names_every_scenario(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["list"]) == exitcodes.OK
    out = capsys.readouterr().out
    for name in ("master_failover", "partition_heal", "membership_churn", "event_storm", "swarm"):
        assert name in out
    assert set(load_all()) >= {"master_failover", "partition_heal", "membership_churn", "event_storm", "swarm"}


def test_the_exit_codes_are_distinct() -> None:
    codes = [exitcodes.OK, exitcodes.ERROR, exitcodes.USAGE, exitcodes.SAFETY, exitcodes.LIVENESS, exitcodes.NONDETERMINISM]
    assert len(set(codes)) == len(codes)


def test_a_run_is_a_pure_function_of_its_seed() -> None:
    a = run_scenario("master_failover", 2, quiet=True)
    b = run_scenario("master_failover", 2, quiet=True)
    assert a.ok, a.line()
    assert a.digest == b.digest and a.steps == b.steps and a.metrics == b.metrics
    assert a.metrics["failover_s"] > 0


def test_check_determinism_reruns_in_a_fresh_process(tmp_path: Path) -> None:
    for scenario, seed in (("partition_heal", 2), ("membership_churn", 2)):
        proc = _chaos("run", scenario, "--seed", str(seed), "--check-determinism", "--quiet", cwd=ROOT)
        assert proc.returncode == exitcodes.OK, proc.stdout + proc.stderr
        assert "deterministic" in proc.stdout and "NONDETERMINISTIC" not in proc.stdout


def test_the_sweep_catches_the_canary_and_the_trace_replays_it(tmp_path: Path) -> None:
    art = tmp_path / "art"
    proc = _chaos("sweep", "--scenario", "partition_heal", "--seeds", "2", "--canary", "--artifacts", str(art), cwd=ROOT)
    assert proc.returncode == exitcodes.SAFETY, proc.stdout + proc.stderr
    assert "invariant 1" in proc.stdout and "replay: python -m chaos run partition_heal --seed 1 --canary" in proc.stdout
    trace = art / "partition_heal-seed1-canary" / "trace.jsonl"
    assert trace.exists() and (trace.parent / "timeline.svg").read_text().startswith("<svg")
    header = json.loads(trace.read_text().splitlines()[0])["header"]
    assert header["canary"] is True and header["status"] == "safety"
    replay = _chaos("replay", str(trace), "--quiet", "--artifacts", str(tmp_path / "replay"), cwd=ROOT)
    assert replay.returncode == exitcodes.SAFETY, replay.stdout + replay.stderr
    assert "reproduced the recorded trace exactly" in replay.stdout


def test_without_the_canary_the_same_seeds_pass(tmp_path: Path) -> None:
    proc = _chaos("sweep", "--scenario", "partition_heal", "--seeds", "2", "--artifacts", str(tmp_path), cwd=ROOT)
    assert proc.returncode == exitcodes.OK, proc.stdout + proc.stderr

