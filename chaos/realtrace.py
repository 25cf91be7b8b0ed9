"""Sim-to-real parity: the chaos checkers, unchanged, over a trace recorded from real processes.

Theory of operation
-------------------
``chaos.checkers.SafetyChecker`` watches a simulated run through hooks:
``after_step(host, node, input, effects)`` after every step (it reads the
node's acting-master session, election session and clock, and applied state;
the ``AppendLog`` effects are the master's log), plus ``node_crashed``,
``node_booted``, ``request_abandoned`` and ``request_deadline``. A real
cluster cannot be stepped, but it can be *observed*; a trace recorded from
one (``loadtests/recorder.py``) holds, as JSON lines in the core's wire
codec, records of these kinds (``t``: wall-clock seconds):

==========  ==================================================================
meta        the run: nodes, each node's RAM (``ramTotal``), free text
observe     a node's view at ``t``: its election session (``session``: clock and
            master, or null), whether it acts as master (``isMaster``) and its
            replicated state (``state``: ``GET /state``, the full ``State``)
append      one entry of a master's disk log: ``session`` and ``indexed``
            (the ``IndexedEvent``); ``t`` is the master's own stamp
crash       ``node`` was killed (kill -9) at ``t``
boot        ``node`` was (re)started at ``t``
abandoned   a client walked away from request ``commandId`` sent to ``node``
request     a generation request (``commandId``) that had to end by ``deadline``
            (open on a master that died); it ended at ``ended`` (null: never)
==========  ==================================================================

``check_trace`` replays those records in time order into one
``SafetyChecker`` with the same hooks the simulator uses: an ``append`` is
the writer's ``AppendLog`` effect, an ``observe`` is a step of that node
with a read-only view of the shape the checker reads. Appends of a session
are fed, in index order, before any observation that applied them (the
master indexed them first; wall clocks of different processes on one
machine agree, but polling is coarse). At the end, invariant 5 is checked
against the last observed state of the last master, as the harness does
after convergence.

What a recorded trace cannot show is said here rather than pretended: the
views are samples (a violation that lived between two polls is missed), and
clocks come from observations, not from the node (the election clock is the
session's). A violation found is real; "no violation" is as strong as the
sampling.

Invariants kept: the checker is the chaos package's, unchanged; this module
only adapts records to its hooks and never imports the production runtime.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skulk.core.codec import from_wire
from skulk.core.effects import AppendLog
from skulk.core.events import IndexedEvent
from skulk.core.ids import NodeId
from skulk.core.session import Session
from skulk.core.state import State

from chaos.checkers import SafetyChecker, SafetyViolation

__all__ = ["TRACE_KINDS", "RealVerdict", "read_trace", "write_trace", "check_trace"]

TRACE_KINDS = ("meta", "observe", "append", "crash", "boot", "abandoned", "request")


class _Election:
    __slots__ = ("session", "clock")

    def __init__(self, session: Session | None) -> None:
        self.session = session
        self.clock = session.clock if session is not None else 0


class _Master:
    __slots__ = ("session", "active")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.active = True


class _Replica:
    __slots__ = ("current",)

    def __init__(self, current: State | None) -> None:
        self.current = current


class _View:
    """What ``SafetyChecker.after_step`` reads of a node, from one observation."""

    __slots__ = ("master", "election", "replica")

    def __init__(self, session: Session | None, is_master: bool, state: State | None) -> None:
        self.election = _Election(session)
        self.master = _Master(session) if (is_master and session is not None) else None
        self.replica = _Replica(state if (state is not None and state.session is not None) else None)


_EMPTY_VIEW = _View(None, False, None)


class _Request:
    """The attributes ``SafetyChecker.request_deadline``/``request_abandoned`` read."""

    __slots__ = ("kind", "cid", "host", "end_deadline", "ended", "session_sent", "submitted_at")

    def __init__(self, cid: str, host: str, deadline: float | None, submitted_at: float) -> None:
        self.kind = "SubmitTask"
        self.cid = cid
        self.host = host
        self.end_deadline = deadline
        self.ended = False
        self.session_sent = None
        self.submitted_at = submitted_at


@dataclass
class RealVerdict:
    """The checkers' verdict on a real trace, and what was checked."""

    ok: bool
    invariant: int | None
    message: str
    checks: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        if self.ok:
            return (f"OK: {self.checks.get('events_indexed', 0)} indexed events, "
                    f"{self.checks.get('state_digests_compared', 0)} observed states checked")
        return f"VIOLATION of invariant {self.invariant}: {self.message}"


def read_trace(path: Path) -> list[dict[str, Any]]:
    """The records of a trace file (JSON lines); kinds are checked."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        rec = json.loads(line)
        assert rec.get("kind") in TRACE_KINDS, f"{path}:{number}: unknown record kind {rec.get('kind')!r}"
        out.append(rec)
    return out


def write_trace(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` as JSON lines, sorted by time (meta first); returns how many."""
    recs = sorted(records, key=_order)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in recs:
            assert rec.get("kind") in TRACE_KINDS, rec.get("kind")
            f.write(json.dumps(rec, separators=(",", ":"), sort_keys=True) + "\n")
    return len(recs)


def _order(rec: dict[str, Any]) -> tuple[float, int, int]:
    kind = rec["kind"]
    t = float(rec.get("t", 0.0)) if kind != "meta" else float("-inf")
    # At equal times: crashes and boots before what follows them; appends before observations.
    rank = {"meta": 0, "crash": 1, "boot": 2, "append": 3, "abandoned": 4, "request": 5, "observe": 6}[kind]
    index = int(rec["indexed"]["index"]) if kind == "append" else 0
    return (t, rank, index)


