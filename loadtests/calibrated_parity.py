"""Calibrated sim-to-real parity: the same failover, real and simulated, like for like.

Theory of operation
-------------------
``python -m loadtests.calibrated_parity`` runs, on this machine:

- **real**: ``--trials`` fresh three-node clusters per crash kind, each with
  the model on one follower and six streaming clients through the two
  followers (``loadtests.calibrate.run_trial``), then the master lost: its
  process killed (``kill -9``: its connections reset, loopback) or its host
  cut off (every link of its network namespace down: the peers wait out the
  zenoh lease). The figure: from the loss to the first token of a request
  sent after it;
- **simulated**: ``failover_calibrated`` over ``--sim-seeds`` seeds per kind
  (``master_loss_mode`` crash and isolate), timed by the calibration profile
  (``chaos/profiles/calibrated.json``, ``python -m loadtests.calibrate``);
- **the storm** (``--storm``): the real event storm (300 streams abandoned
  after 0.5 s against a loading model, ``loadtests.storm``) and its twin
  ``storm_calibrated``: task events per abandoned request.

It prints the table (p50 and p90 of each side, their ratio; target: within
30 %), writes the figures (``artifacts/parity/calibrated.json``) and the
section of ``docs/reliability.md`` between its markers.

Invariants kept: every real trial gets a fresh cluster; the simulated runs
are pure functions of their seeds; the docs section is replaced whole, never
appended to.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from chaos.harness import run_scenario
from loadtests.calibrate import PROFILE_PATH, run_trial
from loadtests.cluster import loopback_cluster, models_dir
from loadtests.records import percentile

__all__ = ["real_failovers", "sim_failovers", "storms", "table", "write_docs", "main"]

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "reliability.md"
START, END = "<!-- calibrated-parity:start -->", "<!-- calibrated-parity:end -->"
KINDS = {"process": "crash", "host": "isolate"}  # real crash kind -> the simulator's master_loss_mode
LABELS = {"process": "process killed (kill -9)", "host": "host lost (links down, lease expiry)"}
TARGET = 0.30


def real_failovers(kind: str, trials: int, work: Path, models: Path, echo: Any = print,
                   sysctls: dict[str, str] | None = None) -> tuple[list[float | None], list[bool]]:
    """Loss -> first token of each real trial (None: none served), and whether its survivors were deaf to each other."""
    out: list[float | None] = []
    deaf: list[bool] = []
    for i in range(trials):
        try:
            trial = run_trial(kind, work / f"{kind}-{i}", models, users=6, pre_s=8.0, post_s=14.0, think_s=0.2,
                              sysctls=sysctls)
        except (AssertionError, OSError, RuntimeError, TimeoutError) as exc:
            echo(f"  real {kind} {i + 1}/{trials}: FAILED to set up ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        out.append(trial.first_token_s)
        deaf.append(trial.survivors_deaf)
        echo(f"  real {kind} {i + 1}/{trials}: first token {trial.first_token_s} s after the loss "
             f"(detected after {[round(d, 3) for d in trial.detect_s]} s; campaigns "
             f"{[round(c, 3) for c in trial.campaign_s]} s with {trial.campaign_votes} votes"
             f"{'; the survivors did not hear each other' if trial.survivors_deaf else ''})")
    return out, deaf


def sim_failovers(mode: str, seeds: int) -> tuple[list[float], list[str]]:
    values, failures = [], []
    for seed in range(1, seeds + 1):
        r = run_scenario("failover_calibrated", seed, overrides={"master_loss_mode": mode}, quiet=True)
        if r.ok and "first_token_after_loss_s" in r.metrics:
            values.append(float(r.metrics["first_token_after_loss_s"]))
        else:
            failures.append(f"seed {seed}: {r.status}: {r.message.splitlines()[0] if r.message else ''}")
    return values, failures


def storms(work: Path, models: Path, sim_seeds: int) -> dict[str, Any]:
    from loadtests.storm import LOAD_DELAY_ENV, StormConfig, run_storm

    cfg = StormConfig(requests=300, users=20, abandon_after_s=0.5)
    with loopback_cluster(work / "storm", 3, models=models, env={LOAD_DELAY_ENV: str(cfg.load_delay_s)}) as cluster:
        real = run_storm(cluster, work / "storm-out", cfg)
    sims = [run_scenario("storm_calibrated", seed, quiet=True) for seed in range(1, sim_seeds + 1)]
    ok = [r for r in sims if r.ok]
    return {
        "real_max": real.get("task_events_per_abandoned_max"),
        "real_mean": real.get("task_events_per_abandoned_mean"),
        "real_abandoned": real.get("requests_abandoned"),
        "sim_max": max((int(r.metrics["events_per_abandoned_max"]) for r in ok), default=None),
        "sim_mean": round(statistics.fmean(float(r.metrics["events_per_abandoned_mean"]) for r in ok), 3) if ok else None,
        "sim_seeds": len(sims),
        "sim_ok": len(ok),
    }


def _q(values: list[float], q: float) -> float | None:
    return round(percentile(values, q) or 0.0, 3) if values else None


def table(figures: dict[str, Any]) -> list[str]:
    lines = ["| crash kind | real trials | real p50 | real p90 | sim seeds | sim p50 | sim p90 | p50 off by | p90 off by |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        f = figures["failover"].get(kind)
        if f is None:
            continue

        def off(a: float | None, b: float | None) -> str:
            return "n/a" if not a or b is None else f"{100.0 * (b - a) / a:+.0f} %"

        lines.append(f"| {LABELS[kind]} | {f['real_served']} of {f['real_trials']} | {f['real_p50']} s | {f['real_p90']} s "
                     f"| {f['sim_ok']} of {f['sim_seeds']} | {f['sim_p50']} s | {f['sim_p90']} s "
                     f"| {off(f['real_p50'], f['sim_p50'])} | {off(f['real_p90'], f['sim_p90'])} |")
        if f.get("real_trials_deaf"):
            lines.append(f"| {LABELS[kind]}, only the trials whose survivors heard each other "
                         f"({f['real_trials'] - f['real_trials_deaf']} of {f['real_trials']}) "
                         f"| {f['real_heard_served']} | {f['real_heard_p50']} s | {f['real_heard_p90']} s "
                         f"| {f['sim_ok']} of {f['sim_seeds']} | {f['sim_p50']} s | {f['sim_p90']} s "
                         f"| {off(f['real_heard_p50'], f['sim_p50'])} | {off(f['real_heard_p90'], f['sim_p90'])} |")
    storm = figures.get("storm")
    if storm:
        lines += ["", "| storm: task events per abandoned request | real | simulated |", "|---|---|---|",
                  f"| worst | {storm['real_max']} | {storm['sim_max']} |",
                  f"| mean | {storm['real_mean']} | {storm['sim_mean']} |"]
    return lines


def write_docs(figures: dict[str, Any], profile: dict[str, Any], path: Path = DOCS) -> None:
    """Replace the calibrated-parity section of ``docs/reliability.md`` (between its markers)."""
    body = [START, "",
            f"Measured {figures['measured']} at commit `{figures['commit']}` on {profile.get('machine', '?')}: "
            f"`python -m loadtests.calibrated_parity --trials {figures['trials']} --sim-seeds {figures['sim_seeds']}"
            f"{' --storm' if figures.get('storm') else ''}`, against the calibration profile measured "
            f"{profile.get('measured', '?')} (`python -m loadtests.calibrate`, `chaos/profiles/calibrated.json`). "
            "The figure is the time from the loss of the master to the first token of a request sent after it; "
            f"target: real and simulated p50 and p90 within {TARGET:.0%}.", ""]
    body += table(figures)
    body += ["", "The profile the simulated side ran with (medians):", "",
             "| measured on real processes | value |", "|---|---|",
             f"| detection of a killed process (connection reset) | {_med(profile.get('crash_detect_s'))} s |",
             f"| detection of a lost host (lease expiry) | {_med(profile.get('lease_detect_s'))} s |",
             f"| election: member change to campaign concluded (settle 0.2 s + votes) | {_med(profile.get('campaign_s'))} s |",
             f"| one-way message latency between nodes (half a vote round) | {profile.get('latency_ms_median')} ms |",
             f"| raw zenoh one-way latency on loopback | {profile.get('zenoh_ping_ms_median')} ms |",
             f"| {profile.get('model')}: time to first token, {profile.get('prompt_tokens')} prompt tokens | "
             f"{profile.get('ttft_s_median')} s (the simulated runner prefills at {profile.get('prefill_tps')} tokens/s) |",
             f"| {profile.get('model')}: decode, client-side | {profile.get('decode_tps')} tokens/s "
             f"(the engine's own: {profile.get('engine_generation_tps_median')}) |", "",
             "Residual differences are explained in the text below the table.", "", END]
    text = path.read_text(encoding="utf-8")
    section = "\n".join(body)
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n## 7. Calibrated parity\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def _med(values: list[float] | None) -> str:
    return "n/a" if not values else f"{statistics.median(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.calibrated_parity", description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=20, help="real trials of each crash kind")
    p.add_argument("--sim-seeds", type=int, default=200, help="simulated seeds of each crash kind")
    p.add_argument("--storm", action="store_true", help="also compare the event storm")
    p.add_argument("--no-netns", action="store_true", help="skip the lost-host kind (it needs root)")
    p.add_argument("--work", default="artifacts/parity/work")
    p.add_argument("--out", default="artifacts/parity/calibrated.json")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite the docs section")
    p.add_argument("--kind", action="append", choices=sorted(KINDS), help="only these crash kinds (repeatable)")
    p.add_argument("--tcp-retries2", type=int, default=None,
                   help="set net.ipv4.tcp_retries2 in the lost-host trials' namespaces (the deafness workaround, "
                        "docs/operations.md); implies --no-docs")
    args = p.parse_args(argv)
    profile = json.loads(PROFILE_PATH.read_text(encoding="utf-8"))
    work = Path(args.work).resolve()  # the nodes run elsewhere: every path they get must be absolute
    work.mkdir(parents=True, exist_ok=True)
    models = models_dir(work)
    kinds = [k for k in KINDS if not (k == "host" and args.no_netns) and (not args.kind or k in args.kind)]
    sysctls = {"net.ipv4.tcp_retries2": str(args.tcp_retries2)} if args.tcp_retries2 is not None else None
    if sysctls is not None:
        args.no_docs = True  # the docs table is the default configuration's
    echo = lambda line: print(line, flush=True)  # noqa: E731
    figures: dict[str, Any] = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "trials": args.trials,
                               "sim_seeds": args.sim_seeds, "failover": {}}
    from loadtests.calibrate import _commit

    figures["commit"] = _commit()
    figures["sysctls"] = sysctls or {}
    for kind in kinds:
        echo(f"# {LABELS[kind]}: {args.trials} real trials, {args.sim_seeds} simulated seeds")
        real, deaf = real_failovers(kind, args.trials, work, models, echo, sysctls if kind == "host" else None)
        sim, failures = sim_failovers(KINDS[kind], args.sim_seeds)
        served = [v for v in real if v is not None]
        heard = [v for v, d in zip(real, deaf) if v is not None and not d]
        figures["failover"][kind] = {
            "real": real, "real_deaf": deaf, "real_trials": len(real), "real_served": len(served),
            "real_p50": _q(served, 50), "real_p90": _q(served, 90),
            "real_trials_deaf": sum(deaf), "real_heard_served": len(heard),
            "real_heard_p50": _q(heard, 50), "real_heard_p90": _q(heard, 90),
            "sim_seeds": args.sim_seeds, "sim_ok": len(sim), "sim_p50": _q(sim, 50), "sim_p90": _q(sim, 90),
            "sim_failures": failures[:10],
        }
    if args.storm:
        echo("# the storm: real and simulated")
        figures["storm"] = storms(work, models, min(args.sim_seeds, 50))
    for line in table(figures):
        echo(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    echo(f"# wrote {out}")
    if not args.no_docs:
        write_docs(figures, profile)
        echo(f"# rewrote the calibrated-parity section of {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
