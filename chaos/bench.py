"""Benchmarks of the simulator: speed, seeds per minute, failover time.

- **Speed**: a 5-node cluster, idle but for its own heartbeats, telemetry,
  link probes and pruning, with tracing and every safety check on; prints
  simulated seconds per wall second (target: at least 1,000), and the same
  without the checker and without tracing so their cost is visible side by
  side.
- **Seeds per minute**: a few seeds of every scenario, one process.
- **Failover**: ``master_failover`` with the master crashed, over many seeds;
  p50 and p99 of the time from the crash to the first request served under
  the new master, against 1.5x and 3x the campaign timeout.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable
from typing import Any

from chaos.checkers import SafetyChecker
from chaos.harness import run_scenario
from chaos.scenarios import load_all
from sim.options import SimOptions
from sim.world import World

__all__ = ["bench_speed", "bench_seeds", "bench_failover", "percentile"]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between order statistics."""
    assert values and 0.0 <= q <= 100.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _idle_options(seed: int) -> SimOptions:
    return SimOptions(
        seed=seed,
        scenario="bench",
        node_count=5,
        ram_total_gib=(64,) * 5,
        loss_probability=0.0,
        duplicate_probability=0.0,
    ).validate()


def _speed_once(sim_s: float, *, tracing: bool, checking: bool, seed: int) -> tuple[float, int]:
    opts = _idle_options(seed)
    observers: list[Any] = []
    world = World(opts, tracing=tracing, observers=observers)
    if checking:
        checker = SafetyChecker(clock=lambda: world.env.now, abandoned_events_max=opts.abandoned_events_max)
        observers.append(checker)
    world.boot_all()
    started = time.perf_counter()
    world.env.run(until=sim_s)
    wall = time.perf_counter() - started
    assert len(world.masters()) == 1, "the idle cluster should have one master"
    return sim_s / wall, world.steps


def bench_speed(sim_s: float = 3_600.0, echo: Callable[[str], None] = print) -> dict[str, float]:
    """Simulated seconds per wall second for an idle 5-node cluster (see the module docstring)."""
    out: dict[str, float] = {}
    for label, tracing, checking in (
        ("tracing + checks", True, True),
        ("tracing, no checks", True, False),
        ("no tracing, no checks", False, False),
    ):
        rate, steps = _speed_once(sim_s, tracing=tracing, checking=checking, seed=1)
        out[label] = rate
        echo(f"  {label:<24} {rate:10.0f} simulated s / wall s   ({steps} steps over {sim_s:g} simulated s)")
    return out


def bench_seeds(seeds_per_scenario: int = 3, echo: Callable[[str], None] = print) -> dict[str, float]:
    """Seeds per minute per scenario (one process), and overall."""
    out: dict[str, float] = {}
    total_runs = 0
    total_wall = 0.0
    for name in sorted(load_all()):
        started = time.perf_counter()
        sim = 0.0
        for seed in range(1, seeds_per_scenario + 1):
            r = run_scenario(name, seed, quiet=True)
            sim += r.sim_s
        wall = time.perf_counter() - started
        total_runs += seeds_per_scenario
        total_wall += wall
        rate = 60.0 * seeds_per_scenario / wall
        out[name] = rate
        echo(f"  {name:<24} {rate:8.1f} seeds/minute   ({sim / wall:8.0f} simulated s / wall s)")
    out["all"] = 60.0 * total_runs / total_wall
    echo(f"  {'all scenarios':<24} {out['all']:8.1f} seeds/minute (one process)")
    return out


def _failover_one(seed: int) -> tuple[int, str, float | None, str]:
    r = run_scenario("master_failover", seed, overrides={"master_loss_mode": "crash"}, quiet=True, tracing=False)
    return seed, r.status, r.metrics.get("failover_s"), r.message.splitlines()[0] if r.message else ""


def bench_failover(seeds: int = 1_000, *, jobs: int = 2, start: int = 1, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Failover time over ``seeds`` crashes of the master (see the module docstring)."""
    load_all()
    times: list[float] = []
    failures: list[str] = []
    started = time.perf_counter()
    seed_list = list(range(start, start + seeds))
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs, maxtasksperchild=100) as pool:
            rows = list(pool.imap(_failover_one, seed_list, chunksize=4))
    else:
        rows = [_failover_one(s) for s in seed_list]
    for seed, status, failover_s, message in rows:
        if status != "ok" or failover_s is None:
            failures.append(f"seed {seed}: {status} {message}")
        else:
            times.append(float(failover_s))
    wall = time.perf_counter() - started
    from skulk.core.config import CoreConfig

    timeout = CoreConfig().campaign_timeout_s
    result: dict[str, Any] = {"seeds": seeds, "measured": len(times), "failures": failures, "wall_s": wall}
    if times:
        p50, p99 = percentile(times, 50), percentile(times, 99)
        result.update(p50=p50, p99=p99, max=max(times), mean=statistics.fmean(times))
        echo(f"  master crashes: {len(times)} measured of {seeds} seeds in {wall:.0f} s wall")
        echo(f"  failover p50 {p50:.3f} s = {p50 / timeout:.2f}x the {timeout:g} s campaign timeout (target <= 1.5x)")
        echo(f"  failover p99 {p99:.3f} s = {p99 / timeout:.2f}x the campaign timeout (target <= 3x)")
        echo(f"  failover max {max(times):.3f} s, mean {statistics.fmean(times):.3f} s")
    for line in failures[:20]:
        echo(f"  FAILED {line}")
    return result
