"""Seeds per minute, before and after, measured side by side in one command.

Theory of operation
-------------------
``python -m chaos speed --against REV`` copies ``skulk``, ``sim`` and ``chaos``
of git revision ``REV`` to a scratch directory and runs the same seeds of the
same scenarios in both trees, each in a fresh child process, alternating
trees ``--repeat`` times. Each child reports, per scenario, the CPU time its
runs took (``time.process_time``: on a machine shared with other work, CPU
time moves far less than wall time) and the wall time. The smallest figure
of the repeats counts, and the table gives seeds per minute of CPU for both
trees and their ratio: over the scenarios both trees have (like for like),
and over every scenario of this tree.

Every run is a full run (tracing and every check on, the default budget
where the tree has one): exactly what a sweep does, one process. Every run
must pass: a run that fails ends early and would flatter its tree's figure
(a scratch build that broke the core once "ran" 43x faster), so a child with
a failed run reports its replay lines and the comparison stops with
:class:`RunFailed`, naming the tree, instead of printing a figure.

Invariants kept: the working tree is never written; both trees run the
same (scenario, seed) pairs in the same order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["compare", "side_by_side", "table", "child_main", "RunFailed"]

ROOT = Path(__file__).resolve().parents[1]

# A child's exit code when a measured run failed (its stderr names the runs).
_RUN_FAILED = 3


class RunFailed(RuntimeError):
    """A measured run did not pass, so no figure is given for its tree."""


def child_main(argv: Sequence[str] | None = None) -> int:
    """Run ``--seeds`` seeds of each scenario in this tree; print {scenario: [cpu_s, wall_s, runs]} as JSON."""
    import argparse

    from chaos.harness import run_scenario
    from chaos.scenarios import load_all

    p = argparse.ArgumentParser(prog="chaos speed child")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--start", type=int, default=1)
    p.add_argument("--scenario", action="append")
    args = p.parse_args(argv)
    names = [n for n in (args.scenario or sorted(load_all())) if n in load_all()]
    # Warm up (lazy imports, first-use caches) on a seed nobody measures, with quick scenarios
    # that place, refuse and stream.
    for name in ("oversized_placement", "ring_deadline", "master_failover"):
        if name in load_all():
            run_scenario(name, args.start + 10_000, quiet=True)
    out: dict[str, list[float]] = {}
    failed: list[str] = []
    for name in names:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        results = [run_scenario(name, seed, quiet=True) for seed in range(args.start, args.start + args.seeds)]
        out[name] = [time.process_time() - cpu0, time.perf_counter() - wall0, float(args.seeds)]
        failed += [f"{r.scenario} seed {r.seed}: {r.status}: {r.message.splitlines()[0] if r.message else ''}"
                   f"{f' ({r.replay})' if r.replay else ''}" for r in results if not r.ok]
    if failed:
        for line in failed:
            print(f"speed: a measured run failed: {line}", file=sys.stderr, flush=True)
        return _RUN_FAILED
    print(json.dumps(out), flush=True)
    return 0


def _run_child(tree: Path, seeds: int, start: int, scenarios: Sequence[str] | None) -> dict[str, list[float]]:
    cmd = [sys.executable, "-c", "import sys; from chaos.speed import child_main; sys.exit(child_main(sys.argv[1:]))",
           "--seeds", str(seeds), "--start", str(start)]
    for name in scenarios or ():
        cmd += ["--scenario", name]
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode == _RUN_FAILED:
        failures = [line for line in done.stderr.splitlines() if line.startswith("speed: a measured run failed")]
        raise RunFailed(f"{len(failures)} measured run(s) failed in {tree}, so its figure would be wrong:\n"
                        + "\n".join(failures[:10]))
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the speed child in {tree} failed (exit {done.returncode}): {done.stderr.strip()[-600:]}")
    return json.loads(lines[-1])


def compare(
    against: str,
    *,
    seeds: int = 3,
    start: int = 1,
    repeat: int = 2,
    scenarios: Sequence[str] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure this tree and ``against`` alternately; print and return the table (see the module docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix="skulk-speed-"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", against, "skulk", "sim", "chaos"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        shutil.copy2(ROOT / "chaos" / "speed.py", tmp / "chaos" / "speed.py")
        before, after = side_by_side(tmp, ROOT, seeds=seeds, start=start, repeat=repeat, scenarios=scenarios,
                                     echo=echo)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return table(before, after, against, echo)


def side_by_side(
    before_tree: Path,
    after_tree: Path,
    *,
    seeds: int,
    start: int = 1,
    repeat: int = 2,
    scenarios: Sequence[str] | None = None,
    echo: Callable[[str], None] = print,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Both trees' rows, children alternating (which goes first swaps each repeat); the least CPU counts."""
    before: dict[str, list[float]] = {}
    after: dict[str, list[float]] = {}
    for r in range(repeat):
        order = [(before_tree, before), (after_tree, after)]
        if r % 2:
            order.reverse()
        for tree, into in order:
            for name, row in _run_child(tree, seeds, start, scenarios).items():
                if name not in into or row[0] < into[name][0]:
                    into[name] = row
        echo(f"# repeat {r + 1} of {repeat} done")
    return before, after


def _rate(rows: dict[str, list[float]], names: Sequence[str], column: int) -> float:
    runs = sum(rows[n][2] for n in names)
    secs = sum(rows[n][column] for n in names)
    return 60.0 * runs / secs if secs > 0 else 0.0


def table(before: dict[str, list[float]], after: dict[str, list[float]], against: str,
          echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Print seeds per CPU-minute per scenario, over the shared scenarios and over all of ``after``'s; return them."""
    echo(f"{'scenario':<24}{'before /min':>12}{'after /min':>12}{'ratio':>8}   (seeds per minute of CPU, one process)")
    for name in sorted(after):
        b = 60.0 * before[name][2] / before[name][0] if name in before and before[name][0] > 0 else None
        a = 60.0 * after[name][2] / after[name][0] if after[name][0] > 0 else 0.0
        echo(f"{name:<24}{(f'{b:.1f}' if b is not None else '-'):>12}{a:>12.1f}"
             f"{(f'{a / b:.2f}x' if b else '-'):>8}")
    shared = sorted(set(before) & set(after))
    b_all, a_all = _rate(before, shared, 0), _rate(after, shared, 0)
    b_wall, a_wall = _rate(before, shared, 1), _rate(after, shared, 1)
    echo(f"{'all (both trees)':<24}{b_all:>12.1f}{a_all:>12.1f}{a_all / b_all if b_all else 0:>7.2f}x"
         f"   ({len(shared)} scenarios; wall: {b_wall:.1f} -> {a_wall:.1f})")
    every = _rate(after, sorted(after), 0)
    echo(f"{'all (this tree)':<24}{'':>12}{every:>12.1f}   ({len(after)} scenarios, the new ones included)")
    return {"against": against, "before": before, "after": after, "shared_before": b_all, "shared_after": a_all,
            "ratio": a_all / b_all if b_all else 0.0, "all_after": every}
