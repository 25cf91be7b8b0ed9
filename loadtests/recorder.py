"""Recording a real cluster run as a trace the chaos checkers can judge (``chaos.realtrace``).

Theory of operation
-------------------
A ``TraceRecorder`` thread polls every live node's ``GET /v1/diagnostics/node``
(small: election session, is-master, last applied index) every
``interval_s``; when any of those moved since the node's last observation it
fetches ``GET /state`` (the full replicated state) and keeps an ``observe``
record. The run's driver adds what only it knows: crashes and restarts it
caused, requests its clients abandoned, requests that had to end by a
deadline. ``records()`` then adds every entry of every node's disk event log
(``append`` records: the masters' own account of what they indexed, stamped
with their clocks) and a ``meta`` record (nodes, RAM).

The recorder never changes the cluster and needs nothing from the runtime
beyond its public API and its disk log.
"""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path
from typing import Any

from chaos.realtrace import write_trace
from loadtests.cluster import RealCluster
from skulk.core.codec import to_wire
from skulk.runtime.localcluster import http_json

__all__ = ["TraceRecorder"]


class TraceRecorder:
    """Polls ``cluster``'s nodes in a thread; ``stop()`` then ``write(path)``."""

    def __init__(self, cluster: RealCluster, *, interval_s: float = 0.2, timeout_s: float = 3.0) -> None:
        assert interval_s > 0 and timeout_s > 0
        self.cluster = cluster
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.observations: list[dict[str, Any]] = []
        self.notes: list[dict[str, Any]] = []
        self._last: dict[str, tuple[Any, ...]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trace-recorder", daemon=True)
        self.polls = 0
        self.poll_errors = 0
        self.started_at = 0.0

    # --- driver notes ----------------------------------------------------------------

    def note(self, kind: str, node: str, t: float | None = None, **fields: Any) -> None:
        """A record only the run's driver knows (``crash``, ``boot``, ``abandoned``, ``request``)."""
        assert kind in ("crash", "boot", "abandoned", "request"), kind
        rec = {"kind": kind, "node": node, "t": time.time() if t is None else t, **fields}
        with self._lock:
            self.notes.append(rec)
            if kind in ("crash", "boot"):
                self._last.pop(node, None)

    # --- polling ------------------------------------------------------------------------

    def start(self) -> TraceRecorder:
        self.started_at = time.time()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the trace recorder did not stop"

    def poll_once(self) -> None:
        """Observe every live node once (an observation only when its view moved)."""
        for node in self.cluster.alive():
            url = self.cluster.url(node)
            try:
                diag = http_json(url + "/v1/diagnostics/node", timeout_s=self.timeout_s)
                rt = diag["runtime"]
                key = (rt.get("masterNodeId"), rt.get("sessionClock"), rt.get("isMaster"), rt.get("lastIndex"))
                if self._last.get(node) == key:
                    continue
                state = http_json(url + "/state", timeout_s=self.timeout_s)
                assert isinstance(state, dict) and "instances" in state, str(state)[:200]
            except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError, AssertionError):
                # A node killed mid-response (IncompleteRead) is an error of this poll, not of the recorder.
                self.poll_errors += 1
                continue
            t = time.time()
            session = None
            if rt.get("masterNodeId") is not None and rt.get("sessionClock") is not None:
                session = {"clock": int(rt["sessionClock"]), "master": rt["masterNodeId"]}
            with self._lock:
                self._last[node] = key
                self.observations.append({"kind": "observe", "node": node, "t": t, "session": session,
                                          "isMaster": bool(rt.get("isMaster")), "state": state})
        self.polls += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            self.poll_once()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - began)))

    # --- the trace ------------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        """Meta, observations, driver notes and every disk-log entry, as trace records."""
        ram: dict[str, int] = {}
        for obs in self.observations:
            for node, mem in (obs["state"].get("nodeMemory") or {}).items():
                ram[node] = int(mem["ramTotal"]["inBytes"])
        meta = {"kind": "meta", "t": self.started_at, "nodes": self.cluster.nodes, "ramTotal": ram,
                "polls": self.polls, "pollErrors": self.poll_errors, "intervalS": self.interval_s}
        appends = [
            {"kind": "append", "node": e.writer, "t": e.indexed.at, "session": to_wire(e.session),
             "indexed": to_wire(e.indexed)}
            for e in self.cluster.disk_logs()
        ]
        with self._lock:
            return [meta, *self.observations, *self.notes, *appends]

    def write(self, path: Path) -> int:
        """Write the trace to ``path`` (JSON lines, time order); how many records."""
        return write_trace(path, self.records())
