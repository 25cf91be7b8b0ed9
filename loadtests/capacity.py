"""Load held: how many concurrent streams this machine serves within a latency target.

Theory of operation
-------------------
``run_capacity`` places the model on one node of a running cluster and runs
Locust's ``StreamingChatUser`` (no think time) at increasing numbers of
concurrent streams, each level for ``level_s`` seconds, spreading requests
over every node (most of them host no rank, so each request also crosses the
cluster). A level *holds* when nothing failed and the 95th percentile of the
time to first token is within ``ttft_target_s``. The answer is the largest
level that held, with its requests per second and tokens per second;
``run_mixed`` then runs all four kinds of client together (streams, plain
chats, state polling, abandoning clients) at that level, which is the run
the HTML report documents.

Levels stop early once one fails the target by more than twice (the next
would only queue more).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skulk.engine.models import TINY_MODEL_ID

from loadtests.cluster import RealCluster
from loadtests.records import summarise
from loadtests.run import USER_CLASSES, LocustRun

__all__ = ["prepare_serving", "run_capacity", "run_mixed"]


def prepare_serving(cluster: RealCluster, model: str = TINY_MODEL_ID) -> str:
    """Place ``model`` on a follower (off the master) and wait until it serves; the instance id."""
    master = cluster.wait_master()
    cluster.wait_memory_known()
    host = next((n for n in cluster.nodes if n != master), master)
    iid = cluster.place(model, via=host, excluded=[n for n in cluster.nodes if n != host])
    cluster.wait_ready(iid, via=host)
    return iid


def run_capacity(cluster: RealCluster, out_dir: Path, *, levels: Sequence[int] = (1, 2, 4, 8, 16), level_s: float = 20.0,
                 ttft_target_s: float = 1.0, max_tokens: int = 32, model: str = TINY_MODEL_ID) -> dict[str, Any]:
    """Step concurrent streams through ``levels``; per-level figures and the largest level that held."""
    assert levels and all(n >= 1 for n in levels) and level_s >= 5 and ttft_target_s > 0
    hosts = [cluster.url(n) for n in cluster.alive()]
    rows: list[dict[str, Any]] = []
    for users in levels:
        run = LocustRun(f"capacity-{users:03d}", out_dir, hosts, users=users, spawn_rate=users, run_time_s=level_s,
                        classes=["StreamingChatUser"],
                        env={"SKULK_LOAD_WAIT_S": "0", "SKULK_LOAD_MAX_TOKENS": str(max_tokens), "SKULK_LOAD_MODEL": model})
        run.start()
        run.wait()
        records = run.records()
        # Skip the first second: every client starts at once.
        start = min((r["t0"] for r in records), default=0.0) + 1.0
        stream = summarise(records, t0=start).get("kinds", {}).get("stream", {})
        ttft95 = stream.get("ttft_p95_s")
        held = bool(stream) and stream.get("failed", 1) == 0 and ttft95 is not None and ttft95 <= ttft_target_s
        rows.append({
            "streams": users,
            "requests": stream.get("count", 0),
            "failed": stream.get("failed", 0),
            "rps": stream.get("rps", 0.0),
            "ttft_p50_s": stream.get("ttft_p50_s"),
            "ttft_p95_s": ttft95,
            "latency_p95_s": stream.get("latency_p95_s"),
            "tokens_per_s_per_stream_p50": stream.get("tps_p50"),
            "tokens_per_s_total": round(stream.get("tokens_total", 0) / max(level_s - 1.0, 1.0), 1),
            "held": held,
        })
        if ttft95 is None or ttft95 > 2 * ttft_target_s:
            break
    best = max((r for r in rows if r["held"]), key=lambda r: r["streams"], default=None)
    return {"levels": rows, "ttft_target_s": ttft_target_s, "level_s": level_s, "max_tokens": max_tokens,
            "held_streams": best["streams"] if best else 0, "held_rps": best["rps"] if best else 0.0,
            "held_tokens_per_s": best["tokens_per_s_total"] if best else 0.0}


def run_mixed(cluster: RealCluster, out_dir: Path, *, users: int, run_s: float, max_requests: int = 0,
              model: str = TINY_MODEL_ID, name: str = "mixed") -> dict[str, Any]:
    """All four client kinds together (by their weights); Locust's CSV/HTML and the summary."""
    hosts = [cluster.url(n) for n in cluster.alive()]
    run = LocustRun(name, out_dir, hosts, users=max(users, len(USER_CLASSES)), spawn_rate=max(users, 4),
                    run_time_s=run_s, classes=USER_CLASSES, max_requests=max_requests,
                    env={"SKULK_LOAD_WAIT_S": "0.2", "SKULK_LOAD_MODEL": model})
    run.start()
    run.wait()
    records = run.records()
    return {"summary": summarise(records), "requests": len(records),
            "custom_metrics": {k: v for k, v in run.stats().items() if k.startswith("METRIC")},
            "html": str(run.html_path), "csv": str(run.stats_path), "records": str(run.record_path),
            "users": max(users, len(USER_CLASSES)), "run_s": run_s}
