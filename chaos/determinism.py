"""Determinism: the same seed must give the same trace, in any process.

``check_determinism`` runs a seed here and again in a fresh Python process
with a *different* ``PYTHONHASHSEED`` (so an ordering that leaks from set or
dict iteration of hashed keys shows up), and compares the trace digests.
When they differ it runs both once more with full traces and names the
first divergent record, showing both versions side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from chaos.harness import RunResult, run_scenario
from sim.trace import first_divergence, read_hashes

__all__ = ["DeterminismResult", "check_determinism", "child_command"]


@dataclass
class DeterminismResult:
    scenario: str
    seed: int
    same: bool
    digest_here: str
    digest_there: str
    run: RunResult
    divergence: str = ""

    def line(self) -> str:
        verdict = "deterministic" if self.same else "NONDETERMINISTIC"
        text = f"{self.scenario} seed={self.seed}: {verdict} (digest {self.digest_here[:16]}"
        text += ")" if self.same else f" here, {self.digest_there[:16]} in a fresh process)"
        return text + (f"\n{self.divergence}" if self.divergence else "")


def child_command(
    scenario: str, seed: int, hashes: Path, overrides: Mapping[str, str], canary: bool, trace: Path | None = None
) -> list[str]:
    cmd = [sys.executable, "-m", "chaos", "digest", scenario, "--seed", str(seed), "--hashes", str(hashes)]
    if trace is not None:
        cmd += ["--trace", str(trace)]
    if canary:
        cmd.append("--canary")
    for key in sorted(overrides):
        cmd += ["--set", f"{key}={overrides[key]}"]
    return cmd


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    current = env.get("PYTHONHASHSEED", "")
    env["PYTHONHASHSEED"] = "4242" if current != "4242" else "2424"
    return env


def _run_child(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if not lines:
        raise RuntimeError(f"determinism child failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1])


def check_determinism(
    scenario: str, seed: int, *, overrides: Mapping[str, str] | None = None, canary: bool = False
) -> DeterminismResult:
    """Run ``seed`` twice (here, and in a fresh process with another hash seed); compare."""
    over = dict(overrides or {})
    with tempfile.TemporaryDirectory(prefix="chaos-det-") as tmp:
        folder = Path(tmp)
        here = run_scenario(scenario, seed, overrides=over, canary=canary, quiet=True, hashes_out=folder / "here.hashes")
        there = _run_child(child_command(scenario, seed, folder / "there.hashes", over, canary))
        same = here.digest == there["digest"]
        result = DeterminismResult(scenario, seed, same, here.digest, there["digest"], here)
        if not same:
            index = first_divergence(read_hashes(folder / "here.hashes"), read_hashes(folder / "there.hashes"))
            result.divergence = _explain(scenario, seed, over, canary, folder, index)
    return result


def _explain(scenario: str, seed: int, over: dict[str, str], canary: bool, folder: Path, index: int | None) -> str:
    """Re-run both sides with full traces and show the first divergent record."""
    if index is None:
        return "  the per-record hashes agree; only the digests differ"
    here_trace = folder / "here.jsonl"
    there_trace = folder / "there.jsonl"
    run_scenario(
        scenario, seed, overrides=over, canary=canary, quiet=True, write_trace=True, artifacts_dir=folder / "here"
    )
    found = sorted((folder / "here").rglob("trace.jsonl"))
    if found:
        found[0].rename(here_trace)
    _run_child(child_command(scenario, seed, folder / "again.hashes", over, canary, trace=there_trace))
    return (
        f"  first divergent record: #{index}\n"
        f"  here:  {_record(here_trace, index)}\n"
        f"  fresh: {_record(there_trace, index)}"
    )


def _record(path: Path, index: int) -> str:
    if not path.exists():
        return "(no trace)"
    with path.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("i") == index:
                return json.dumps(rec)[:2000]
            if rec.get("i", -1) > index:
                break
    return "(record not kept)"
