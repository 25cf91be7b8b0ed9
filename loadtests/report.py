"""The reliability report: every real-process run, then ``docs/reliability.md`` from the figures.

Usage::

    .venv/bin/python -m loadtests.report            # the full runs (about 15 minutes on 2 cores)
    .venv/bin/python -m loadtests.report --quick    # smaller runs (about 5 minutes)
    .venv/bin/python -m loadtests.report --render artifacts/reliability/figures.json   # re-render only

Theory of operation
-------------------
Each section starts its own cluster of real node processes (loopback, or
network namespaces when run as root), runs one of the ``loadtests`` drivers
and keeps its figures: load held (``capacity``), the event storm
(``storm``), failover under load (``failover``, several trials), bad inputs
(``fuzz``), and sim-to-real parity (the chaos checkers over the recorded
traces, the simulated scenarios through ``chaos.harness``). Everything a run
wrote (Locust HTML/CSV, request records, traces, node logs) stays under
``artifacts/reliability/``; the figures go to ``figures.json`` there, and
``render`` turns them into the Markdown page, so the page is a pure
function of measured figures and can be re-rendered without re-running.

A section that fails is recorded with its error and the report goes on; the
page says so. The exit code is 1 when any section failed or missed a target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.capacity import prepare_serving, run_capacity, run_mixed
from loadtests.cluster import loopback_cluster, models_dir
from loadtests.failover import FailoverConfig, run_failover
from loadtests.fuzz import fuzz_openapi, hostile_cases, results_as_dicts, still_serving
from loadtests.parity import parity_rows, real_verdict, sim_summary
from loadtests.recorder import TraceRecorder
from loadtests.records import percentile
from loadtests.storm import LOAD_DELAY_ENV, StormConfig, run_storm

__all__ = ["Plan", "PLANS", "run_all", "render", "main"]

ROOT = Path(__file__).resolve().parents[1]
MODEL = "skulk/tiny-qwen2"


@dataclass(frozen=True)
class Plan:
    """Sizes of every run (``full`` for the report, ``quick`` for a check)."""

    name: str
    capacity_levels: tuple[int, ...]
    capacity_level_s: float
    ttft_target_s: float
    mixed_s: float
    storm: StormConfig
    failover: FailoverConfig
    failover_trials: int
    fuzz_examples: int
    slow_clients: int
    slow_hold_s: float
    disconnects: int
    sim_failover_seeds: int
    sim_storm_seeds: int
    netns_storm: StormConfig


PLANS: dict[str, Plan] = {
    "full": Plan(
        name="full", capacity_levels=(1, 2, 4, 8, 16, 32), capacity_level_s=20.0, ttft_target_s=1.0, mixed_s=30.0,
        storm=StormConfig(requests=500, users=25, load_delay_s=120.0, baseline_s=5.0, settle_s=8.0),
        failover=FailoverConfig(users=6, pre_s=8.0, post_s=20.0), failover_trials=3,
        fuzz_examples=40, slow_clients=200, slow_hold_s=10.0, disconnects=100,
        sim_failover_seeds=200, sim_storm_seeds=10,
        netns_storm=StormConfig(requests=200, users=15, load_delay_s=60.0, baseline_s=4.0, settle_s=6.0),
    ),
    "quick": Plan(
        name="quick", capacity_levels=(1, 2, 4, 8), capacity_level_s=10.0, ttft_target_s=1.0, mixed_s=12.0,
        storm=StormConfig(requests=150, users=15, load_delay_s=40.0, baseline_s=3.0, settle_s=5.0),
        failover=FailoverConfig(users=4, pre_s=6.0, post_s=12.0), failover_trials=1,
        fuzz_examples=8, slow_clients=40, slow_hold_s=4.0, disconnects=40,
        sim_failover_seeds=20, sim_storm_seeds=2,
        netns_storm=StormConfig(requests=80, users=10, load_delay_s=30.0, baseline_s=3.0, settle_s=5.0),
    ),
}


# --- the runs ---------------------------------------------------------------------------------


def _section(figures: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    print(f"[report] {name} ...", flush=True)
    started = time.monotonic()
    try:
        figures[name] = fn()
    except Exception as exc:  # noqa: BLE001 - a failed section is reported, the others still run
        figures[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    figures[name]["wall_s"] = round(time.monotonic() - started, 1)
    print(f"[report] {name}: {'FAILED ' + figures[name]['error'] if 'error' in figures[name] else 'done'} "
          f"({figures[name]['wall_s']} s)", flush=True)


def _load(plan: Plan, work: Path, out: Path, models: Path) -> dict[str, Any]:
    with loopback_cluster(work / "load", 3, models=models) as cluster:
        prepare_serving(cluster, MODEL)
        capacity = run_capacity(cluster, out / "load", levels=plan.capacity_levels, level_s=plan.capacity_level_s,
                                ttft_target_s=plan.ttft_target_s, model=MODEL)
        mixed = run_mixed(cluster, out / "load", users=max(4, capacity["held_streams"]), run_s=plan.mixed_s, model=MODEL)
    return {"capacity": capacity, "mixed": mixed}


def _storm(plan: Plan, work: Path, out: Path, models: Path, cfg: StormConfig | None = None,
           cluster_factory: Callable[..., Any] | None = None, tag: str = "storm") -> dict[str, Any]:
    cfg = cfg or plan.storm
    env = {LOAD_DELAY_ENV: str(cfg.load_delay_s)}
    factory = cluster_factory or (lambda base: loopback_cluster(base, 3, models=models, env=env))
    with factory(work / tag) as cluster:
        recorder = TraceRecorder(cluster, interval_s=0.25).start()
        try:
            figures = run_storm(cluster, out / tag, cfg, recorder=recorder)
        finally:
            recorder.stop()
        trace = out / tag / "trace.jsonl"
        recorder.write(trace)
    figures["verdict"] = real_verdict(trace)
    return figures


def _failover(plan: Plan, work: Path, out: Path, models: Path, trials: int | None = None,
              cluster_factory: Callable[..., Any] | None = None, tag: str = "failover") -> dict[str, Any]:
    runs = []
    factory = cluster_factory or (lambda base: loopback_cluster(base, 3, models=models))
    for trial in range(trials or plan.failover_trials):
        name = f"{tag}-{trial + 1}"
        with factory(work / name) as cluster:
            recorder = TraceRecorder(cluster, interval_s=0.25).start()
            try:
                figures = run_failover(cluster, out / name, plan.failover, recorder=recorder)
            finally:
                recorder.stop()
            trace = out / name / "trace.jsonl"
            recorder.write(trace)
        figures["verdict"] = real_verdict(trace)
        runs.append(figures)
    resumes = [r["resume_s"] for r in runs if r["resume_s"] is not None]
    tokens = [r["first_token_s"] for r in runs if r["first_token_s"] is not None]
    return {
        "trials": runs,
        "resume_s_p50": percentile(resumes, 50), "resume_s_max": max(resumes, default=None),
        "first_token_s_p50": percentile(tokens, 50),
        "verdict_ok": all(r["verdict"]["ok"] for r in runs),
        "verdict_line": "; ".join(r["verdict"]["line"] for r in runs),
    }


def _fuzz(plan: Plan, work: Path, out: Path, models: Path) -> dict[str, Any]:
    limit = 256 * 1024
    with loopback_cluster(work / "fuzz", 2, models=models, env={"SKULK_API_MAX_BODY_BYTES": str(limit)}) as cluster:
        master = cluster.wait_master()
        cluster.wait_memory_known()
        node = next(n for n in cluster.nodes if n != master)
        iid = cluster.place(MODEL, via=node, excluded=[master])
        cluster.wait_ready(iid, via=node)
        url = cluster.url(node)
        hostile = hostile_cases(url, model=MODEL, body_limit=limit, slow_clients=plan.slow_clients,
                                slow_hold_s=plan.slow_hold_s, disconnects=plan.disconnects)
        schema = fuzz_openapi(url, examples=plan.fuzz_examples, model=MODEL)
        health = still_serving(url, MODEL, node)
        replicated_at = cluster.wait_replicated()
        degraded = [cluster.metric(n, "skulk_eventlog_degraded") for n in cluster.nodes]
        alive = sorted(cluster.alive()) == sorted(cluster.nodes)
    result = {"body_limit": limit, "hostile": results_as_dicts(hostile), "schema": schema, "health": health,
              "replicated_at": replicated_at, "eventlog_degraded": degraded, "all_alive": alive}
    (out / "fuzz").mkdir(parents=True, exist_ok=True)
    (out / "fuzz" / "fuzz.json").write_text(json.dumps(result, indent=1))
    return result


def _parity(plan: Plan, figures: dict[str, Any]) -> dict[str, Any]:
    sim_failover = sim_summary("master_failover", range(1, plan.sim_failover_seeds + 1))
    sim_storm = sim_summary("event_storm", range(1, plan.sim_storm_seeds + 1))
    real_storm = figures.get("storm", {})
    real_storm = {**real_storm, "verdict_ok": real_storm.get("verdict", {}).get("ok"),
                  "verdict_line": real_storm.get("verdict", {}).get("line")} if "error" not in real_storm else None
    real_failover = figures.get("failover") if "error" not in figures.get("failover", {"error": 1}) else None
    return {"sim_failover": sim_failover, "sim_storm": sim_storm,
            "rows": parity_rows(real_failover, real_storm, sim_failover, sim_storm)}


def _netns(plan: Plan, work: Path, out: Path, models: Path) -> dict[str, Any]:
    from loadtests.netns import netns_available, netns_cluster

    ok, why = netns_available()
    if not ok:
        return {"skipped": why}
    env = {LOAD_DELAY_ENV: str(plan.netns_storm.load_delay_s)}
    storm = _storm(plan, work, out, models, cfg=plan.netns_storm, tag="netns-storm",
                   cluster_factory=lambda base: netns_cluster(base, models, env=env))
    failover = _failover(plan, work, out, models, trials=1, tag="netns-failover",
                         cluster_factory=lambda base: netns_cluster(base, models))
    return {"storm": storm, "failover": failover}


def run_all(plan: Plan, out: Path) -> dict[str, Any]:
    """Run every section under ``plan``; the figures (also written to ``out/figures.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {"plan": plan.name, "machine": _machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    work = Path(tempfile.mkdtemp(prefix="skulk-reliability-"))
    try:
        models = models_dir(work)
        _section(figures, "load", lambda: _load(plan, work, out, models))
        _section(figures, "storm", lambda: _storm(plan, work, out, models))
        _section(figures, "failover", lambda: _failover(plan, work, out, models))
        _section(figures, "fuzz", lambda: _fuzz(plan, work, out, models))
        _section(figures, "parity", lambda: _parity(plan, figures))
        _section(figures, "netns", lambda: _netns(plan, work, out, models))
    finally:
        _keep_logs(work, out)
        shutil.rmtree(work, ignore_errors=True)
    figures["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    (out / "figures.json").write_text(json.dumps(figures, indent=1, default=str))
    return figures


def _keep_logs(work: Path, out: Path) -> None:
    for log in work.glob("*/logs/*.log"):
        dest = out / "node-logs" / log.parent.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, dest / log.name)


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram = psutil.virtual_memory().total
    except ImportError:
        ram = 0
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram / 2**30, 1), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}", "commit": commit, "root": os.geteuid() == 0}


