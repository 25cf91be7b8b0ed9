"""Real node processes for integration tests: start N on loopback, query, wait.

Clusters come from ``skulk.runtime.localcluster.loopback_cluster``: free
ports chosen at random in high ranges and checked by binding, their own data
directories, a shared cluster key, explicit endpoints and no multicast
scouting, so several clusters (and other test sessions on the same machine)
never meet each other. This module adds small query helpers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skulk.engine.models import TINY_MODEL_ID, ensure_model
from skulk.runtime.localcluster import (
    FAST_ENV,
    LocalCluster,
    NodePlan,
    free_port_block,
    http_json,
    loopback_cluster,
    wait_for,
    wait_stable,
)

__all__ = [
    "free_port_block",
    "shared_models_dir",
    "start_cluster",
    "wait_for",
    "wait_stable",
    "get",
    "post",
    "metric",
    "masters",
    "sessions",
    "FAST_ENV",
    "zenoh_spy",
]


def shared_models_dir(root: Path) -> Path:
    """A models directory holding the default model (generated once per test session)."""
    models = root / "models"
    ensure_model(TINY_MODEL_ID, root=models)
    return models


# The launcher lives with the runtime (``skulk cluster up`` and the reliability
# runs use it too); the tests call it by this name.
start_cluster = loopback_cluster


def get(cluster: LocalCluster, node: str, path: str) -> Any:
    return cluster.fetch(cluster.plan(node), path)


def post(cluster: LocalCluster, node: str, path: str, body: Any, timeout_s: float = 30.0) -> Any:
    plan: NodePlan = cluster.plan(node)
    return http_json(plan.url + path, method="POST", body=body, timeout_s=timeout_s)


def metric(cluster: LocalCluster, node: str, name: str) -> float | None:
    """One value from a node's /metrics (Prometheus text), None when absent."""
    import urllib.request

    plan = cluster.plan(node)
    with urllib.request.urlopen(plan.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def sessions(cluster: LocalCluster, nodes: list[str] | None = None) -> dict[str, Any]:
    """Each node's current session as its /state reports it."""
    return {n: get(cluster, n, "/state").get("session") for n in (nodes or cluster.alive())}


def masters(cluster: LocalCluster, nodes: list[str] | None = None) -> set[str]:
    """Who each live node believes is master (from /state)."""
    return {s["master"] if s else "" for s in sessions(cluster, nodes).values()}


def zenoh_spy(connect: list[str]) -> Any:
    """A bare zenoh peer session (no cluster key) connected to ``connect``: an eavesdropper."""
    import json

    import zenoh

    cfg = zenoh.Config()
    cfg.insert_json5("mode", '"peer"')
    cfg.insert_json5("connect/endpoints", json.dumps(connect))
    cfg.insert_json5("listen/endpoints", "[]")
    cfg.insert_json5("scouting/multicast/enabled", "false")
    return zenoh.open(cfg)
