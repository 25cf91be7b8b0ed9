"""Real node processes for the reliability runs: start, query, place, kill, read disk logs.

Theory of operation
-------------------
``RealCluster`` wraps ``skulk.runtime.localcluster.LocalCluster`` (the same
launcher as ``skulk cluster up``) with what the reliability runs need: the
replicated state of any node, "one agreed master", placing a model and
waiting for its runners, ``kill -9``, and every node's disk event log (the
master's authoritative record of what it indexed, used for events-per-request
counts and for the sim-to-real trace).

``loopback_cluster`` starts N nodes on ``127.0.0.1..N`` with random free
ports, a private namespace and no multicast, so runs never meet each other
or a cluster the operator has running; the caller gets a ``RealCluster``
and the nodes are always stopped. A cluster in network namespaces is built
by the caller (``loadtests/netns.py``) and wrapped the same way.

Everything here is plain blocking code (``urllib``/``httpx``) meant to be
called from a test or a command-line run, never from the node's loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skulk.core.events import IndexedEvent
from skulk.core.session import Session
from skulk.engine.models import TINY_MODEL_ID, ensure_model
from skulk.runtime.eventlog import Entry, iter_segments, read_segment
from skulk.runtime.localcluster import (
    FAST_ENV,
    LocalCluster,
    NodePlan,
    free_port_block,
    http_json,
    wait_for,
    wait_stable,
)
from skulk.runtime.localcluster import loopback_cluster as start_loopback

__all__ = [
    "FAST_ENV",
    "RealCluster",
    "LoggedEvent",
    "loopback_cluster",
    "free_port_block",
    "models_dir",
    "wait_for",
]

def models_dir(root: Path) -> Path:
    """A models directory holding the embedded default model (generated once, about 2 s)."""
    models = root / "models"
    ensure_model(TINY_MODEL_ID, root=models)
    return models


@dataclass(frozen=True)
class LoggedEvent:
    """One entry of a node's disk event log: ``indexed`` at its index of ``session``."""

    writer: str
    session: Session
    indexed: IndexedEvent