def _session(wire: Any) -> Session | None:
    return None if wire is None else from_wire(Session, wire)


class _Replay:
    def __init__(self, records: list[dict[str, Any]], abandoned_events_max: int) -> None:
        self.now = 0.0
        self.checker = SafetyChecker(clock=lambda: self.now, abandoned_events_max=abandoned_events_max)
        self.views: dict[str, _View] = {}
        self.pending: dict[Session, list[tuple[float, IndexedEvent]]] = {}
        self.fed: dict[Session, int] = {}
        self.crashed: dict[str, float] = {}
        self.ends: list[tuple[float, _Request]] = []
        self.observations = 0
        self.requests_checked = 0
        self.last_deadline = 0.0
        self.last_master_state: State | None = None
        self.records = sorted(records, key=_order)
        for rec in self.records:
            if rec["kind"] == "append":
                session = from_wire(Session, rec["session"])
                self.pending.setdefault(session, []).append((float(rec["t"]), from_wire(IndexedEvent, rec["indexed"])))
        for entries in self.pending.values():
            entries.sort(key=lambda e: e[1].index)

    def feed_until(self, session: Session, index: int) -> None:
        """Feed ``session``'s log up to ``index`` (inclusive) into the checker, as its master's effects."""
        entries = self.pending.get(session, [])
        start = self.fed.get(session, 0)
        writer = str(session.master)
        while start < len(entries) and entries[start][1].index <= index:
            _, indexed = entries[start]
            self.checker.after_step(writer, self.views.get(writer, _EMPTY_VIEW), None,
                                    [AppendLog(session=session, indexed=indexed)])
            start += 1
        self.fed[session] = start

    def advance(self, t: float) -> None:
        self.now = max(self.now, t)
        while self.ends and self.ends[0][0] <= self.now:
            self.ends.pop(0)[1].ended = True
        self.checker.check_deadlines()

    def run(self) -> None:
        for rec in self.records:
            kind = rec["kind"]
            if kind == "meta":
                ram = rec.get("ramTotal") or {}
                self.checker.ram_total_bytes.update({str(k): int(v) for k, v in ram.items()})
                continue
            self.advance(float(rec["t"]))
            node = str(rec.get("node", ""))
            if kind == "append":
                session = from_wire(Session, rec["session"])
                self.feed_until(session, int(rec["indexed"]["index"]))
            elif kind == "crash":
                self.crashed[node] = self.now
                self.views.pop(node, None)
                self.checker.node_crashed(node)
            elif kind == "boot":
                self.crashed.pop(node, None)
                self.views.pop(node, None)
                self.checker.node_booted(node)
            elif kind == "abandoned":
                self.checker.request_abandoned(_Request(str(rec["commandId"]), node, None, self.now))
            elif kind == "request":
                req = _Request(str(rec["commandId"]), node, float(rec["deadline"]), float(rec.get("submitted", self.now)))
                ended = rec.get("ended")
                if ended is not None:
                    self.ends.append((float(ended), req))
                    self.ends.sort(key=lambda e: e[0])
                self.checker.request_deadline(req)
                self.requests_checked += 1
                self.last_deadline = max(self.last_deadline, float(rec["deadline"]))
            elif kind == "observe":
                self.observe(node, rec)
        # Let every registered deadline pass: a request that never ended is a violation.
        if self.requests_checked:
            self.advance(max([self.last_deadline] + [e[0] for e in self.ends]) + 1e-6)

    def observe(self, node: str, rec: dict[str, Any]) -> None:
        state = from_wire(State, rec["state"]) if rec.get("state") is not None else None
        if state is not None and state.session is not None:
            self.feed_until(state.session, state.last_index)
        view = _View(_session(rec.get("session")), bool(rec.get("isMaster")), state)
        self.views[node] = view
        self.checker.after_step(node, view, None, [])
        self.observations += 1
        if view.master is not None and state is not None and state.session == view.master.session:
            self.last_master_state = state

    def finish(self) -> None:
        """Invariant 5 against the last master's last observed state (the converged cluster)."""
        final = self.last_master_state
        if final is None:
            return
        alive = {NodeId(n) for n in self.views if n not in self.crashed}
        self.checker.check_placements_kept(final, alive)


def check_trace(records: Iterable[dict[str, Any]], *, abandoned_events_max: int = 3) -> RealVerdict:
    """Run the chaos safety checkers over a recorded real trace; never raises for a violation.

    ``figures``: observations replayed, sessions seen, the final master
    index, requests whose deadline was checked, nodes crashed.
    """
    replay = _Replay(list(records), abandoned_events_max)
    try:
        replay.run()
        replay.finish()
    except SafetyViolation as exc:
        return RealVerdict(False, exc.invariant, str(exc), replay.checker.summary(), _figures(replay))
    return RealVerdict(True, None, "", replay.checker.summary(), _figures(replay))


def _figures(replay: _Replay) -> dict[str, Any]:
    final = replay.last_master_state
    return {
        "observations": replay.observations,
        "sessions_logged": len(replay.pending),
        "final_master_index": None if final is None else final.last_index,
        "requests_with_deadline": replay.requests_checked,
        "nodes_crashed": sorted(replay.crashed),
    }
