"""Failover under load: steady chat traffic while the master is killed (``kill -9``).

Theory of operation
-------------------
The model is placed away from the master (as ``chaos``'s ``master_failover``
does), so its instance must survive the kill with the very same runner
processes. Locust's streaming and non-streaming chat users send steady load
through the surviving nodes; ``pre_s`` seconds in, the master is killed.
Measured from the clients' records and the nodes' APIs:

- requests failed, by error code, and whether each failure was a clear error
  (an OpenAI envelope or an in-band error event naming the cause) rather than
  a hang (no request may run into the client's hard bound);
- the time from the kill to the first request started after it that
  succeeded (``resume_s``) and to its first token;
- the new master and when it indexed its first event
  (``skulk_master_session_started_unixtime``);
- no placement lost: the instance is in every survivor's state, ready, with
  the same runner processes (no re-load).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from skulk.engine.models import TINY_MODEL_ID

from loadtests.cluster import RealCluster, wait_for
from loadtests.records import HUNG, failover_figures, summarise
from loadtests.recorder import TraceRecorder
from loadtests.run import LocustRun

__all__ = ["FailoverConfig", "run_failover", "REQUEST_END_BOUND_S"]

# A request open on a master that dies must end within this (invariant 8, as
# the trace checker holds it); the API's own bound is the command deadline plus 10 s.
REQUEST_END_BOUND_S = 30.0


@dataclass(frozen=True)
class FailoverConfig:
    users: int = 6               # concurrent chat clients (streaming and not, 3:2)
    pre_s: float = 8.0           # steady load before the kill
    post_s: float = 20.0         # load after the kill
    wait_s: float = 0.2          # mean think time between a client's requests
    max_tokens: int = 16
    max_requests: int = 0        # 0: bounded by time only
    model: str = TINY_MODEL_ID

    def __post_init__(self) -> None:
        assert self.users >= 1 and self.pre_s >= 2 and self.post_s >= 5 and self.max_tokens >= 1


def _runner_pids(cluster: RealCluster, node: str) -> dict[str, int]:
    return {r["runnerId"]: r["pid"] for r in cluster.get(node, "/v1/diagnostics/node")["runners"]}


def run_failover(cluster: RealCluster, out_dir: Path, cfg: FailoverConfig, *,
                 recorder: TraceRecorder | None = None) -> dict[str, Any]:
    """Kill the master of ``cluster`` under steady chat load; the figures (see the module doc)."""
    master = cluster.wait_master()
    cluster.wait_memory_known()
    followers = [n for n in cluster.nodes if n != master]
    assert followers, "a failover needs at least two nodes"
    host = followers[0]
    iid = cluster.place(cfg.model, via=host, excluded=[n for n in cluster.nodes if n != host])
    cluster.wait_ready(iid, via=host)
    pids = {n: _runner_pids(cluster, n) for n in followers}
    run = LocustRun(
        "failover", out_dir, [cluster.url(n) for n in followers], users=cfg.users, spawn_rate=cfg.users,
        run_time_s=cfg.pre_s + cfg.post_s, classes=["StreamingChatUser", "ChatUser"], max_requests=cfg.max_requests,
        env={"SKULK_LOAD_WAIT_S": repr(cfg.wait_s), "SKULK_LOAD_MAX_TOKENS": str(cfg.max_tokens),
             "SKULK_LOAD_TIMEOUT_S": repr(REQUEST_END_BOUND_S), "SKULK_LOAD_MODEL": cfg.model},
    )
    run.start()
    time.sleep(cfg.pre_s)
    t_kill = cluster.kill(master)
    if recorder is not None:
        recorder.note("crash", master, t_kill)
    new_master = cluster.wait_master(followers, timeout_s=60, not_=master)
    t_elected = time.time()
    started = wait_for("the new master's first indexed event",
                       lambda: cluster.metric(new_master, "skulk_master_session_started_unixtime"), 15)
    run.wait(slack_s=60)
    records = run.records()
    figures = failover_figures(records, t_kill)
    if recorder is not None:
        for r in records:
            if r["kind"] in ("stream", "chat") and r["t0"] <= t_kill < r["t1"]:
                cid = r.get("command_id") or f"client-{r['node']}-{r['t0']:.6f}"
                recorder.note("request", r["node"], t_kill, commandId=cid,
                              submitted=r["t0"], deadline=t_kill + REQUEST_END_BOUND_S,
                              ended=None if r["error"] == HUNG else r["t1"])
    states = {n: cluster.state(n) for n in followers}
    lost = sorted(n for n, s in states.items() if iid not in s["instances"])
    statuses = cluster.runner_statuses(followers[1] if len(followers) > 1 else host, iid) or {}
    figures.update({
        "killed": master,
        "new_master": new_master,
        "kill_to_agreed_master_s": round(t_elected - t_kill, 3),
        "kill_to_first_indexed_event_s": round(started - t_kill, 3),
        "placements_lost": len(lost),
        "instance_ready_after": all(s in ("RunnerReady", "RunnerRunning") for s in statuses.values()) and bool(statuses),
        "runners_restarted": sum(1 for n in followers if _runner_pids(cluster, n) != pids[n]),
        "load": summarise(records),
        "locust": {"html": str(run.html_path), "csv": str(run.stats_path), "records": str(run.record_path)},
        "config": asdict(cfg),
    })
    return figures
