"""Event storm on real processes: hundreds of abandoned requests against a loading model.

Theory of operation
-------------------
The cluster's nodes run with ``SKULK_TEST_LOAD_DELAY_SECONDS`` (a runner
stays in ``RunnerLoading`` that long before it loads), so a freshly placed
model is *loading* for the whole storm. Locust's ``AbandoningUser``s then
send streamed chats through every node (the master included) and walk away
after ``abandon_after_s``. Each request becomes a task the master indexes
(``TaskCreated``) and, when its client leaves, a cancel (``TaskDeleted``);
the ingest cap drops whatever a worker reports later about tasks the master
no longer knows. So a request should cost at most 3 indexed events, and the
storm should change nothing else: no election, no placement lost, and the
master's event rate back to its idle level within seconds of the clients
stopping.

Everything is measured from the outside: the master's disk event log (what
was indexed, and when, by the master's clock), each node's ``/state`` and
``/metrics``, and the clients' own records. After the storm the model
finishes loading and must serve a chat: the placement was not just kept in
the state, it still works.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from skulk.core.events import SessionStarted, TaskCreated, TaskDeleted, TaskFailed, TaskStatusUpdated
from skulk.core.ids import TaskId, derive_id
from skulk.engine.models import TINY_MODEL_ID

from loadtests.cluster import LoggedEvent, RealCluster, wait_for
from loadtests.recorder import TraceRecorder
from loadtests.run import LocustRun

__all__ = ["StormConfig", "run_storm", "storm_figures", "LOAD_DELAY_ENV"]

LOAD_DELAY_ENV = "SKULK_TEST_LOAD_DELAY_SECONDS"
_TASK_EVENTS = (TaskCreated, TaskStatusUpdated, TaskFailed, TaskDeleted)
_LOADING = ("RunnerIdle", "RunnerConnecting", "RunnerConnected", "RunnerLoading")


@dataclass(frozen=True)
class StormConfig:
    """One storm. The cluster must run with ``LOAD_DELAY_ENV`` >= ``load_delay_s``."""

    requests: int = 300            # abandoned requests to send (the run stops when spent)
    users: int = 20                # concurrent abandoning clients
    abandon_after_s: float = 0.5   # how long each waits before walking away
    baseline_s: float = 4.0        # idle window measured before the storm
    settle_s: float = 6.0          # window measured after the clients stop
    max_run_s: float = 120.0       # Locust's run-time bound
    load_delay_s: float = 90.0     # how long the model stays loading (the nodes' knob)
    ready_timeout_s: float = 180.0
    model: str = TINY_MODEL_ID

    def __post_init__(self) -> None:
        assert self.requests >= 1 and self.users >= 1 and self.abandon_after_s > 0
        assert self.baseline_s >= 1 and self.settle_s >= 2 and self.load_delay_s > 0


def _rate(events: list[LoggedEvent], t0: float, t1: float) -> float:
    span = max(t1 - t0, 1e-9)
    return sum(1 for e in events if t0 <= e.indexed.at < t1) / span


def storm_figures(
    log: list[LoggedEvent],
    records: list[dict[str, Any]],
    *,
    baseline: tuple[float, float],
    storm: tuple[float, float],
    settle_s: float,
) -> dict[str, Any]:
    """Figures of a storm from the master logs and the clients' records (pure).

    ``baseline`` and ``storm`` are wall-clock windows; the idle window after
    the storm is ``settle_s`` long. Events per abandoned request count every
    task event (created, status, failed, deleted) of the request's task in
    any session: the bound the simulator's invariant 6 holds.
    """
    t_stop = storm[1]
    abandoned = [r for r in records if r["kind"] == "abandon" and r["ok"]]
    cids = [r["command_id"] for r in abandoned if r.get("command_id")]
    per_task: Counter[str] = Counter()
    for e in log:
        ev = e.indexed.event
        if isinstance(ev, TaskCreated):
            per_task[ev.task.task_id] += 1
        elif isinstance(ev, _TASK_EVENTS):
            per_task[ev.task_id] += 1  # type: ignore[union-attr]
    counts = [per_task.get(TaskId(derive_id("task", cid)), 0) for cid in cids]
    in_storm = [e for e in log if storm[0] <= e.indexed.at <= t_stop + settle_s]
    elections = sorted({(e.session.clock, e.session.master) for e in in_storm if isinstance(e.indexed.event, SessionStarted)})
    task_after = [e.indexed.at - t_stop for e in log if e.indexed.at > t_stop and isinstance(e.indexed.event, _TASK_EVENTS)]
    quiet_from = max(task_after, default=0.0)
    base_rate = _rate(log, *baseline)
    post_rate = _rate(log, t_stop + quiet_from, t_stop + settle_s) if quiet_from < settle_s else None
    storm_events = sum(1 for e in log if storm[0] <= e.indexed.at <= t_stop)
    expected_idle = base_rate * (t_stop - storm[0])
    n = max(len(abandoned), 1)
    return {
        "requests_sent": len(records),
        "requests_abandoned": len(abandoned),
        "requests_failed": sum(1 for r in records if not r["ok"]),
        "failed_by_error": dict(Counter(r["error"] for r in records if not r["ok"])),
        "abandoned_with_command_id": len(cids),
        "storm_s": round(t_stop - storm[0], 3),
        "abandon_rate_per_s": round(len(abandoned) / max(t_stop - storm[0], 1e-9), 2),
        "task_events_per_abandoned_max": max(counts, default=0),
        "task_events_per_abandoned_mean": round(sum(counts) / max(len(counts), 1), 3),
        "task_events_histogram": dict(sorted(Counter(counts).items())),
        "events_in_storm": storm_events,
        "events_per_abandoned_all": round(max(storm_events - expected_idle, 0.0) / n, 3),
        "elections_during_storm": len(elections),
        "baseline_events_per_s": round(base_rate, 3),
        "storm_events_per_s": round(storm_events / max(t_stop - storm[0], 1e-9), 3),
        "task_events_stop_after_s": round(quiet_from, 3),
        "post_storm_events_per_s": None if post_rate is None else round(post_rate, 3),
        # Idle: no task event any more and no more than 2 events/s above the idle rate (a storm runs at tens).
        "idle_again": post_rate is not None and post_rate <= base_rate + 2.0,
    }


def run_storm(cluster: RealCluster, out_dir: Path, cfg: StormConfig, *, recorder: TraceRecorder | None = None) -> dict[str, Any]:
    """Run one storm on ``cluster`` (its nodes started with ``LOAD_DELAY_ENV``); its figures.

    Leaves the cluster serving the model (ready) with the same master.
    """
    master = cluster.wait_master()
    cluster.wait_memory_known()
    followers = [n for n in cluster.nodes if n != master]
    host = followers[0] if followers else master
    excluded = [n for n in cluster.nodes if n != host]
    session_before = cluster.session(master)
    iid = cluster.place(cfg.model, via=host, excluded=excluded)
    placed_at = time.time()

    def loading() -> bool:
        statuses = cluster.runner_statuses(master, iid)
        return bool(statuses) and all(s in _LOADING for s in statuses.values())  # type: ignore[union-attr]

    wait_for("the runner to be loading", loading, 30, 0.05)
    t_base0 = time.time()
    time.sleep(cfg.baseline_s)
    run = LocustRun(
        "storm", out_dir, [cluster.url(n) for n in cluster.nodes], users=cfg.users, spawn_rate=cfg.users,
        run_time_s=cfg.max_run_s, classes=["AbandoningUser"], max_requests=cfg.requests,
        env={"SKULK_LOAD_WAIT_S": "0", "SKULK_LOAD_ABANDON_AFTER_S": repr(cfg.abandon_after_s),
             "SKULK_LOAD_MODEL": cfg.model},
    )
    t_storm0 = time.time()
    run.start()
    run.wait(slack_s=60)
    records = run.records()
    t_stop = max((r["t1"] for r in records), default=time.time())
    still_loading = loading()
    open_streams = {n: cluster.metric(n, "skulk_handle_open_streams") for n in cluster.alive()}
    time.sleep(cfg.settle_s)
    if recorder is not None:
        for r in records:
            if r["kind"] == "abandon" and r["ok"] and r.get("command_id"):
                recorder.note("abandoned", r["node"], r["t1"], commandId=r["command_id"])
    figures = storm_figures(cluster.disk_logs(), records, baseline=(t_base0, t_storm0), storm=(t_storm0, t_stop),
                            settle_s=cfg.settle_s)
    states = {n: cluster.state(n) for n in cluster.alive()}
    lost = sorted(n for n, s in states.items() if iid not in s["instances"])
    abandoned_metric = sum(cluster.metric(n, "skulk_api_abandoned_total") or 0.0 for n in cluster.alive())
    figures.update({
        "instance": iid,
        "model_loading_through_storm": still_loading,
        "load_delay_s": cfg.load_delay_s,
        "placements_lost": len(lost),
        "nodes_missing_instance": lost,
        "same_session": cluster.session(master) == session_before,
        "tasks_left_in_state": max(len(s["tasks"]) for s in states.values()),
        "open_streams_after": max((v or 0.0) for v in open_streams.values()),
        "api_abandoned_total": abandoned_metric,
        "locust": {"html": str(run.html_path), "csv": str(run.stats_path), "records": str(run.record_path)},
        "config": asdict(cfg),
    })
    # The placement still works: once loaded, the model serves a chat through another node.
    cluster.wait_ready(iid, via=master, timeout_s=cfg.ready_timeout_s + max(0.0, placed_at + cfg.load_delay_s - time.time()))
    front = next((n for n in cluster.alive() if n != host), host)
    reply = httpx.post(cluster.url(front) + "/v1/chat/completions", timeout=60, json={
        "model": cfg.model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    figures["served_after_storm"] = reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    figures["ready_after_placement_s"] = round(time.time() - placed_at, 2)
    return figures
