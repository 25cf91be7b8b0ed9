"""Mutation testing of the control plane: does the sweep catch a planted bug, and how fast?

Theory of operation
-------------------
``python -m chaos mutate`` takes each mutant of the catalogue
(``chaos.mutants``), copies the code (``skulk``, ``sim``, ``chaos``) to a
scratch directory, plants the mutant there (never in the working tree) and
*hunts*: a child process, started in the scratch copy so that it imports
the mutated core, sweeps every scenario over seeds 1, 2, 3... in rounds (one
seed of every scenario per round, the quickest scenarios first), with
``jobs`` worker processes, until the first run fails or the time cap passes.

The result per mutant: caught (by which scenario, seed and check: an
invariant, a core assertion, an efficiency invariant, an oracle, a budget,
a scenario's own expectation), after how many runs and how many seconds;
or survived the cap (with the line that replays the hunt). A child that
does not finish within the cap plus a grace is killed and reported as
*hung*: the harness it ran could not stop a run of that mutant.

``--harness-from REV`` runs the hunts with ``sim/`` and ``chaos/`` taken from
a git revision (the mutate machinery itself overlaid), against the working
tree's core: the catch rate *before* a change to the checkers, side by side
with *after*.

Invariants kept: the working tree is never written; a stale mutant (its
anchor gone) fails loudly, naming itself; the hunt's order of runs is a
pure function of the scenario list and the seeds.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chaos.mutants import CATALOGUE, Mutant, by_name

__all__ = ["HuntResult", "MutantResult", "hunt", "run_mutant", "mutate_all", "table", "scratch_copy", "ROOT"]

ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("skulk", "sim", "chaos")
# The mutate machinery, overlaid on a harness taken from another revision.
_OVERLAY = ("chaos/mutate.py", "chaos/mutants.py")
# Scenarios in a round, quickest first (mean wall seconds per seed of `chaos ci`'s seeds 1-10,
# 2 shared cores: 0.08 s for oversized_placement to 5.3 s for event_storm); unknown ones last.
_SPEED_ORDER = (
    "oversized_placement", "failover_grace", "admission_edges", "ring_deadline", "election_ranks",
    "heterogeneous_cluster", "interconnect_selection", "master_failover", "context_admission",
    "storm_calibrated", "log_compaction", "exactly_once", "partition_heal", "zombie_master",
    "membership_churn", "crash_loop", "failover_calibrated", "swarm", "event_storm",
)
_CHILD_GRACE_S = 90.0  # past the cap, before a child that did not stop is called hung


@dataclass
class HuntResult:
    """What a hunt found: the first failing run, or none within the cap."""

    caught: bool
    scenario: str = ""
    seed: int = 0
    status: str = ""
    caught_by: str = ""
    message: str = ""
    replay: str = ""
    runs: int = 0  # runs finished when the hunt stopped (the failing one included)
    wall_s: float = 0.0  # from the hunt's start to the first failure (or to the cap)
    cpu_s: float = 0.0  # CPU seconds of the runs finished by then, summed over workers
    seeds_covered: str = ""  # "1..7" (every scenario), for the replay line of a survivor


@dataclass
class MutantResult:
    name: str
    area: str
    verdict: str  # caught | survived | hung | benign | stale
    hunt: HuntResult | None = None
    note: str = ""
    replay: str = ""
    details: dict[str, Any] = field(default_factory=dict)


# --- the hunt (runs in the scratch copy's child process) ---------------------------------------


def hunt_order(scenarios: Iterable[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """Rounds: seed ``s`` of every scenario (quickest first), then ``s + 1``..."""
    rank = {name: i for i, name in enumerate(_SPEED_ORDER)}
    ordered = sorted(scenarios, key=lambda n: (rank.get(n, len(rank)), n))
    return [(name, seed) for seed in seeds for name in ordered]


def _hunt_one(job: tuple[str, int, dict[str, str]]) -> dict[str, Any]:
    from chaos.harness import run_scenario

    name, seed, overrides = job
    started = time.process_time()
    kwargs: dict[str, Any] = {"overrides": overrides, "quiet": True}
    if "budget" in inspect.signature(run_scenario).parameters:
        from chaos.budget import DEFAULT_BUDGET

        kwargs["budget"] = DEFAULT_BUDGET
    r = run_scenario(name, seed, **kwargs)
    return {
        "scenario": name,
        "seed": seed,
        "status": r.status,
        "caught_by": getattr(r, "caught_by", "") or _caught_by_from(r.status, r.message),
        "message": r.message,
        "replay": r.replay,
        "cpu_s": time.process_time() - started,
    }


def _caught_by_from(status: str, message: str) -> str:
    """What caught a failure, for a harness that does not say (an older revision's)."""
    if status == "ok":
        return ""
    if message.startswith("invariant "):
        return "invariant " + message.split()[1]
    if message.startswith("core assertion"):
        return "core assertion"
    if message.startswith("expected"):
        return "expectation"
    return {"error": "harness error", "liveness": "liveness"}.get(status, status)


def hunt(
    scenarios: Iterable[str],
    seeds: Sequence[int],
    *,
    time_cap_s: float,
    jobs: int = 2,
    overrides: dict[str, str] | None = None,
    echo: Callable[[str], None] | None = None,
) -> HuntResult:
    """Sweep ``scenarios`` x ``seeds`` in rounds until the first failure or ``time_cap_s``."""
    work = [(name, seed, dict(overrides or {})) for name, seed in hunt_order(scenarios, seeds)]
    started = time.perf_counter()
    done = 0
    cpu = 0.0
    covered: dict[str, int] = {}
    found: dict[str, Any] | None = None

    def take(row: dict[str, Any]) -> bool:
        nonlocal done, cpu, found
        done += 1
        cpu += row["cpu_s"]
        covered[row["scenario"]] = max(covered.get(row["scenario"], 0), row["seed"])
        if echo is not None:
            echo(f"  {row['scenario']} seed {row['seed']}: {row['status']}")
        if row["status"] != "ok" and found is None:
            found = row
        return found is not None or time.perf_counter() - started > time_cap_s

    if jobs <= 1:
        for job in work:
            if take(_hunt_one(job)):
                break
    else:
        ctx = multiprocessing.get_context("fork")
        pool = ctx.Pool(jobs, maxtasksperchild=20)
        try:
            for row in pool.imap_unordered(_hunt_one, work, chunksize=1):
                if take(row):
                    break
        finally:
            pool.terminate()
            pool.join()
    wall = time.perf_counter() - started
    lo = min(covered.values()) if covered else 0
    seeds_covered = f"{seeds[0]}..{lo}" if lo else "none"
    if found is None:
        return HuntResult(caught=False, runs=done, wall_s=wall, cpu_s=cpu, seeds_covered=seeds_covered)
    return HuntResult(
        caught=True,
        scenario=found["scenario"],
        seed=found["seed"],
        status=found["status"],
        caught_by=found["caught_by"],
        message=found["message"],
        replay=found["replay"],
        runs=done,
        wall_s=wall,
        cpu_s=cpu,
        seeds_covered=seeds_covered,
    )


def hunt_main(argv: Sequence[str] | None = None) -> int:
    """The child's entry point: hunt, then print the result as one JSON line (last line of stdout)."""
    import argparse

    from chaos.scenarios import load_all

    p = argparse.ArgumentParser(prog="chaos hunt")
    p.add_argument("--scenario", action="append")
    p.add_argument("--seeds", type=int, default=1_000)
    p.add_argument("--start", type=int, default=1)
    p.add_argument("--time-cap", type=float, default=60.0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--expect-root", help="fail unless skulk.core is imported from under this directory")
    args = p.parse_args(argv)
    if args.expect_root:
        import skulk.core

        where = Path(skulk.core.__file__).resolve()
        assert Path(args.expect_root).resolve() in where.parents, f"skulk.core imported from {where}, not the scratch copy"
    names = args.scenario or sorted(load_all())
    over = dict(pair.split("=", 1) for pair in args.set)
    result = hunt(names, range(args.start, args.start + args.seeds), time_cap_s=args.time_cap, jobs=args.jobs,
                  overrides=over)
    print(json.dumps(asdict(result)), flush=True)
    return 0


# --- scratch copies -----------------------------------------------------------------------------


def scratch_copy(dest: Path, *, harness_from: str | None = None, root: Path = ROOT) -> None:
    """Copy ``skulk``, ``sim`` and ``chaos`` under ``dest``; with ``harness_from``, sim and chaos from that revision."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root / "skulk", dest / "skulk", ignore=ignore)
    if harness_from is None:
        for pkg in ("sim", "chaos"):
            shutil.copytree(root / pkg, dest / pkg, ignore=ignore)
        return
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", harness_from, "sim", "chaos"],
        check=True, capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for rel in _OVERLAY:
        shutil.copy2(root / rel, dest / rel)


# --- one mutant ---------------------------------------------------------------------------------


def run_mutant(
    mutant: Mutant,
    *,
    time_cap_s: float = 60.0,
    jobs: int = 2,
    scenarios: Sequence[str] | None = None,
    seeds: int = 1_000,
    start: int = 1,
    harness_from: str | None = None,
    overrides: dict[str, str] | None = None,
    keep: Path | None = None,
) -> MutantResult:
    """Plant ``mutant`` in a scratch copy and hunt there (see the module docstring)."""
    replay = f"python -m chaos mutate --mutant {mutant.name} --time-cap {time_cap_s:g}"
    if harness_from:
        replay += f" --harness-from {harness_from}"
    if mutant.benign:
        return MutantResult(mutant.name, mutant.area, "benign", note=mutant.benign, replay=replay)
    tmp = Path(tempfile.mkdtemp(prefix=f"skulk-mutant-{mutant.name}-")) if keep is None else keep
    try:
        scratch_copy(tmp, harness_from=harness_from)
        mutant.plant(tmp)
        cmd = [sys.executable, "-c", "import sys; from chaos.mutate import hunt_main; sys.exit(hunt_main(sys.argv[1:]))",
               "--time-cap", str(time_cap_s), "--jobs", str(jobs), "--seeds", str(seeds), "--start", str(start),
               "--expect-root", str(tmp)]
        for name in scenarios or ():
            cmd += ["--scenario", name]
        for key, value in sorted((overrides or {}).items()):
            cmd += ["--set", f"{key}={value}"]
        env = dict(os.environ, PYTHONPATH=str(tmp), PYTHONHASHSEED="0")
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=time_cap_s + _CHILD_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            wall = time.perf_counter() - started
            return MutantResult(mutant.name, mutant.area, "hung", replay=replay,
                                note=f"the hunt did not stop within {time_cap_s + _CHILD_GRACE_S:g} s: a run hung "
                                     f"(killed after {wall:.0f} s)")
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (err or out).strip().splitlines()[-6:]
            return MutantResult(mutant.name, mutant.area, "error", replay=replay,
                                note=f"the hunt failed (exit {proc.returncode}): " + " | ".join(tail))
        result = HuntResult(**json.loads(lines[-1]))
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    if result.caught:
        mreplay = f"python -m chaos mutate --mutant {mutant.name} --scenario {result.scenario} --seed {result.seed}"
        return MutantResult(mutant.name, mutant.area, "caught", hunt=result, replay=mreplay)
    return MutantResult(mutant.name, mutant.area, "survived", hunt=result,
                        replay=f"{replay} (seeds {result.seeds_covered} of every scenario passed)")


def mutate_all(
    mutants: Sequence[Mutant] = CATALOGUE,
    *,
    echo: Callable[[str], None] = print,
    **kwargs: Any,
) -> list[MutantResult]:
    results = []
    for mutant in mutants:
        result = run_mutant(mutant, **kwargs)
        results.append(result)
        echo(row(result))
    return results


# --- reporting ------------------------------------------------------------------------------------


_HEADER = f"{'mutant':<42}{'verdict':<10}{'caught by':<24}{'scenario':<24}{'seed':>5}{'runs':>6}{'wall s':>8}{'cpu s':>8}"


def row(r: MutantResult) -> str:
    h = r.hunt
    if h is None:
        return f"{r.name:<42}{r.verdict:<10}{r.note[:90]}"
    if not h.caught:
        return f"{r.name:<42}{r.verdict:<10}{'-':<24}{'-':<24}{'':>5}{h.runs:>6}{h.wall_s:>8.1f}{h.cpu_s:>8.1f}"
    return (f"{r.name:<42}{r.verdict:<10}{h.caught_by[:23]:<24}{h.scenario:<24}{h.seed:>5}{h.runs:>6}"
            f"{h.wall_s:>8.1f}{h.cpu_s:>8.1f}")


def catch_rate(results: Sequence[MutantResult]) -> tuple[int, int]:
    """(caught, counted): benign mutants are not counted."""
    counted = [r for r in results if r.verdict != "benign"]
    return sum(1 for r in counted if r.verdict == "caught"), len(counted)


def table(results: Sequence[MutantResult], *, time_cap_s: float) -> str:
    lines = [_HEADER] + [row(r) for r in results]
    caught, counted = catch_rate(results)
    fast = sum(1 for r in results if r.verdict == "caught" and r.hunt is not None and r.hunt.wall_s <= time_cap_s)
    lines.append(f"caught {caught} of {counted} ({100.0 * caught / counted if counted else 0.0:.0f} %)"
                 f"{'' if caught == fast else f'; {fast} within {time_cap_s:g} s'}")
    for r in results:
        if r.verdict in ("survived", "hung", "error"):
            lines.append(f"  {r.verdict}: {r.name}: replay with {r.replay}" + (f" ({r.note})" if r.note else ""))
        elif r.verdict == "benign":
            lines.append(f"  benign: {r.name}: {r.note}")
    return "\n".join(lines)


def replay_seed(mutant: Mutant, scenario: str, seed: int, *, harness_from: str | None = None) -> int:
    """Plant ``mutant`` in a scratch copy and run one seed there, printing what the run prints."""
    tmp = Path(tempfile.mkdtemp(prefix=f"skulk-mutant-{mutant.name}-"))
    try:
        scratch_copy(tmp, harness_from=harness_from)
        mutant.plant(tmp)
        env = dict(os.environ, PYTHONPATH=str(tmp), PYTHONHASHSEED="0")
        cmd = [sys.executable, "-m", "chaos", "run", scenario, "--seed", str(seed), "--quiet",
               "--artifacts", str(ROOT / "artifacts" / "chaos" / f"mutant-{mutant.name}")]
        return subprocess.run(cmd, cwd=tmp, env=env).returncode
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save(path: Path, results: Sequence[MutantResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n", encoding="utf-8")


def mutants_named(names: Sequence[str] | None) -> list[Mutant]:
    return list(CATALOGUE) if not names else [by_name(n) for n in names]
