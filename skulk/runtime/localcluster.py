"""Several real node processes on one machine, for trying a cluster and for tests.

Theory of operation
-------------------
``plan_local_cluster`` assigns each node of an N-node loopback cluster:

- its own data directory (``<base>/node-<i>``) and a shared models directory
  (``<base>/models``: the default model is generated once);
- its own API port (``api_base_port + i``) and zenoh port
  (``zenoh_base_port + i``), every other node's zenoh endpoint as bootstrap
  peer, multicast scouting off;
- its own loopback address ``127.0.0.<i+1>`` (Linux: every ``127/8``
  address is local), advertised as its only interface, with the API bound
  there: each node is reached at an address of its own, as on separate
  machines, so link probes, observed connections and ring hops name the
  right node (elsewhere every node shares ``127.0.0.1``);
- one cluster key shared by all (generated into ``<base>/cluster.key``).

``LocalCluster`` starts the processes (``python -m skulk.cli``), waits until
each answers ``GET /node_id``, and stops them (SIGTERM, then SIGKILL), always
reaping. It is used by ``skulk cluster up``.

``loopback_cluster`` is the same launcher for tests and reliability runs:
random free ports (checked by binding), a private namespace, quicker-than-
default timings (``FAST_ENV``) and no auto-placement, so runs never meet each
other or a cluster the operator has running. ``wait_for`` polls a condition.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from skulk.runtime import auth

__all__ = [
    "NodePlan",
    "plan_local_cluster",
    "LocalCluster",
    "http_json",
    "FAST_ENV",
    "free_port_block",
    "wait_for",
    "wait_stable",
    "loopback_cluster",
]

T = TypeVar("T")

# Quicker-than-default timings that keep the protocol's shape (tests and
# reliability runs): membership lease 2 s, telemetry every 2 s, probes every 3 s.
FAST_ENV: dict[str, str] = {
    "SKULK_LEASE_MS": "2000",
    "SKULK_PROBE_INTERVAL_SECONDS": "3",
    "SKULK_PROBE_TIMEOUT_SECONDS": "2",
    "SKULK_TELEMETRY_INTERVAL_SECONDS": "2",
    "SKULK_RUNNER_STOP_GRACE_SECONDS": "5",
    "SKULK_LOG_LEVEL": "INFO",
}

DEFAULT_API_BASE_PORT = 52415
DEFAULT_ZENOH_BASE_PORT = 51415


@dataclass(frozen=True)
class NodePlan:
    index: int
    node_id: str
    home: Path
    api_host: str
    api_port: int
    zenoh_port: int
    env: dict[str, str] = field(default_factory=dict)
    # Run the node under this prefix (e.g. ``ip netns exec <ns>``).
    argv_prefix: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"


def plan_local_cluster(
    n: int,
    base: Path,
    *,
    api_base_port: int = DEFAULT_API_BASE_PORT,
    zenoh_base_port: int = DEFAULT_ZENOH_BASE_PORT,
    namespace: str = "local",
    cluster_key: str | None = None,
    node_prefix: str = "local",
    extra_env: Mapping[str, str] | None = None,
    distinct_addresses: bool = sys.platform.startswith("linux"),
) -> list[NodePlan]:
    """The settings of each node of an ``n``-node cluster on this machine."""
    assert 1 <= n <= 200, n
    base.mkdir(parents=True, exist_ok=True)
    if cluster_key is None:
        _, cluster_key, _ = auth.load_or_create_secret(base)
    plans: list[NodePlan] = []
    hosts = [f"127.0.0.{i + 1}" if distinct_addresses else "127.0.0.1" for i in range(n)]
    endpoints = [f"tcp/{hosts[i]}:{zenoh_base_port + i}" for i in range(n)]
    for i in range(n):
        env = {
            "SKULK_HOME": str(base / f"node-{i + 1}"),
            "SKULK_MODELS_DIR": str(base / "models"),
            "SKULK_NODE_ID": f"{node_prefix}-{i + 1}",
            "SKULK_FRIENDLY_NAME": f"{node_prefix}-{i + 1}",
            "SKULK_NAMESPACE": namespace,
            "SKULK_CLUSTER_KEY": cluster_key,
            "SKULK_API_HOST": hosts[i],
            "SKULK_API_PORT": str(api_base_port + i),
            "SKULK_LISTEN": endpoints[i],
            "SKULK_BOOTSTRAP_PEERS": ",".join(e for j, e in enumerate(endpoints) if j != i),
            "SKULK_MULTICAST": "0",
            "SKULK_ADVERTISE": f"{hosts[i]}=ethernet",
        }
        env.update(extra_env or {})
        plans.append(
            NodePlan(
                index=i,
                node_id=env["SKULK_NODE_ID"],
                home=Path(env["SKULK_HOME"]),
                api_host=hosts[i],
                api_port=api_base_port + i,
                zenoh_port=zenoh_base_port + i,
                env=env,
            )
        )
    return plans


def http_json(url: str, *, method: str = "GET", body: Any = None, timeout_s: float = 5.0) -> Any:
    """A JSON request with the standard library; raises ``urllib.error.URLError`` on failure.

    HTTP error statuses return their decoded JSON body under ``{"_status": code, ...}``.
    """
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read().decode() or "null")
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read().decode() or "{}")
        except ValueError:
            payload = {}
        if isinstance(payload, dict):
            payload["_status"] = exc.code
            return payload
        return {"_status": exc.code, "body": payload}


class LocalCluster:
    """Start, wait for, and stop the node processes of ``plans``."""

    def __init__(
        self,
        plans: list[NodePlan],
        *,
        python: str | None = None,
        log_dir: Path | None = None,
        stdout: IO[Any] | int | None = None,
        fetch: Callable[[NodePlan, str], Any] | None = None,
    ) -> None:
        self.plans = plans
        self.fetch = fetch or (lambda plan, path: http_json(plan.url + path, timeout_s=2.0))
        self.python = python or sys.executable
        self.log_dir = log_dir
        self.stdout = stdout
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[Any]] = {}

    def start(self, node_id: str | None = None) -> None:
        """Start every node (or only ``node_id``, e.g. to restart it)."""
        for plan in self.plans:
            if node_id is not None and plan.node_id != node_id:
                continue
            proc = self.procs.get(plan.node_id)
            assert proc is None or proc.poll() is not None, f"{plan.node_id} is already running"
            env = dict(os.environ)
            env.update(plan.env)
            out: IO[Any] | int | None = self.stdout
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                old = self._logs.pop(plan.node_id, None)
                if old is not None:
                    old.close()
                f = open(self.log_dir / f"{plan.node_id}.log", "ab")
                self._logs[plan.node_id] = f
                out = f
            self.procs[plan.node_id] = subprocess.Popen(
                [*plan.argv_prefix, self.python, "-m", "skulk.cli", "run"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
            )

    def plan(self, node_id: str) -> NodePlan:
        return next(p for p in self.plans if p.node_id == node_id)

    def alive(self) -> list[str]:
        return [p.node_id for p in self.plans if (pr := self.procs.get(p.node_id)) is not None and pr.poll() is None]

    def _log_tail(self, node: str, lines: int = 25) -> str:
        """The last ``lines`` of ``node``'s log, for an error message ('' without a log dir)."""
        if self.log_dir is None:
            return ""
        path = self.log_dir / f"{node}.log"
        try:
            tail = path.read_bytes().decode("utf-8", "replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"; the end of {path}:\n" + "\n".join(f"  | {line}" for line in tail)

    def wait_ready(self, timeout_s: float = 60.0, nodes: list[str] | None = None) -> None:
        """Wait until every (given) node answers ``GET /healthz`` with its own id (no API key needed)."""
        deadline = time.monotonic() + timeout_s
        pending = list(nodes or self.alive())
        last: dict[str, str] = {}
        while pending:
            for node in list(pending):
                proc = self.procs[node]
                if proc.poll() is not None:
                    raise RuntimeError(f"node {node} exited with code {proc.returncode} while starting"
                                       f"{self._log_tail(node)}")
                try:
                    health = self.fetch(self.plan(node), "/healthz")
                    if isinstance(health, dict) and health.get("node_id") == node:
                        pending.remove(node)
                    else:
                        last[node] = f"answered {health!r:.200}"
                except (OSError, http.client.HTTPException, ValueError, subprocess.SubprocessError) as e:
                    last[node] = f"{type(e).__name__}: {e}"
            if pending and time.monotonic() > deadline:
                # Say what the probe saw: a node whose log says "up" but whose API cannot be
                # reached points at the network (an address taken twice), not at the node.
                seen = "; ".join(f"{n} at {self.plan(n).url}: {last.get(n, 'no answer')}" for n in pending)
                raise TimeoutError(f"nodes {pending} did not answer within {timeout_s:g} s ({seen})"
                                   f"{self._log_tail(pending[0])}")
            if pending:
                time.sleep(0.1)

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> float:
        """Send ``sig`` to a node (default ``kill -9``); returns the wall time it was sent."""
        proc = self.procs[node_id]
        at = time.time()
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait(10)
        return at

    def stop(self, timeout_s: float = 20.0) -> dict[str, int]:
        """SIGTERM every node, SIGKILL stragglers after ``timeout_s``; always reaps."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int] = {}
        for node, proc in self.procs.items():
            try:
                codes[node] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[node] = proc.wait(10)
        for f in self._logs.values():
            f.close()
        self._logs.clear()
        return codes

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- launching throwaway clusters (tests, reliability runs) -------------------------


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(n: int, hosts: list[str], *, low: int = 20_000, high: int = 45_000) -> int:
    """A base port such that ``base .. base+n-1`` are free on every host in ``hosts``."""
    assert n >= 1 and low < high - n
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - n)
        if all(_free(h, base + i) for h in hosts for i in range(n)):
            return base
    raise RuntimeError(f"no block of {n} free ports found in {low}..{high}")


def wait_stable(what: str, fn: Callable[[], T | None], timeout_s: float, hold_s: float = 1.5,
                interval_s: float = 0.1) -> T:
    """Like ``wait_for``, but the same truthy value must hold for ``hold_s``.

    For answers a cluster may still revise: a master the nodes agree on can be
    replaced moments later, when a node that just joined settles its peer set
    and campaigns (0.2 s settle delay plus the campaign).
    """
    deadline = time.monotonic() + timeout_s

    def held() -> T | None:
        first = fn()
        if not first:
            return None
        until = time.monotonic() + hold_s
        while time.monotonic() < until:
            time.sleep(interval_s)
            if fn() != first:
                return None
        return first

    return wait_for(what, held, max(deadline - time.monotonic(), interval_s), interval_s)


def wait_for(what: str, fn: Callable[[], T | None], timeout_s: float, interval_s: float = 0.1) -> T:
    """Poll ``fn`` until it returns something truthy; ``TimeoutError`` naming ``what`` otherwise.

    Exceptions from ``fn`` (a node still starting) count as "not yet".
    """
    assert timeout_s > 0 and interval_s > 0
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


@contextmanager
def loopback_cluster(
    base: Path,
    n: int,
    *,
    models_dir: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
    per_node_env: Mapping[int, Mapping[str, str]] | None = None,
    wait: bool = True,
    ready_timeout_s: float = 90.0,
) -> Iterator[LocalCluster]:
    """Start ``n`` real nodes on loopback (127.0.0.1..n), yield the cluster, always stop it.

    Every node gets ``FAST_ENV``, ``SKULK_AUTO_PLACE=none`` (the caller places
    what it needs), then ``extra_env``, then its own ``per_node_env[index]``.
    After the block, ``cluster.exit_codes`` holds each node's exit code.
    """
    assert 1 <= n <= 16, n
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
            cluster.wait_ready(timeout_s=ready_timeout_s)
        yield cluster
    finally:
        cluster.exit_codes = cluster.stop()  # type: ignore[attr-defined]
