"""Sweeps: many seeds of many scenarios, in parallel worker processes.

Each run is independent (its own world, its own seed), so a sweep farms runs
out to ``jobs`` forked workers and prints one line per run in seed order.
A failing run writes its artifacts and prints its replay command. The sweep's
exit code is the most serious class seen: safety, then nondeterminism, then
liveness, then harness errors.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos import exitcodes
from chaos.harness import RunResult, run_scenario

__all__ = ["SweepSummary", "sweep", "worst_exit_code"]

_SEVERITY = (exitcodes.SAFETY, exitcodes.NONDETERMINISM, exitcodes.LIVENESS, exitcodes.ERROR)


def worst_exit_code(codes: Iterable[int]) -> int:
    seen = set(codes)
    for code in _SEVERITY:
        if code in seen:
            return code
    return exitcodes.OK


@dataclass
class SweepSummary:
    results: list[RunResult] = field(default_factory=list)
    determinism_failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def exit_code(self) -> int:
        codes = [r.exit_code for r in self.results]
        if self.determinism_failures:
            codes.append(exitcodes.NONDETERMINISM)
        return worst_exit_code(codes)

    def table(self) -> str:
        per: dict[str, Counter[str]] = {}
        sim: Counter[str] = Counter()
        wall: Counter[str] = Counter()
        for r in self.results:
            per.setdefault(r.scenario, Counter())[r.status] += 1
            sim[r.scenario] += r.sim_s
            wall[r.scenario] += r.wall_s
        lines = [f"{'scenario':<24}{'seeds':>7}{'ok':>6}{'safety':>8}{'liveness':>10}{'error':>7}{'sim s':>10}{'wall s':>9}"]
        for name in sorted(per):
            c = per[name]
            total = sum(c.values())
            lines.append(
                f"{name:<24}{total:>7}{c['ok']:>6}{c['safety']:>8}{c['liveness']:>10}{c['error']:>7}"
                f"{sim[name]:>10.0f}{wall[name]:>9.1f}"
            )
        n = len(self.results)
        rate = 60.0 * n / self.wall_s if self.wall_s > 0 else 0.0
        lines.append(f"{n} runs in {self.wall_s:.1f} s wall ({rate:.1f} seeds/minute)")
        if self.determinism_failures:
            lines.append(f"nondeterministic: {', '.join(self.determinism_failures)}")
        return "\n".join(lines)


def _one(job: tuple[str, int, dict[str, str], bool, str | None, bool]) -> tuple[RunResult, str | None]:
    name, seed, overrides, canary, artifacts, determinism = job
    if determinism:
        from chaos.determinism import check_determinism

        det = check_determinism(name, seed, overrides=overrides, canary=canary)
        result = det.run
        if not result.ok and artifacts is not None:
            result = run_scenario(name, seed, overrides=overrides, canary=canary, quiet=True, artifacts_dir=Path(artifacts))
        return result, (None if det.same else det.line())
    result = run_scenario(
        name, seed, overrides=overrides, canary=canary, quiet=True, artifacts_dir=Path(artifacts) if artifacts else None
    )
    return result, None


def sweep(
    scenarios: list[str],
    seeds: Iterable[int],
    *,
    jobs: int = 1,
    overrides: Mapping[str, str] | None = None,
    canary: bool = False,
    artifacts_dir: Path | None = None,
    check_determinism: bool = False,
    echo: Any = print,
    stop_on_failure: bool = False,
) -> SweepSummary:
    """Run every (scenario, seed); ``echo`` gets one line per run, in order."""
    over = dict(overrides or {})
    seed_list = list(seeds)
    work = [
        (name, seed, over, canary, str(artifacts_dir) if artifacts_dir else None, check_determinism)
        for name in scenarios
        for seed in seed_list
    ]
    summary = SweepSummary()
    started = time.perf_counter()

    def report(result: RunResult, det: str | None) -> bool:
        summary.results.append(result)
        echo(result.line())
        if not result.ok:
            echo(f"  replay: {result.replay}")
            for path in result.artifacts:
                echo(f"  artifact: {path}")
        if det is not None:
            summary.determinism_failures.append(f"{result.scenario}:{result.seed}")
            echo(det)
        return not result.ok or det is not None

    if jobs <= 1:
        for job in work:
            if report(*_one(job)) and stop_on_failure:
                break
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(jobs, maxtasksperchild=50) as pool:
            for result, det in pool.imap(_one, work, chunksize=1):
                if report(result, det) and stop_on_failure:
                    pool.terminate()
                    break
    summary.wall_s = time.perf_counter() - started
    return summary