# --- targets --------------------------------------------------------------------------------


def targets(f: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(what, met, measured) for every target of issue 8 the figures can speak to."""
    out: list[tuple[str, bool, str]] = []

    def sec(name: str) -> dict[str, Any]:
        return f.get(name) if isinstance(f.get(name), dict) and "error" not in f[name] else {}

    storm, failover, fuzz, load = sec("storm"), sec("failover"), sec("fuzz"), sec("load")
    for name in ("load", "storm", "failover", "fuzz", "parity", "netns"):
        if isinstance(f.get(name), dict) and "error" in f[name]:
            out.append((f"section {name} ran", False, f[name]["error"]))
    if load:
        cap = load["capacity"]
        out.append((f"load held at p95 TTFT <= {cap['ttft_target_s']:g} s", cap["held_streams"] >= 1,
                    f"{cap['held_streams']} concurrent streams"))
        errs = load["mixed"]["summary"]["errors"]
        out.append(("mixed load: no failed request", not errs, str(errs or "none")))
    if storm:
        out.append(("events per abandoned request <= 3", storm["task_events_per_abandoned_max"] <= 3,
                    f"max {storm['task_events_per_abandoned_max']}, mean {storm['task_events_per_abandoned_mean']}"))
        out.append(("elections during the storm = 0", storm["elections_during_storm"] == 0,
                    str(storm["elections_during_storm"])))
        out.append(("placements lost in the storm = 0", storm["placements_lost"] == 0, str(storm["placements_lost"])))
        out.append(("master back to idle within seconds", bool(storm["idle_again"]),
                    f"task events stop {storm['task_events_stop_after_s']} s after the clients; "
                    f"{storm['post_storm_events_per_s']} events/s after vs {storm['baseline_events_per_s']} idle"))
        out.append(("storm trace passes the chaos checkers", bool(storm["verdict"]["ok"]), storm["verdict"]["line"]))
    if failover:
        trials = failover["trials"]
        hung = sum(t["hung"] for t in trials)
        unclear = sum(t["failed"] - t["failed_clear"] for t in trials)
        out.append(("failover: no request hangs", hung == 0, f"{hung} hung"))
        out.append(("failover: every failure a clear error", unclear == 0,
                    f"{sum(t['failed'] for t in trials)} failed, {unclear} without a clear error"))
        out.append(("failover: no placement lost, no runner re-loaded",
                    all(t["placements_lost"] == 0 and t["runners_restarted"] == 0 for t in trials),
                    f"lost {sum(t['placements_lost'] for t in trials)}, re-loaded {sum(t['runners_restarted'] for t in trials)}"))
        out.append(("failover traces pass the chaos checkers", bool(failover["verdict_ok"]), failover["verdict_line"]))
    if fuzz:
        schema = fuzz["schema"]
        out.append(("fuzzing: zero 5xx", not schema["server_errors"] and not fuzz["health"]["server_errors_counted"],
                    f"{len(schema['server_errors'])} seen by the client, {fuzz['health']['server_errors_counted'] or 0} counted by the node"))
        out.append(("fuzzing: no request hangs", not schema["hung"], f"{len(schema['hung'])} hung"))
        bad = [h["name"] for h in fuzz["hostile"] if not h["ok"]]
        out.append(("hostile clients: each answered as documented", not bad, ", ".join(bad) or "all"))
        out.append(("node still serving and replicating afterwards",
                    bool(fuzz["health"]["ok"] and fuzz["all_alive"] and fuzz["eventlog_degraded"] == [0.0, 0.0]),
                    f"{fuzz['health']}; replicated at index {fuzz['replicated_at']}"))
    return out


# --- the page -------------------------------------------------------------------------------------


def _fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return lines


def render(f: dict[str, Any]) -> str:
    """The Markdown page for figures ``f`` (pure)."""
    m = f.get("machine", {})
    cmd = "python -m loadtests.report" + (" --quick" if f.get("plan") == "quick" else "")
    lines = [
        "# Reliability on real processes",
        "",
        f"Generated by `.venv/bin/{cmd}` ({f.get('plan')} plan) from {f.get('started')} to {f.get('finished')}, "
        f"commit `{m.get('commit')}`, on {m.get('cores')} cores ({m.get('cpu')}), {m.get('ram_gib')} GiB RAM, "
        f"{m.get('system')}, Python {m.get('python')}{', as root' if m.get('root') else ''}. Every figure below was "
        "measured on real node processes (zenoh, the core, MLX runners on CPU) running the embedded "
        f"`{MODEL}` model; everything the runs wrote (Locust HTML and CSV, per-request records, traces, node "
        "logs) is under `artifacts/reliability/`, the figures in `artifacts/reliability/figures.json`. "
        "Regenerate with the same command; `--render FIGURES.json` re-renders without re-running.",
        "",
        "## Summary",
        "",
    ]
    tgt = targets(f)
    lines += _table(["target", "met", "measured"], [[what, "yes" if ok else "**NO**", got] for what, ok, got in tgt])
    lines += [""]
    lines += _summary(f)
    lines += _load_section(f.get("load", {}))
    lines += _storm_section(f.get("storm", {}))
    lines += _failover_section(f.get("failover", {}))
    lines += _fuzz_section(f.get("fuzz", {}))
    lines += _parity_section(f.get("parity", {}))
    lines += _netns_section(f.get("netns", {}))
    lines += _howto()
    return "\n".join(lines) + "\n"


def _err(section: dict[str, Any]) -> list[str]:
    return [f"**This section failed:** `{section['error']}` (traceback in figures.json).", ""] if "error" in section else []


def _summary(f: dict[str, Any]) -> list[str]:
    load, storm, failover, fuzz, parity = (f.get(k, {}) for k in ("load", "storm", "failover", "fuzz", "parity"))
    out = ["In short:", ""]
    if "capacity" in load:
        cap = load["capacity"]
        out.append(f"- **Load held:** {cap['held_streams']} concurrent streams at p95 time to first token <= "
                   f"{cap['ttft_target_s']:g} s, {cap['held_rps']:.2f} requests/s and {cap['held_tokens_per_s']:.0f} "
                   "tokens/s through a three-node loopback cluster on this machine.")
    if "task_events_per_abandoned_max" in storm:
        out.append(f"- **Events per abandoned request:** at most {storm['task_events_per_abandoned_max']} (mean "
                   f"{storm['task_events_per_abandoned_mean']}; all events in the storm window, idle rate removed: "
                   f"{storm['events_per_abandoned_all']}) over {storm['requests_abandoned']} abandoned requests; "
                   f"{storm['elections_during_storm']} elections.")
    if "trials" in failover:
        out.append(f"- **Failover to serving:** first request served {_fmt(failover['resume_s_p50'], ' s')} (p50 of "
                   f"{len(failover['trials'])}) after `kill -9` of the master under load; simulated (crash, "
                   f"{parity.get('sim_failover', {}).get('seeds', 0)} seeds): p50 "
                   f"{_fmt(parity.get('sim_failover', {}).get('failover_s_p50'), ' s')}, p99 "
                   f"{_fmt(parity.get('sim_failover', {}).get('failover_s_p99'), ' s')}.")
        faults = [f"kill -9 of the master under load ({len(failover['trials'])}x)"]
        if "task_events_per_abandoned_max" in storm:
            faults.append(f"a storm of {storm['requests_abandoned']} abandoned requests against a loading model")
        if "hostile" in fuzz:
            faults.append(f"{sum(h['tried'] for h in fuzz['hostile'])} hostile connections")
        netns = f.get("netns", {})
        if "failover" in netns:
            faults.append("the same failover and storm across three network namespaces")
        out.append("- **Faults survived:** " + "; ".join(faults) + ".")
    if "schema" in fuzz:
        n_hostile = sum(h["tried"] for h in fuzz["hostile"])
        out.append(f"- **Bad inputs tried:** {fuzz['schema']['requests']} schema-generated requests over all "
                   f"{fuzz['schema']['operations']} operations and {len(fuzz['hostile'])} hand-written hostile cases "
                   f"({n_hostile} connections); 5xx answers: {len(fuzz['schema']['server_errors'])}.")
    lost = []
    if "placements_lost" in storm:
        lost.append(f"placements lost {storm['placements_lost']} (storm)")
    if "trials" in failover:
        lost.append(f"{sum(t['placements_lost'] for t in failover['trials'])} (failover)")
        lost.append(f"runners re-loaded {sum(t['runners_restarted'] for t in failover['trials'])}")
        lost.append(f"requests hung {sum(t['hung'] for t in failover['trials'])}")
    if "tasks_left_in_state" in storm:
        lost.append(f"tasks left behind {storm['tasks_left_in_state']}, streams leaked {storm['open_streams_after']:g}")
    if lost:
        out.append("- **Nothing lost:** " + ", ".join(lost) + ".")
    return out + [""]


def _load_section(load: dict[str, Any]) -> list[str]:
    out = ["## 1. Load held", ""] + _err(load)
    if "capacity" not in load:
        return out
    cap = load["capacity"]
    out += [f"Locust's `StreamingChatUser` with no think time, {cap['max_tokens']} tokens per reply, requests spread "
            f"over the three nodes (the model runs on one; the others forward), {cap['level_s']:g} s per level. A level "
            f"holds when nothing failed and p95 time to first token <= {cap['ttft_target_s']:g} s.", ""]
    out += _table(["streams", "requests", "failed", "req/s", "TTFT p50", "TTFT p95", "latency p95", "tok/s per stream",
                   "tok/s total", "held"],
                  [[r["streams"], r["requests"], r["failed"], _fmt(r["rps"]), _fmt(r["ttft_p50_s"], " s"),
                    _fmt(r["ttft_p95_s"], " s"), _fmt(r["latency_p95_s"], " s"), _fmt(r["tokens_per_s_per_stream_p50"], "", 1),
                    _fmt(r["tokens_per_s_total"], "", 1), "yes" if r["held"] else "no"] for r in cap["levels"]])
    mixed = load["mixed"]
    out += ["", f"Mixed run ({mixed['users']} users of all four kinds, {mixed['run_s']:g} s; Locust report "
            f"`{_rel(mixed['html'])}`):", ""]
    out += _table(["kind", "requests", "ok", "req/s", "latency p95", "TTFT p95"],
                  [[k, v["count"], v["ok"], _fmt(v["rps"]), _fmt(v["latency_p95_s"], " s"), _fmt(v.get("ttft_p95_s"), " s")]
                   for k, v in mixed["summary"]["kinds"].items()])
    cm = mixed.get("custom_metrics", {})
    if cm:
        out += ["", "Custom Locust metrics (fired through `events.request`, type `METRIC`): " + "; ".join(
            f"`{k.split(' ', 1)[1]}` median {v.get('Median Response Time')} ({v.get('Request Count'):.0f} samples)"
            for k, v in sorted(cm.items())) + ". (For `tokens_per_second` the \"response time\" column holds tokens per second.)"]
    return out + [""]


def _storm_section(s: dict[str, Any]) -> list[str]:
    out = ["## 2. Event storm against a loading model", ""] + _err(s)
    if "requests_sent" not in s:
        return out
    cfg = s["config"]
    out += [f"Three loopback nodes whose runners stay loading for {cfg['load_delay_s']:g} s "
            f"(`SKULK_TEST_LOAD_DELAY_SECONDS`); {cfg['users']} Locust `AbandoningUser`s sent {s['requests_sent']} streamed "
            f"chats through all three nodes (master included) and walked away from each after {cfg['abandon_after_s']:g} s. "
            "Counts come from the master's disk event log.", ""]
    out += _table(["figure", "value"], [
        ["abandoned requests (failed)", f"{s['requests_abandoned']} ({s['requests_failed']})"],
        ["storm duration, rate", f"{s['storm_s']:g} s, {s['abandon_rate_per_s']:g} abandoned/s"],
        ["model still loading when the storm ended", s["model_loading_through_storm"]],
        ["task events per abandoned request: max / mean", f"{s['task_events_per_abandoned_max']} / {s['task_events_per_abandoned_mean']}"],
        ["per-request histogram {events: requests}", s["task_events_histogram"]],
        ["all events in the storm window per request (idle rate removed)", s["events_per_abandoned_all"]],
        ["elections during the storm", s["elections_during_storm"]],
        ["placements lost", s["placements_lost"]],
        ["master's events/s: idle, storm, after", f"{s['baseline_events_per_s']}, {s['storm_events_per_s']}, {s['post_storm_events_per_s']}"],
        ["task events stopped after the clients", f"{s['task_events_stop_after_s']} s"],
        ["tasks left in state, streams left open", f"{s['tasks_left_in_state']}, {s['open_streams_after']:g}"],
        ["served once loaded", f"{s['served_after_storm']} ({s['ready_after_placement_s']} s after placement)"],
        ["chaos checkers on the recorded trace", s["verdict"]["line"]],
    ])
    return out + ["", f"Locust report: `{_rel(s['locust']['html'])}`; trace: `{_rel(s['verdict']['trace'])}`.", ""]


def _failover_section(f: dict[str, Any]) -> list[str]:
    out = ["## 3. Failover under load", ""] + _err(f)
    if "trials" not in f:
        return out
    cfg = f["trials"][0]["config"]
    out += [f"Three loopback nodes; the model placed away from the master; {cfg['users']} Locust chat users (streamed and "
            f"plain, {cfg['max_tokens']} tokens) through the two followers; `kill -9` of the master {cfg['pre_s']:g} s in, "
            f"load for {cfg['post_s']:g} s more. A fresh cluster per trial.", ""]
    out += _table(["trial", "requests", "open at kill", "failed (clear)", "errors", "hung", "new master agreed",
                   "first token", "first request served", "placement lost", "runners re-loaded", "checkers"],
                  [[i + 1, t["requests"], t["open_at_kill"], f"{t['failed']} ({t['failed_clear']})", t["failed_by_error"] or "-",
                    t["hung"], _fmt(t["kill_to_agreed_master_s"], " s"), _fmt(t["first_token_s"], " s"),
                    _fmt(t["resume_s"], " s"), t["placements_lost"], t["runners_restarted"],
                    "OK" if t["verdict"]["ok"] else "FAIL"] for i, t in enumerate(f["trials"])])
    return out + ["", "Every failed request ended with an error naming its cause (`session_changed`: the cluster session "
                  "changed and the client should retry), none ran into the client's 30 s bound.", ""]


def _fuzz_section(z: dict[str, Any]) -> list[str]:
    out = ["## 4. Bad inputs", ""] + _err(z)
    if "schema" not in z:
        return out
    s = z["schema"]
    out += [f"schemathesis over the node's own `/openapi.json` ({s['operations']} operations, valid and invalid "
            f"requests, every other valid generation naming the placed model): {s['requests']} requests, statuses "
            f"{s['statuses']}, {s['generations_served']} generations served, 5xx {len(s['server_errors'])}, hangs "
            f"{len(s['hung'])}, errors outside the OpenAI envelope {len(s['not_enveloped'])}. Two nodes; every bad input "
            f"went to the follower, so commands crossed the cluster's wire; body limit {z['body_limit']:,} bytes.", ""]
    out += _table(["hostile case", "sent", "outcome", "as documented"],
                  [[h["name"], h["sent"], h["outcome"], "yes" if h["ok"] else "**NO**"] for h in z["hostile"]])
    h = z["health"]
    out += ["", f"Afterwards: the node answered (`/node_id` {h['node_id_ok']}), generated ({h['chat_served']}), had "
            f"{h['open_streams']:g} streams open, counted {len(h['server_errors_counted'])} 5xx in its own metrics; every "
            f"node was alive and at the same index ({z['replicated_at']}); event logs degraded: {z['eventlog_degraded']}.", ""]
    return out


def _parity_section(p: dict[str, Any]) -> list[str]:
    out = ["## 5. Sim-to-real parity", ""] + _err(p)
    if "rows" not in p:
        return out
    out += ["The chaos package's `SafetyChecker`, unchanged, judged the traces recorded from the real runs "
            "(`chaos/realtrace.py`: each node's observed state, election session and mastership, and every entry of the "
            "masters' disk logs). The simulated scenarios ran through `chaos.harness.run_scenario`; `master_failover` "
            "with `master_loss_mode=crash` (the real run's `kill -9`).", ""]
    out += _table(["figure", "real", "simulated"], [[r["figure"], r["real"], r["sim"]] for r in p["rows"]])
    out += ["", "Both failover times run from the kill to the end of the first request served under the new master. "
            "A simulated request is a whole reply of the simulated `sim/qwen-7b` runner (its token rate, its clients' "
            "think times); a real one is 16 tokens of a 1M-parameter model on this CPU, so the two differ mostly by how "
            "long that one request takes; crash detection (closed connections) and the election are modelled alike. "
            "The real storm's bound is met with room (created + cancelled); the simulator's worst case adds the one "
            "status a runner may report before the cancel lands."]
    fails = p.get("sim_failover", {}).get("failures", []) + p.get("sim_storm", {}).get("failures", [])
    if fails:
        out += ["", "Simulated seeds that failed (replay each with its command):", ""]
        out += [f"- `{x['replay']}`: {x['status']}: {x['message']}" for x in fails[:10]]
    return out + [""]


def _netns_section(n: dict[str, Any]) -> list[str]:
    out = ["## 6. Multi-host on one machine", ""] + _err(n)
    if "skipped" in n:
        return out + [f"Skipped: {n['skipped']}.", ""]
    if "storm" not in n:
        return out
    out += ["Three network namespaces joined by veth pairs with their own addresses (10.77.x.0/24), one pair also "
            "joined over a VPN-range address (100.64.7.0/24), each reachable from the root namespace for Locust "
            "(`loadtests/netns.py`).", ""]
    s, f = n["storm"], n["failover"]
    rows = []
    if "error" not in s:
        rows += [["storm: abandoned requests", s["requests_abandoned"]],
                 ["storm: task events per abandoned request, max", s["task_events_per_abandoned_max"]],
                 ["storm: elections, placements lost", f"{s['elections_during_storm']}, {s['placements_lost']}"],
                 ["storm: chaos checkers", s["verdict"]["line"]]]
    else:
        rows.append(["storm", f"FAILED: {s['error']}"])
    if "error" not in f:
        t = f["trials"][0]
        rows += [["failover: failed (clear), hung", f"{t['failed']} ({t['failed_clear']}), {t['hung']}"],
                 ["failover: first request served after the kill", _fmt(t["resume_s"], " s")],
                 ["failover: placements lost, runners re-loaded", f"{t['placements_lost']}, {t['runners_restarted']}"],
                 ["failover: chaos checkers", t["verdict"]["line"]]]
    else:
        rows.append(["failover", f"FAILED: {f['error']}"])
    return out + _table(["figure", "value"], rows) + [""]


def _howto() -> list[str]:
    return [
        "## How to run",
        "",
        "- Against a local cluster by hand (HTML report and CSV under `artifacts/load/`):",
        "",
        "  ```",
        "  .venv/bin/skulk cluster up -n 3 &        # nodes on 127.0.0.1:52415, 127.0.0.2:52416, 127.0.0.3:52417",
        "  SKULK_LOAD_HOSTS=http://127.0.0.1:52415,http://127.0.0.2:52416,http://127.0.0.3:52417 \\",
        "    .venv/bin/locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:52415 -u 8 -r 4 -t 60s \\",
        "    --html artifacts/load/report.html --csv artifacts/load/load",
        "  ```",
        "",
        "  Pick user classes by naming them at the end (`StreamingChatUser ChatUser StatePollingUser AbandoningUser`); "
        "settings are `SKULK_LOAD_*` variables (see `loadtests/locustfile.py`).",
        "- The smoke versions (part of the test suite, a few minutes on 2 cores): "
        "`.venv/bin/python -m pytest tests/reliability -m reliability`.",
        "- This page: `.venv/bin/python -m loadtests.report` (add `--quick` for smaller runs).",
        "",
        "## What these figures do not show",
        "",
        "- The machine has 2 cores shared by three nodes, their runners and Locust: capacity figures are this "
        "machine's, not a cluster's. The model is a 1M-parameter random-weight model.",
        "- Traces are sampled (each node polled every 0.25 s): a violation that lived between two polls would be "
        "missed; a violation found is real.",
        "- Kills are `kill -9` of a whole node; network partitions on real processes are not exercised here (the "
        "simulator covers them).",
        "",
    ]


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 5 minutes)")
    parser.add_argument("--out", default=str(ROOT / "artifacts" / "reliability"), help="artifacts directory")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "reliability.md"), help="the page to write")
    parser.add_argument("--render", metavar="FIGURES_JSON", help="only re-render the page from saved figures")
    args = parser.parse_args(argv)
    if args.render:
        figures = json.loads(Path(args.render).read_text())
    else:
        figures = run_all(PLANS["quick" if args.quick else "full"], Path(args.out))
    Path(args.doc).write_text(render(figures))
    missed = [(what, got) for what, ok, got in targets(figures) if not ok]
    print(f"[report] wrote {args.doc}; targets missed: {len(missed)}")
    for what, got in missed:
        print(f"  MISSED {what}: {got}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
