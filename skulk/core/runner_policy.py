"""Runner supervision policy: lifecycle, crash breaker, deadlines, memory guard, removal order.

Theory of operation
-------------------
Everything here is a pure decision the worker (or master) asks for, with time
passed in as ``now``; nothing here starts, stops or waits for anything.

- **Lifecycle.** ``TRANSITIONS`` is the table of legal runner state changes
  (h11 style); ``check_transition`` validates a reported status against the
  previous one and ``transitions_markdown`` renders the same table for the
  docs, so code and docs cannot drift.
- **Crash breaker** (per instance). Each unexpected exit is recorded; the
  answer is ``Restart(after_s)`` with exponential backoff, or ``GiveUp``. The
  breaker is *edge-triggered*: when 3 failures fall within 60 s it trips and
  answers ``GiveUp(tripped_now=True)`` exactly once; every later exit of the
  same crash loop gets ``GiveUp(tripped_now=False)`` so nobody reports the
  failure twice. It re-arms after a quiet period with no exit, or when a
  runner of the instance becomes ready. Exit code 86 means a wedged GPU: never
  retried, and it does not re-arm by itself.
- **Deadlines.** A started runner must report within 120 s; a connecting one
  must finish group connect within its deadline; a loaded or warming-up one
  must be ready within 300 s. Group connect is the runner's own deadline (it
  reports ``RunnerFailed`` with a diagnosis naming the unreachable rank); the
  worker's deadline is a backstop ``GROUP_CONNECT_REPORT_GRACE_S`` later, so
  that diagnosis arrives first instead of racing a bare "did not connect".
- **Pre-spawn memory guard.** Before starting a runner, the worker checks the
  instance's stamped footprint for this node against the node's usable memory
  now, less what other not-yet-loaded instances there have reserved (the same
  accounting as placement: ``skulk.core.memory``).
- **Removal order.** ``TaskFailed`` for every in-flight task of an instance is
  indexed before the event that removes the instance (or its node), then
  ``TaskDeleted``, then ``InstanceDeleted`` (and ``NodeTimedOut`` last).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from skulk.core.config import CoreConfig
from skulk.core.events import Event, InstanceDeleted, NodeTimedOut, TaskDeleted, TaskFailed
from skulk.core.ids import InstanceId, NodeId
from skulk.core.instances import (
    Instance,
    RunnerConnected,
    RunnerConnecting,
    RunnerFailed,
    RunnerIdle,
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerShutdown,
    RunnerShuttingDown,
    RunnerStatus,
    RunnerWarmingUp,
)
from skulk.core.memory import describe_shortfall, format_gb, reserved_bytes, shard_footprint, shard_share, usable_bytes
from skulk.core.cards import ModelCard
from skulk.core.telemetry import MemoryInfo
from skulk.core.records import Record
from skulk.core.state import State

__all__ = [
    "WEDGE_EXIT_CODE",
    "GROUP_CONNECT_REPORT_GRACE_S",
    "RunnerState",
    "TRANSITIONS",
    "state_of",
    "check_transition",
    "transitions_markdown",
    "BreakerPolicy",
    "Restart",
    "GiveUp",
    "Decision",
    "CrashBreaker",
    "Deadline",
    "deadline_for",
    "prespawn_guard",
    "instance_removal_events",
    "node_removal_events",
]

WEDGE_EXIT_CODE = 86  # the runner's own exit code when its GPU made no progress past a deadline
# The runner enforces the group-connect deadline itself and then probes every
# other rank (1 s each, up to 15 of them) to name the unreachable one; the
# worker's backstop waits this much longer so that report is not pre-empted.
GROUP_CONNECT_REPORT_GRACE_S = 20.0


# --- lifecycle ------------------------------------------------------------------------------


class RunnerState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    LOADING = "loading"
    LOADED = "loaded"
    WARMING_UP = "warming up"
    READY = "ready"
    RUNNING = "running"
    SHUTTING_DOWN = "shutting down"
    SHUT_DOWN = "shut down"
    FAILED = "failed"


_STATUS_STATE: dict[type, RunnerState] = {
    RunnerIdle: RunnerState.IDLE,
    RunnerConnecting: RunnerState.CONNECTING,
    RunnerConnected: RunnerState.CONNECTED,
    RunnerLoading: RunnerState.LOADING,
    RunnerLoaded: RunnerState.LOADED,
    RunnerWarmingUp: RunnerState.WARMING_UP,
    RunnerReady: RunnerState.READY,
    RunnerRunning: RunnerState.RUNNING,
    RunnerShuttingDown: RunnerState.SHUTTING_DOWN,
    RunnerShutdown: RunnerState.SHUT_DOWN,
    RunnerFailed: RunnerState.FAILED,
}

S = RunnerState
_STOP = (S.SHUTTING_DOWN, S.FAILED)
# (from, to, why): the only legal changes besides repeating a state (progress,
# task counts, duplicate reports). None as "from" is a runner's first report.
TRANSITIONS: tuple[tuple[RunnerState | None, RunnerState, str], ...] = (
    (None, S.IDLE, "process started"),
    (None, S.CONNECTING, "process started, joining its group at once"),
    (None, S.LOADING, "process started, single rank (no group)"),
    (None, S.FAILED, "process failed before its first report"),
    (S.IDLE, S.CONNECTING, "joining the ring group"),
    (S.IDLE, S.LOADING, "single rank: no group to join"),
    (S.CONNECTING, S.CONNECTED, "every rank reached"),
    (S.CONNECTED, S.LOADING, "loading its shard"),
    (S.LOADING, S.LOADED, "weights in memory"),
    (S.LOADED, S.WARMING_UP, "first forward passes"),
    (S.WARMING_UP, S.READY, "serving"),
    (S.READY, S.RUNNING, "a task started"),
    (S.RUNNING, S.READY, "no task left"),
    (S.FAILED, S.IDLE, "restarted by the crash breaker"),
    (S.FAILED, S.CONNECTING, "restarted by the crash breaker"),
    (S.FAILED, S.LOADING, "restarted by the crash breaker"),
    (S.SHUTTING_DOWN, S.SHUT_DOWN, "process exited cleanly"),
) + tuple(
    (src, dst, "stopped" if dst is S.SHUTTING_DOWN else "crashed, wedged or missed a deadline")
    for src in (S.IDLE, S.CONNECTING, S.CONNECTED, S.LOADING, S.LOADED, S.WARMING_UP, S.READY, S.RUNNING)
    for dst in _STOP
) + ((S.SHUTTING_DOWN, S.FAILED, "failed while stopping"),)

_LEGAL: frozenset[tuple[RunnerState | None, RunnerState]] = frozenset((a, b) for a, b, _ in TRANSITIONS)
assert len(_LEGAL) == len(TRANSITIONS), "a transition is listed twice"


def state_of(status: RunnerStatus) -> RunnerState:
    """The lifecycle state a status record stands for."""
    return _STATUS_STATE[type(status)]


def check_transition(previous: RunnerStatus | None, new: RunnerStatus) -> str | None:
    """None when going from ``previous`` (None: no report yet) to ``new`` is legal; else why not."""
    old = None if previous is None else state_of(previous)
    dst = state_of(new)
    if old is dst or (old, dst) in _LEGAL:
        return None
    legal = sorted(b.value for a, b in _LEGAL if a is old)
    name = "no report" if old is None else old.value
    return f"illegal runner transition {name} -> {dst.value}; from {name} a runner may go to {legal}"


def transitions_markdown() -> str:
    """The transition table as Markdown (docs/placement.md embeds exactly this)."""
    # Rows that share a destination and a reason collapse into one line.
    rows: dict[tuple[RunnerState, str], list[str]] = {}
    for src, dst, why in TRANSITIONS:
        rows.setdefault((dst, why), []).append("(start)" if src is None else src.value)
    lines = ["| from | to | when |", "|---|---|---|"]
    lines += [f"| {', '.join(srcs)} | {dst.value} | {why} |" for (dst, why), srcs in rows.items()]
    return "\n".join(lines) + "\n"


# --- crash breaker ----------------------------------------------------------------------------


class BreakerPolicy(Record, frozen=True, kw_only=True):
    """Crash breaker knobs (Skulk's published defaults)."""

    failures_to_trip: int = 3  # failures within window_s that make a crash loop
    window_s: float = 60.0
    rearm_quiet_s: float = 60.0  # no exit for this long after a trip re-arms the breaker
    backoff_first_s: float = 1.0  # restart delay after the first failure, doubled after each
    backoff_max_s: float = 8.0  # kept short so a crash-on-load loop trips within window_s


class Restart(Record, frozen=True, kw_only=True):
    """Restart the runner after ``after_s`` seconds."""

    after_s: float
    failures_in_window: int


class GiveUp(Record, frozen=True, kw_only=True):
    """Do not restart. ``tripped_now``: this exit tripped the breaker (report it, loudly, once)."""

    reason: str
    tripped_now: bool
    wedged: bool = False


Decision = Restart | GiveUp


@dataclass
class _Loop:
    failures: deque[float] = field(default_factory=deque)
    exit_codes: deque[int] = field(default_factory=deque)
    tripped: bool = False
    wedged: bool = False
    reason: str = ""
    last_exit_at: float = float("-inf")


class CrashBreaker:
    """Per-instance crash circuit breaker; edge-triggered (see module docstring).

    Call ``record_exit`` for every unexpected runner exit (not for exits the
    worker asked for), ``record_ready`` when a runner of the instance becomes
    ready, ``forget`` when the instance is deleted. Memory is bounded by the
    number of live instances times ``failures_to_trip``.
    """

    def __init__(self, policy: BreakerPolicy | None = None) -> None:
        self.policy = policy if policy is not None else BreakerPolicy()
        assert self.policy.failures_to_trip >= 1 and self.policy.window_s > 0, self.policy
        self._loops: dict[InstanceId, _Loop] = {}

    def record_exit(self, now: float, instance_id: InstanceId, exit_code: int) -> Decision:
        loop = self._loops.setdefault(instance_id, _Loop())
        assert now >= loop.last_exit_at, f"time went backwards for {instance_id}: {now} < {loop.last_exit_at}"
        if loop.tripped and not loop.wedged and now - loop.last_exit_at >= self.policy.rearm_quiet_s:
            loop = self._loops[instance_id] = _Loop()  # a quiet period ends the loop
        loop.last_exit_at = now
        if loop.tripped:
            return GiveUp(reason=loop.reason, tripped_now=False, wedged=loop.wedged)
        if exit_code == WEDGE_EXIT_CODE:
            loop.tripped = loop.wedged = True
            loop.reason = (
                f"runner exited with code {WEDGE_EXIT_CODE}: its GPU wedged (no progress past its deadline); "
                "wedged runners are never restarted"
            )
            return GiveUp(reason=loop.reason, tripped_now=True, wedged=True)
        while loop.failures and now - loop.failures[0] >= self.policy.window_s:
            loop.failures.popleft()
            loop.exit_codes.popleft()
        loop.failures.append(now)
        loop.exit_codes.append(exit_code)
        count = len(loop.failures)
        assert count <= self.policy.failures_to_trip
        if count >= self.policy.failures_to_trip:
            loop.tripped = True
            codes = ", ".join(str(c) for c in loop.exit_codes)
            loop.reason = (
                f"crash loop: {count} failures within {self.policy.window_s:g} s (exit codes {codes}); "
                "not restarting until the instance is re-placed"
            )
            return GiveUp(reason=loop.reason, tripped_now=True)
        after = min(self.policy.backoff_first_s * 2 ** (count - 1), self.policy.backoff_max_s)
        return Restart(after_s=after, failures_in_window=count)

    def record_ready(self, now: float, instance_id: InstanceId) -> None:
        """A runner of ``instance_id`` is serving: the crash loop (if any) is over."""
        self._loops.pop(instance_id, None)

    def forget(self, instance_id: InstanceId) -> None:
        """The instance is gone; drop its history."""
        self._loops.pop(instance_id, None)

    def is_tripped(self, now: float, instance_id: InstanceId) -> bool:
        """True while ``instance_id`` is given up on (a wedge, or a loop not yet quiet)."""
        loop = self._loops.get(instance_id)
        if loop is None or not loop.tripped:
            return False
        return loop.wedged or now - loop.last_exit_at < self.policy.rearm_quiet_s


# --- deadlines ----------------------------------------------------------------------------------


class Deadline(Record, frozen=True, kw_only=True):
    """When a runner in some state must have moved on, and what to say if it has not."""

    kind: Literal["first_report", "group_connect", "warmup"]
    at: float
    message: str


def deadline_for(state: RunnerState | None, entered_at: float, config: CoreConfig) -> Deadline | None:
    """The deadline of a runner that entered ``state`` (None: started, no report yet) at ``entered_at``.

    Started or idle: first report (``first_report_deadline_s``, 120 s).
    Connecting or connected: group connect (``group_connect_deadline_s``),
    plus ``GROUP_CONNECT_REPORT_GRACE_S`` for the runner's own diagnosis.
    Loaded or warming up: warmup (``warmup_deadline_s``, 300 s). Loading
    has no deadline here (big models load slowly; the runner's own wedge
    detection covers a stuck load); serving and terminal states none.
    """
    if state is None or state is S.IDLE:
        limit, kind, what = config.first_report_deadline_s, "first_report", "report progress"
    elif state in (S.CONNECTING, S.CONNECTED):
        limit, kind, what = config.group_connect_deadline_s, "group_connect", "complete group connect"
        assert limit > 0, (kind, limit)
        return Deadline(
            kind=kind,
            at=entered_at + limit + GROUP_CONNECT_REPORT_GRACE_S,
            message=(
                f"runner did not {what} within {limit:g} s, nor report why within "
                f"{GROUP_CONNECT_REPORT_GRACE_S:g} s more"
            ),
        )
    elif state in (S.LOADED, S.WARMING_UP):
        limit, kind, what = config.warmup_deadline_s, "warmup", "become ready"
    else:
        return None
    assert limit > 0, (kind, limit)
    return Deadline(kind=kind, at=entered_at + limit, message=f"runner did not {what} within {limit:g} s")


# --- pre-spawn memory guard ----------------------------------------------------------------------


def prespawn_guard(
    state: State, instance: Instance, node_id: NodeId, mem: MemoryInfo | None, card: ModelCard | None = None
) -> str | None:
    """None when this node may start ``instance``'s runner now; else the refusal, with arithmetic.

    Need: the footprint placement stamped for this node (``memory_by_node``).
    Room: ``usable_bytes(mem)`` (fresh local telemetry) less the reservations
    of *other* instances on this node whose runners have not loaded (they will
    take memory telemetry does not show yet). With a ``card`` the message
    breaks the footprint down into weights, KV and headroom.
    """
    assert node_id in instance.shard_assignments.node_to_runner, f"{node_id} does not host {instance.instance_id}"
    if mem is None:
        return f"node {node_id} has no memory reading yet; not starting a runner for {instance.instance_id}"
    need = instance.memory_by_node.get(node_id, 0)
    others = reserved_bytes(state, node_id, ignore={instance.instance_id})
    room = usable_bytes(mem) - others
    if need <= room:
        return None
    if card is not None:
        shard = instance.shard_assignments.runner_to_shard[instance.shard_assignments.node_to_runner[node_id]]
        text = describe_shortfall(node_id, shard_footprint(card, shard_share(shard)), room)
    else:
        text = f"node {node_id} needs ~{format_gb(need)} but can use {format_gb(max(0, room))}"
    if others:
        text += f" ({format_gb(others)} reserved for other instances still loading)"
    return f"pre-spawn memory guard: {text}"


# --- removal order ------------------------------------------------------------------------------


def instance_removal_events(state: State, instance_id: InstanceId, reason: str) -> list[Event]:
    """Events that remove an instance: TaskFailed for in-flight tasks, TaskDeleted, InstanceDeleted.

    Tasks are taken in task-id order. Tasks already failed get no second
    ``TaskFailed``. Applying the result in order never trips ``apply``'s
    assertion that no in-flight task survives its instance.
    """
    assert instance_id in state.instances, f"unknown instance {instance_id}"
    tasks = [state.tasks[t] for t in sorted(state.tasks) if state.tasks[t].instance_id == instance_id]
    events: list[Event] = [
        TaskFailed(task_id=t.task_id, error_message=f"instance {instance_id} was removed: {reason}")
        for t in tasks
        if t.status != "failed"
    ]
    events += [TaskDeleted(task_id=t.task_id, outcome="failed") for t in tasks]
    events.append(InstanceDeleted(instance_id=instance_id, reason=reason))
    return events


def node_removal_events(state: State, node_id: NodeId, reason: str) -> list[Event]:
    """Events that remove a node: the removal of every instance it hosts, then NodeTimedOut."""
    events: list[Event] = []
    for iid in sorted(state.instances):
        if node_id in state.instances[iid].shard_assignments.node_to_runner:
            events += instance_removal_events(state, iid, f"node {node_id} removed: {reason}")
    events.append(NodeTimedOut(node_id=node_id))
    return events
