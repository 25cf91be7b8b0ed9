"""Real node processes for integration tests: start N on loopback, query, wait.

Each cluster gets free ports (API, zenoh, MLX ring) chosen at random in high
ranges and checked by binding, its own data directories, a shared cluster
key, explicit endpoints and no multicast scouting, so several clusters (and
other test sessions on the same machine) never meet each other.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from skulk.engine.models import DEFAULT_MODEL_ID, ensure_model
from skulk.runtime.localcluster import LocalCluster, NodePlan, http_json, plan_local_cluster

__all__ = [
    "free_port_block",
    "shared_models_dir",
    "start_cluster",
    "wait_for",
    "get",
    "post",
    "metric",
    "masters",
    "sessions",
    "FAST_ENV",
]

T = TypeVar("T")

# Quicker-than-default timings that keep the protocol's shape (tests only).
FAST_ENV = {
    "SKULK_LEASE_MS": "2000",
    "SKULK_PROBE_INTERVAL_SECONDS": "3",
    "SKULK_PROBE_TIMEOUT_SECONDS": "2",
    "SKULK_TELEMETRY_INTERVAL_SECONDS": "2",
    "SKULK_RUNNER_STOP_GRACE_SECONDS": "5",
    "SKULK_LOG_LEVEL": "INFO",
}


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(n: int, hosts: list[str], *, low: int = 20_000, high: int = 45_000) -> int:
    """A base port such that ``base .. base+n-1`` are free on every host in ``hosts``."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - n)
        if all(_free(h, base + i) for h in hosts for i in range(n)):
            return base
    raise RuntimeError(f"no block of {n} free ports found")


def shared_models_dir(root: Path) -> Path:
    """A models directory holding the default model (generated once per test session)."""
    models = root / "models"
    ensure_model(DEFAULT_MODEL_ID, root=models)
    return models


@contextmanager
def start_cluster(
    base: Path,
    n: int,
    *,
    models_dir: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
    per_node_env: Mapping[int, Mapping[str, str]] | None = None,
    wait: bool = True,
) -> Iterator[LocalCluster]:
    """Start ``n`` real nodes on loopback (127.0.0.1..n), yield the cluster, always stop it."""
    hosts = [f"127.0.0.{i + 1}" for i in range(n)]
    api = free_port_block(n, hosts)
    zen = free_port_block(n, hosts)
    ring = free_port_block(50, hosts, low=45_000, high=60_000)
    env = dict(FAST_ENV)
    env["SKULK_RING_BASE_PORT"] = str(ring)
    env["SKULK_AUTO_PLACE"] = "none"
    env.update(extra_env or {})
    plans = plan_local_cluster(
        n, base, api_base_port=api, zenoh_base_port=zen, namespace=f"t{random.randrange(1 << 30):x}",
        node_prefix="n", extra_env=env, distinct_addresses=True,
    )
    for plan in plans:
        if models_dir is not None:
            plan.env["SKULK_MODELS_DIR"] = str(models_dir)
        plan.env.update((per_node_env or {}).get(plan.index, {}))
    cluster = LocalCluster(plans, log_dir=base / "logs")
    cluster.start()
    try:
        if wait:
            cluster.wait_ready(timeout_s=90)
        yield cluster
    finally:
        codes = cluster.stop()
        cluster.exit_codes = codes  # type: ignore[attr-defined]


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


def wait_for(what: str, fn: Callable[[], T | None], timeout_s: float, interval_s: float = 0.1) -> T:
    """Poll ``fn`` until it returns something truthy; raise with ``what`` on timeout.

    Exceptions from ``fn`` (a node not answering yet) count as "not yet".
    """
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            value = fn()
            if value:
                return value
            last = value
        except Exception as exc:  # noqa: BLE001 - polling a system that is still starting
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}; last: {last!r}")
        time.sleep(interval_s)


def sessions(cluster: LocalCluster, nodes: list[str] | None = None) -> dict[str, Any]:
    """Each node's current session as its /state reports it."""
    return {n: get(cluster, n, "/state").get("session") for n in (nodes or cluster.alive())}


def masters(cluster: LocalCluster, nodes: list[str] | None = None) -> set[str]:
    """Who each live node believes is master (from /state)."""
    return {s["master"] if s else "" for s in sessions(cluster, nodes).values()}