class RealCluster:
    """Queries and faults for the node processes of a started ``LocalCluster``."""

    def __init__(self, local: LocalCluster, base: Path) -> None:
        self.local = local
        self.base = base
        self.killed: dict[str, float] = {}
        self.started_at = time.time()

    # --- identity -------------------------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        return [p.node_id for p in self.local.plans]

    def plan(self, node: str) -> NodePlan:
        return self.local.plan(node)

    def url(self, node: str) -> str:
        return self.plan(node).url

    def alive(self) -> list[str]:
        return self.local.alive()

    # --- HTTP ----------------------------------------------------------------------

    def get(self, node: str, path: str, timeout_s: float = 5.0) -> Any:
        return http_json(self.url(node) + path, timeout_s=timeout_s)

    def post(self, node: str, path: str, body: Any, timeout_s: float = 30.0) -> Any:
        return http_json(self.url(node) + path, method="POST", body=body, timeout_s=timeout_s)

    def state(self, node: str) -> dict[str, Any]:
        state = self.get(node, "/state")
        assert isinstance(state, dict) and "instances" in state, f"{node}: /state answered {str(state)[:200]}"
        return state

    def metric(self, node: str, name: str) -> float | None:
        """One unlabelled value from a node's ``/metrics``; None when absent."""
        import urllib.request

        with urllib.request.urlopen(self.url(node) + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    # --- cluster facts ----------------------------------------------------------------

    def session(self, node: str) -> tuple[int, str] | None:
        """``node``'s election session (clock, master) from its diagnostics; None before one."""
        rt = self.get(node, "/v1/diagnostics/node")["runtime"]
        if rt.get("masterNodeId") is None or rt.get("sessionClock") is None:
            return None
        return int(rt["sessionClock"]), str(rt["masterNodeId"])

    def one_master(self, among: list[str] | None = None, *, not_: str | None = None) -> str | None:
        """The master every node in ``among`` (default: the live ones) agrees on, else None.

        Agreement is on the election session and on the applied state's session
        (the master's event 0 reached everyone). ``not_``: a master to ignore
        (a killed one the others have not yet noticed).
        """
        nodes = among or self.alive()
        sessions = [self.session(n) for n in nodes]
        applied = [self.state(n)["session"] for n in nodes]
        if any(s is None for s in sessions) or len(set(sessions)) != 1:
            return None
        clock, master = sessions[0]  # type: ignore[misc]
        if master == not_ or any(a is None or (a["clock"], a["master"]) != (clock, master) for a in applied):
            return None
        return master

    def wait_master(self, among: list[str] | None = None, timeout_s: float = 40.0, *, not_: str | None = None,
                    hold_s: float | None = None) -> str:
        """The master every node in ``among`` follows, once that answer has held for ``hold_s``.

        The hold (default 1.5 s when waiting for the first master, none after a
        kill) covers a node that joined just after a session formed: its peers
        settle and campaign again moments later, and may pick another master.
        """
        hold = (1.5 if not_ is None else 0.0) if hold_s is None else hold_s
        if hold <= 0:
            return wait_for("one agreed master", lambda: self.one_master(among, not_=not_), timeout_s)
        return wait_stable("one settled master", lambda: self.one_master(among, not_=not_), timeout_s, hold)

    def agreed_index(self) -> int | None:
        """The last index every live node applied, when all are in one session at the same index."""
        states = [self.state(n) for n in self.alive()]
        keys = {(None if s["session"] is None else (s["session"]["clock"], s["session"]["master"]), s["lastIndex"])
                for s in states}
        if len(keys) != 1:
            return None
        (session, index), = keys
        return None if session is None else int(index)

    def wait_replicated(self, timeout_s: float = 20.0) -> int:
        """Until every live node applied the same prefix (replication is not stuck); that index."""
        return wait_for("every node at the same index", lambda: (i := self.agreed_index()) is not None and i + 1, timeout_s,
                        0.05) - 1

    def wait_memory_known(self, timeout_s: float = 40.0) -> None:
        """Until every live node's state holds every node's memory (placement needs it)."""
        nodes = self.alive()
        wait_for("every node's memory in every state",
                 lambda: all(len(self.state(n)["nodeMemory"]) >= len(nodes) for n in nodes), timeout_s)

    def place(self, model_id: str, *, via: str, excluded: tuple[str, ...] | list[str] = (), min_nodes: int = 1) -> str:
        """``POST /place_instance`` through ``via``; the new instance id (AssertionError if refused)."""
        body = {"model_id": model_id, "excluded_nodes": list(excluded), "min_nodes": min_nodes}
        placed = self.post(via, "/place_instance", body)
        assert isinstance(placed, dict) and "instance_id" in placed, f"placement refused: {placed}"
        return str(placed["instance_id"])

    def runner_statuses(self, node: str, instance_id: str) -> dict[str, str] | None:
        """{runner id: status name} of ``instance_id`` in ``node``'s state; None if not placed."""
        state = self.state(node)
        wrapped = state["instances"].get(instance_id)
        if wrapped is None:
            return None
        body = next(iter(wrapped.values()))
        runners = body["shardAssignments"]["nodeToRunner"].values()
        return {r: next(iter(state["runners"].get(r, {"RunnerUnknown": {}}))) for r in runners}

    def hosting_nodes(self, node: str, instance_id: str) -> list[str]:
        wrapped = self.state(node)["instances"][instance_id]
        return sorted(next(iter(wrapped.values()))["shardAssignments"]["nodeToRunner"])

    def wait_ready(self, instance_id: str, *, via: str, timeout_s: float = 120.0) -> None:
        def ready() -> bool:
            statuses = self.runner_statuses(via, instance_id)
            return bool(statuses) and all(s in ("RunnerReady", "RunnerRunning") for s in statuses.values())  # type: ignore[union-attr]

        wait_for(f"instance {instance_id} ready on {via}", ready, timeout_s, 0.1)

    # --- faults ----------------------------------------------------------------------

    def kill(self, node: str) -> float:
        """``kill -9`` ``node``; the wall-clock time the signal was sent."""
        at = self.local.kill(node)
        self.killed[node] = at
        return at

    # --- disk logs -----------------------------------------------------------------------

    def disk_log(self, node: str) -> list[LoggedEvent]:
        """Every entry in ``node``'s disk event log (every session it led), in write order."""
        directory = self.plan(node).home / "eventlog"
        out: list[LoggedEvent] = []
        for segment in iter_segments(directory):
            for record in read_segment(segment).records:
                if isinstance(record, Entry):
                    out.append(LoggedEvent(node, record.session, record.indexed))
        return out

    def disk_logs(self) -> list[LoggedEvent]:
        """Every node's disk log, one entry per (session, index), ordered by session then index."""
        seen: dict[tuple[Session, int], LoggedEvent] = {}
        for node in self.nodes:
            for entry in self.disk_log(node):
                seen.setdefault((entry.session, entry.indexed.index), entry)
        return [seen[k] for k in sorted(seen, key=lambda k: (k[0].clock, k[0].master, k[1]))]


@contextmanager
def loopback_cluster(
    base: Path,
    n: int,
    *,
    models: Path | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 90.0,
) -> Iterator[RealCluster]:
    """Start ``n`` real nodes on loopback (127.0.0.1..n), yield them, always stop them.

    ``env`` is added to every node's environment (after ``FAST_ENV`` and
    ``SKULK_AUTO_PLACE=none``: the run places what it needs itself).
    """
    with start_loopback(base, n, models_dir=models, extra_env=env, ready_timeout_s=ready_timeout_s) as local:
        yield RealCluster(local, base)
