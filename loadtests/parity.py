"""Sim-to-real parity: the same scenario, simulated and on real processes, side by side.

Theory of operation
-------------------
``sim_summary`` runs a chaos scenario over a range of seeds through the chaos
package's own API (``chaos.harness.run_scenario``) and condenses the results:
verdicts by class, the failing seeds with their replay commands, and the
scenario's key figure (``failover_s`` for ``master_failover``, events per
abandoned request for ``event_storm``). ``real_verdict`` runs the chaos
checkers, unchanged, over the trace recorded from the real run
(``chaos.realtrace``). ``parity_rows`` puts both next to each other.

The simulated ``master_failover`` is asked for the real run's fault
(``master_loss_mode=crash``: kill -9, nobody restarts it), so the two
failover times measure the same thing: from the master's loss to the first
request served under the new master.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from chaos.harness import run_scenario
from chaos.realtrace import check_trace, read_trace
from loadtests.records import percentile

__all__ = ["sim_summary", "real_verdict", "parity_rows", "SIM_OVERRIDES"]

# The simulated counterpart of each real run.
SIM_OVERRIDES: dict[str, dict[str, str]] = {
    "master_failover": {"master_loss_mode": "crash"},
    "event_storm": {},
}


def sim_summary(scenario: str, seeds: Iterable[int], overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``scenario`` for each seed; verdict counts, failures (with replay lines) and key figures."""
    over = dict(SIM_OVERRIDES.get(scenario, {}) if overrides is None else overrides)
    started = time.perf_counter()
    try:
        results = [run_scenario(scenario, seed, overrides=over, quiet=True, print_options=False) for seed in seeds]
    except KeyError as exc:
        return {"scenario": scenario, "available": False, "why": str(exc)}
    statuses = Counter(r.status for r in results)
    failures = [{"seed": r.seed, "status": r.status, "message": r.message.splitlines()[0][:240] if r.message else "",
                 "replay": r.replay} for r in results if not r.ok]
    out: dict[str, Any] = {
        "scenario": scenario,
        "available": True,
        "overrides": over,
        "seeds": len(results),
        "statuses": dict(sorted(statuses.items())),
        "failures": failures,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    failover = [float(r.metrics["failover_s"]) for r in results if r.ok and "failover_s" in r.metrics]
    if failover:
        out["failover_s_p50"] = round(percentile(failover, 50) or 0.0, 3)
        out["failover_s_p99"] = round(percentile(failover, 99) or 0.0, 3)
        out["failover_s_max"] = round(max(failover), 3)
    per_abandoned = [int(r.checks.get("max_events_per_abandoned_request", 0)) for r in results
                     if r.checks.get("abandoned_requests")]
    if per_abandoned:
        out["events_per_abandoned_max"] = max(per_abandoned)
        out["abandoned_requests"] = sum(int(r.checks.get("abandoned_requests", 0)) for r in results)
    elections = [int(r.metrics.get("masters_elected", 0)) for r in results if r.status != "error"]
    if elections:
        out["masters_elected_max"] = max(elections)
    return out


def real_verdict(trace: Path, *, abandoned_events_max: int = 3) -> dict[str, Any]:
    """The chaos checkers' verdict on a recorded real trace, as plain data."""
    verdict = check_trace(read_trace(trace), abandoned_events_max=abandoned_events_max)
    return {"ok": verdict.ok, "invariant": verdict.invariant, "message": verdict.message, "line": verdict.line(),
            "checks": verdict.checks, "figures": verdict.figures, "trace": str(trace)}


def parity_rows(real_failover: Mapping[str, Any] | None, real_storm: Mapping[str, Any] | None,
                sim_failover: Mapping[str, Any] | None, sim_storm: Mapping[str, Any] | None) -> list[dict[str, str]]:
    """Rows of the real-vs-simulated table (figure, real, simulated), as display strings."""

    def fmt(value: Any, unit: str = "") -> str:
        if value is None:
            return "n/a"
        return f"{value:.2f}{unit}" if isinstance(value, float) else f"{value}{unit}"

    rows: list[dict[str, str]] = []
    if real_failover is not None or sim_failover is not None:
        rf, sf = real_failover or {}, sim_failover or {}
        rows += [
            {"figure": "master_failover verdict (chaos checkers)",
             "real": "OK" if rf.get("verdict_ok") else f"FAIL: {rf.get('verdict_line', 'n/a')}",
             "sim": _sim_verdict(sf)},
            {"figure": "kill -> first request served again (s), p50",
             "real": fmt(rf.get("resume_s_p50"), " s"), "sim": fmt(sf.get("failover_s_p50"), " s")},
            {"figure": "kill -> first request served again (s), worst",
             "real": fmt(rf.get("resume_s_max"), " s"), "sim": fmt(sf.get("failover_s_p99"), " s (p99)")},
        ]
    if real_storm is not None or sim_storm is not None:
        rs, ss = real_storm or {}, sim_storm or {}
        rows += [
            {"figure": "event_storm verdict (chaos checkers)",
             "real": "OK" if rs.get("verdict_ok") else f"FAIL: {rs.get('verdict_line', 'n/a')}",
             "sim": _sim_verdict(ss)},
            {"figure": "task events per abandoned request, worst",
             "real": fmt(rs.get("task_events_per_abandoned_max")), "sim": fmt(ss.get("events_per_abandoned_max"))},
            {"figure": "elections during the storm",
             "real": fmt(rs.get("elections_during_storm")),
             "sim": fmt(None if "masters_elected_max" not in ss else ss["masters_elected_max"] - 1)},
        ]
    return rows


def _sim_verdict(summary: Mapping[str, Any]) -> str:
    if not summary:
        return "not run"
    if not summary.get("available", False):
        return "scenario not available"
    statuses = summary.get("statuses", {})
    ok = statuses.get("ok", 0)
    text = f"{ok}/{summary.get('seeds', 0)} seeds OK"
    bad = {k: v for k, v in statuses.items() if k != "ok"}
    if bad:
        text += " (" + ", ".join(f"{v} {k}" for k, v in sorted(bad.items())) + ")"
    return text
