"""Safety checkers: DESIGN.md section 6, checked after every simulated step.

Theory of operation
-------------------
``SafetyChecker`` watches a run through hooks: ``after_step`` (a node handled
an input and returned effects), plus lifecycle and client hooks. It works
with any driver (the simpy ``World`` or the hand-stepped ``ManualCluster``),
and every check is incremental, so running it after every step stays cheap:

1. **One master per session; sessions only move forward.** The hosts acting
   as master are indexed by session: a second one is a violation, as is a
   node acting as master of a session that names someone else. Each node's
   session and election clock never decrease within one process lifetime.
2. **Applied logs are prefixes of the master's log, dense from 0.** Every
   ``AppendLog`` effect is the master's log: the first of a session must be
   index 0, each next one the next index, from the session's master only. A
   reference replica applies that log with the core's own strict ``apply``,
   keeping a digest per index. A node's state at ``(session, i)`` must exist
   in that log.
3. **Same prefix, same state.** Whenever a node's ``(session, last index)``
   moves, its state must equal the reference replica's state at that index.
   The comparison is record equality, which is exactly equality of the
   canonical encodings (msgpack with keys and fields sorted, what
   ``canonical_digest`` hashes) but far cheaper: nodes and the reference
   share the immutable event records, so equal parts compare by identity.
   The reference keeps its last ``_WINDOW`` states and a checkpoint every
   ``_WINDOW`` indices, and recomputes an older state from its checkpoint
   when a lagging node needs it. At convergence the harness compares the
   core's own ``digest`` byte for byte.
4. **No instance beyond memory.** An ``InstanceCreated`` for a new instance
   may not put more on a hosting node than that node's usable memory as the
   master knew it (``skulk.core.memory.usable_bytes`` of its last report),
   nor more than 0.75 x the node's real RAM. A re-adopted instance (same id,
   after a failover) is held to the static bound only, since its runner's
   memory already shows in telemetry.
5. **No placement lost in a failover.** Checked once the cluster converges
   (``check_placements_kept``): an instance that at least one of its hosting
   nodes applied, never removed by an indexed ``InstanceDeleted``, whose
   hosting nodes all stayed up since, is in the converged state.
6. **Bounded events per abandoned request.** Task events indexed for an
   abandoned request never exceed ``abandoned_events_max`` in any one
   session's log, plus one when a fault failed the task (its ``TaskFailed``;
   ``TaskDeleted`` then says ``failed`` instead of ``cancelled``). (Per session: a paused master that has not yet heard it was
   deposed may still index a broadcast command into its dead session, which
   no live node follows; that costs the cluster nothing.)
7. **One context ceiling per instance.** Every rank reports ``RunnerReady``
   with the instance's stamped ceiling (checked on the runner's report and on
   the indexed status).
8. **Requests on a lost master end.** A request sent in a session its origin
   left (or whose master vanished for it) must end before its deadline
   (``Request.end_deadline``); paused origins are given their pause back,
   and a request whose origin again reaches its session's master, still
   acting in that session, is not on a dead master (liveness then requires
   it to end).
9. **A runner never loads an unverified file.** Every ``StartRunner`` a node
   emits must find, in that node's replicated state, every hosting node's
   copy of the model verified and covering its shard, and, on the host
   itself, the disk (ground truth: ``files_verified``, the simulator's
   ``SimDisk``) holding that shard's files verified. Partial bytes never count.
10. **No instance's files are evicted while it is placed.** A
   ``ModelEvictionRequested`` the master indexes may not name a node on which
   an instance of the model is placed (in the master's state before it); a
   ``DeleteFiles`` a node emits may not find an instance of the model placed
   on it in its own state, nor (ground truth: ``runners_using``) a live
   runner of the model on its host.

A violation raises ``SafetyViolation`` at once, naming the invariant, the
node and the simulated time; the driver stops and reports.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable
from typing import Any

import msgspec

from skulk.core.effects import AppendLog, DeleteFiles, StartRunner
from skulk.core.events import (
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    ModelEvictionRequested,
    RunnerStatusUpdated,
    TaskCreated,
    TaskDeleted,
    TaskFailed,
    TaskStatusUpdated,
)
from skulk.core.files import Need, covers, need_of
from skulk.core.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId, derive_id
from skulk.core.instances import Instance, RunnerReady
from skulk.core.memory import USABLE_FRACTION_OF_TOTAL, usable_bytes
from skulk.core.session import Session
from skulk.core.state import EMPTY_STATE, State, apply, hosting_nodes

__all__ = ["SafetyViolation", "SafetyChecker", "canonical_digest", "INVARIANTS"]

INVARIANTS: dict[int, str] = {
    1: "at most one master per session; session clocks only increase",
    2: "every node's applied log is a prefix of its session master's log; indices dense from 0",
    3: "nodes that applied the same prefix have identical state digests",
    4: "no instance is created whose footprint exceeds a hosting node's usable memory",
    5: "a master failover loses no placement whose hosting nodes survive",
    6: "events indexed per abandoned request are bounded",
    7: "all ranks of an instance enforce the same context ceiling",
    8: "in-flight requests on a dead master end with an error, never hang",
    9: "a runner never loads an unverified file",
    10: "no instance's files are evicted while it is placed",
}

_CANON = msgspec.msgpack.Encoder(order="sorted")


def canonical_digest(state: State) -> bytes:
    """A digest of ``state``'s canonical encoding (equal states, equal digests)."""
    return hashlib.blake2b(_CANON.encode(state), digest_size=16).digest()


class SafetyViolation(Exception):
    """A safety invariant broke; ``invariant`` is its number in DESIGN.md section 6."""

    def __init__(self, invariant: int, message: str, t: float, host: str | None) -> None:
        # simpy re-raises an exception that escaped a process (a violation found
        # inside a client's or a runner's process) as ``type(exc)(*exc.args)``:
        # the args must rebuild the very same violation.
        super().__init__(invariant, message, t, host)
        self.invariant = invariant
        self.detail = message
        self.t = t
        self.host = host

    def __str__(self) -> str:
        where = f" on {self.host}" if self.host else ""
        return f"invariant {self.invariant} ({INVARIANTS[self.invariant]}) violated at t={self.t:.6f}{where}: {self.detail}"


# Reference states kept per session (the most recent), and the checkpoint spacing.
_WINDOW = 512


class _SessionLog:
    """The master's log of one session, and a reference replica of it."""

    __slots__ = ("session", "writer", "events", "state", "recent", "checkpoints")

    def __init__(self, session: Session, writer: str) -> None:
        self.session = session
        self.writer = writer
        self.events: list[IndexedEvent] = []
        self.state: State = EMPTY_STATE
        self.recent: dict[int, State] = {}
        self.checkpoints: dict[int, State] = {}

    def keep(self, index: int, state: State) -> None:
        self.recent[index] = state
        if index % _WINDOW == 0:
            self.checkpoints[index] = state
        old = index - _WINDOW
        if old in self.recent:
            del self.recent[old]

    def state_at(self, index: int) -> State:
        """The reference state after ``index`` (recomputed from a checkpoint if old)."""
        state = self.recent.get(index)
        if state is not None:
            return state
        base = (index // _WINDOW) * _WINDOW
        state = self.checkpoints[base]
        for i in range(base + 1, index + 1):
            state = apply(state, self.events[i])
        return state


class _Created:
    __slots__ = ("session", "index", "hosts", "instance", "t")

    def __init__(self, session: Session, index: int, instance: Instance, t: float) -> None:
        self.session = session
        self.index = index
        self.hosts = hosting_nodes(instance)
        self.instance = instance
        self.t = t


class SafetyChecker:
    """Incremental checks of invariants 1-8 (see the module docstring).

    ``clock`` gives the driver's simulated time; ``ram_total_bytes`` the real
    RAM of each host (for the static bound of invariant 4); ``host_paused``
    whether a host is frozen (its requests' deadlines wait).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        abandoned_events_max: int = 3,
        ram_total_bytes: dict[str, int] | None = None,
        host_paused: Callable[[str], bool] | None = None,
        master_reachable: Callable[[str, Session | None], bool] | None = None,
        files_verified: Callable[[str, ModelId, Need], bool] | None = None,
        runners_using: Callable[[str, ModelId], int] | None = None,
    ) -> None:
        assert abandoned_events_max >= 1
        self.clock = clock
        self.abandoned_events_max = abandoned_events_max
        self.ram_total_bytes = dict(ram_total_bytes or {})
        self.host_paused = host_paused or (lambda _h: False)
        self.master_reachable = master_reachable or (lambda _h, _s: False)
        # Ground truth of a host's disk and runners (the simulator's), for invariants 9 and 10.
        self.files_verified = files_verified
        self.runners_using = runners_using
        self.runners_started_checked = 0
        self.evictions_checked = 0
        self.logs: dict[Session, _SessionLog] = {}
        self.acting: dict[str, Session | None] = {}
        self.acting_by_session: dict[Session, set[str]] = {}
        self.last_session: dict[str, tuple[int, str]] = {}
        self.last_clock: dict[str, int] = {}
        self.checked: dict[str, tuple[Session, int]] = {}
        # The session and state objects last looked at per host: the same object needs no second look.
        self._seen_session: dict[str, Session] = {}
        self._seen_state: dict[str, State] = {}
        self.max_applied: dict[str, dict[Session, int]] = {}
        self.created: dict[InstanceId, _Created] = {}
        self.deleted: set[InstanceId] = set()
        self.crashes: dict[str, list[float]] = {}
        self.task_events: dict[tuple[Session, TaskId], int] = {}
        self.task_sessions: dict[TaskId, list[Session]] = {}
        self.abandoned: set[TaskId] = set()
        self.task_failed: set[tuple[Session, TaskId]] = set()
        self.ready_ceilings: dict[InstanceId, dict[RunnerId, int]] = {}
        self._deadlines: list[tuple[float, int, Any]] = []
        self._deadline_seq = 0
        # Figures for the report.
        self.steps_checked = 0
        self.events_indexed = 0
        self.state_digests = 0
        self.max_abandoned_events = 0
        self.sessions_seen = 0

    # --- helpers ------------------------------------------------------------------

    def _fail(self, invariant: int, message: str, host: str | None = None) -> None:
        raise SafetyViolation(invariant, message, t=self.clock(), host=host)

    # --- lifecycle hooks -------------------------------------------------------------

    def node_booted(self, host: str) -> None:
        self._forget(host)

    def node_crashed(self, host: str) -> None:
        self._forget(host)
        self.crashes.setdefault(host, []).append(self.clock())

    def _forget(self, host: str) -> None:
        prev = self.acting.pop(host, None)
        if prev is not None:
            self.acting_by_session.get(prev, set()).discard(host)
        self.last_session.pop(host, None)
        self.last_clock.pop(host, None)
        self.checked.pop(host, None)
        self._seen_session.pop(host, None)
        self._seen_state.pop(host, None)

    # --- the step ----------------------------------------------------------------------

    def after_step(self, host: str, node: Any, inp: Any, effects: list[Any]) -> None:
        """Check ``node`` (on ``host``) right after it handled ``inp`` and returned ``effects``."""
        self.steps_checked += 1
        for effect in effects:
            kind = type(effect)
            if kind is AppendLog:
                self._append(host, effect)
            elif kind is StartRunner:
                self._check_start(host, node, effect)
            elif kind is DeleteFiles:
                self._check_delete(host, node, effect)
        # Invariant 1: who acts as master, and sessions only move forward.
        master = node.master
        acting = master.session if (master is not None and master.active) else None
        prev = self.acting.get(host)
        if acting != prev:
            if prev is not None:
                self.acting_by_session[prev].discard(host)
            if acting is not None:
                holders = self.acting_by_session.setdefault(acting, set())
                if holders:
                    self._fail(1, f"{host} and {', '.join(sorted(holders))} both act as master of session {acting}", host)
                holders.add(host)
                if acting.master != host:
                    self._fail(1, f"{host} acts as master of session {acting}, which names {acting.master}", host)
            self.acting[host] = acting
        session = node.election.session
        if session is not None and session is not self._seen_session.get(host):
            key = (session.clock, session.master)
            last = self.last_session.get(host)
            if last is not None and key < last:
                self._fail(1, f"{host}'s session went back from {last} to {key}", host)
            self.last_session[host] = key
            self._seen_session[host] = session
        clock = node.election.clock
        if clock < self.last_clock.get(host, -1):
            self._fail(1, f"{host}'s election clock went back from {self.last_clock[host]} to {clock}", host)
        self.last_clock[host] = clock
        # Invariants 2 and 3: the applied state is the master's, at that index.
        current = node.replica.current
        if current is not None and current is not self._seen_state.get(host):
            self._seen_state[host] = current
            at = (current.session, current.last_index)
            if self.checked.get(host) != at:
                self.checked[host] = at
                self._check_state(host, current)
        if self._deadlines and self._deadlines[0][0] < self.clock():
            self.check_deadlines()

    # --- invariants 9 and 10 -------------------------------------------------------------------

    def _check_start(self, host: str, node: Any, effect: StartRunner) -> None:
        self.runners_started_checked += 1
        spec = effect.spec
        state = node.replica.current
        inst = state.instances.get(spec.instance_id) if state is not None else None
        if inst is None:
            self._fail(9, f"{host} started runner {spec.runner_id} of instance {spec.instance_id}, not in its state", host)
            return
        model = inst.shard_assignments.model_id
        for other, runner in sorted(inst.shard_assignments.node_to_runner.items()):
            need = need_of(inst.shard_assignments.runner_to_shard[runner])
            copy = state.model_copies.get(other, {}).get(model)
            if copy is None or copy.status != "verified" or not covers(copy.coverage, need):
                self._fail(9, f"{host} started runner {spec.runner_id} while {other}'s copy of {model} was "
                              f"{copy.status if copy is not None else 'absent'}", host)
        if self.files_verified is not None and not self.files_verified(host, model, need_of(spec.shard)):
            self._fail(9, f"{host} started runner {spec.runner_id} but its disk does not hold the verified files of "
                          f"{model} for {need_of(spec.shard)}", host)

    def _check_delete(self, host: str, node: Any, effect: DeleteFiles) -> None:
        self.evictions_checked += 1
        state = node.replica.current
        model = effect.model_id
        if state is not None:
            for inst in state.instances.values():
                if inst.shard_assignments.model_id == model and host in inst.shard_assignments.node_to_runner:
                    self._fail(10, f"{host} deletes the files of {model} while instance {inst.instance_id} is placed "
                                   "on it", host)
        if self.runners_using is not None and self.runners_using(host, model) > 0:
            self._fail(10, f"{host} deletes the files of {model} while a runner of it lives there", host)

    def _check_eviction_request(self, host: str, state: State, event: ModelEvictionRequested) -> None:
        for inst in state.instances.values():
            if inst.shard_assignments.model_id == event.model_id and event.node_id in inst.shard_assignments.node_to_runner:
                self._fail(10, f"{host} indexed the eviction of {event.model_id} on {event.node_id} while instance "
                               f"{inst.instance_id} is placed there", host)

    def _check_state(self, host: str, state: State) -> None:
        session = state.session
        assert session is not None
        index = state.last_index
        log = self.logs.get(session)
        if log is None or index >= len(log.events):
            have = -1 if log is None else len(log.events) - 1
            self._fail(
                2, f"{host} applied index {index} of session {session}, but its master indexed only up to {have}", host
            )
            return
        self.state_digests += 1
        if state != log.state_at(index):
            self._fail(3, f"{host}'s state at index {index} of session {session} differs from the master's log", host)
        applied = self.max_applied.setdefault(host, {})
        if applied.get(session, -1) < index:
            applied[session] = index

    # --- the master's log ---------------------------------------------------------------------

    def _append(self, host: str, effect: AppendLog) -> None:
        session = effect.session
        indexed = effect.indexed
        if session.master != host:
            self._fail(1, f"{host} indexed event {indexed.index} into session {session} of {session.master}", host)
        log = self.logs.get(session)
        if log is None:
            if indexed.index != 0:
                self._fail(2, f"the first event {host} indexed in session {session} has index {indexed.index}", host)
            log = _SessionLog(session, host)
            self.logs[session] = log
            self.sessions_seen += 1
        elif log.writer != host:
            self._fail(1, f"two writers in session {session}: {log.writer} and {host}", host)
        if indexed.index != len(log.events):
            self._fail(2, f"{host} indexed {indexed.index} in session {session}; the next index is {len(log.events)}", host)
        before = log.state
        event = indexed.event
        kind = type(event)
        if kind is InstanceCreated:
            self._check_memory(host, before, event.instance)  # type: ignore[union-attr]
        elif kind is ModelEvictionRequested:
            assert isinstance(event, ModelEvictionRequested)
            self._check_eviction_request(host, before, event)
        try:
            after = apply(before, indexed)
        except AssertionError as exc:
            self._fail(2, f"the reference replica refused index {indexed.index} of session {session}: {exc}", host)
            return
        log.state = after
        log.events.append(indexed)
        log.keep(indexed.index, after)
        self.events_indexed += 1
        if kind is InstanceCreated:
            inst = event.instance  # type: ignore[union-attr]
            if inst.instance_id not in self.created:
                self.created[inst.instance_id] = _Created(session, indexed.index, inst, self.clock())
        elif kind is InstanceDeleted:
            self.deleted.add(event.instance_id)  # type: ignore[union-attr]
        elif kind is TaskCreated:
            self._count_task_event(host, session, event.task.task_id)  # type: ignore[union-attr]
        elif kind in (TaskStatusUpdated, TaskFailed, TaskDeleted):
            if kind is TaskFailed:
                self.task_failed.add((session, event.task_id))  # type: ignore[union-attr]
            self._count_task_event(host, session, event.task_id)  # type: ignore[union-attr]
        elif kind is RunnerStatusUpdated and type(event.status) is RunnerReady:  # type: ignore[union-attr]
            inst = before.instances.get(event.instance_id)  # type: ignore[union-attr]
            ceiling = inst.context_ceiling if inst is not None else None
            self._check_ceiling(host, event.instance_id, event.runner_id, event.status.context_ceiling, ceiling)  # type: ignore[union-attr]

    def _check_memory(self, host: str, state: State, inst: Instance) -> None:
        readopted = inst.instance_id in self.created
        for node in sorted(inst.memory_by_node):
            need = inst.memory_by_node[node]
            total = self.ram_total_bytes.get(node)
            if total is not None and need > total * USABLE_FRACTION_OF_TOTAL:
                self._fail(
                    4,
                    f"instance {inst.instance_id} puts {need} bytes on {node}, beyond 0.75 x its {total} bytes of RAM",
                    host,
                )
            if readopted:
                continue
            reported = state.node_memory.get(node)
            if reported is None:
                self._fail(4, f"instance {inst.instance_id} placed on {node}, whose memory the master never heard", host)
                continue
            usable = usable_bytes(reported)
            if need > usable:
                self._fail(
                    4, f"instance {inst.instance_id} puts {need} bytes on {node}, which can use only {usable}", host
                )

    # --- invariant 6 ---------------------------------------------------------------------------

    def _count_task_event(self, host: str, session: Session, task_id: TaskId) -> None:
        key = (session, task_id)
        count = self.task_events.get(key)
        if count is None:
            count = 0
            self.task_sessions.setdefault(task_id, []).append(session)
        self.task_events[key] = count + 1
        if task_id in self.abandoned:
            self._check_abandoned(task_id, host)

    def _check_abandoned(self, task_id: TaskId, host: str | None) -> None:
        for session in self.task_sessions.get(task_id, ()):
            count = self.task_events[(session, task_id)]
            if count > self.max_abandoned_events:
                self.max_abandoned_events = count
            # A fault (its node restarted, its instance went) may fail the task
            # before the cancel lands: its TaskFailed is the fault's, not the
            # abandonment's, and TaskDeleted(failed) takes the cancel's place.
            bound = self.abandoned_events_max + (1 if (session, task_id) in self.task_failed else 0)
            if count > bound:
                self._fail(
                    6,
                    f"{count} events indexed for abandoned task {task_id} in session {session} "
                    f"(bound {bound})",
                    host,
                )

    def request_abandoned(self, req: Any) -> None:
        if req.kind != "SubmitTask":
            return
        task_id = TaskId(derive_id("task", req.cid))
        self.abandoned.add(task_id)
        self._check_abandoned(task_id, req.host)

    # --- invariant 7 ------------------------------------------------------------------------------

    def runner_reported(self, host: str, instance_id: InstanceId, runner_id: RunnerId, status: Any, spec_ceiling: int) -> None:
        if type(status) is RunnerReady:
            created = self.created.get(instance_id)
            stamped = created.instance.context_ceiling if created is not None else spec_ceiling
            self._check_ceiling(host, instance_id, runner_id, status.context_ceiling, stamped)

    def _check_ceiling(
        self, host: str, instance_id: InstanceId, runner_id: RunnerId, ceiling: int, stamped: int | None
    ) -> None:
        if stamped is not None and ceiling != stamped:
            self._fail(
                7, f"runner {runner_id} of {instance_id} enforces {ceiling} tokens; the instance says {stamped}", host
            )
        seen = self.ready_ceilings.setdefault(instance_id, {})
        seen[runner_id] = ceiling
        values = set(seen.values())
        if len(values) > 1:
            self._fail(7, f"ranks of {instance_id} enforce different ceilings: {dict(sorted(seen.items()))}", host)

    # --- invariant 8 ------------------------------------------------------------------------------

    def request_deadline(self, req: Any) -> None:
        assert req.end_deadline is not None
        self._deadline_seq += 1
        heapq.heappush(self._deadlines, (req.end_deadline, self._deadline_seq, req))

    def check_deadlines(self) -> None:
        """Every request whose deadline passed must have ended (paused origins get time back)."""
        now = self.clock()
        while self._deadlines and self._deadlines[0][0] < now:
            deadline, _, req = heapq.heappop(self._deadlines)
            if req.ended or req.end_deadline is None or deadline < req.end_deadline:
                continue  # ended, cleared, or superseded by a later loss's deadline
            if self.host_paused(req.host):
                # A frozen origin cannot end anything: give it its pause back.
                self._deadline_seq += 1
                heapq.heappush(self._deadlines, (now + 1.0, self._deadline_seq, req))
                continue
            if self.master_reachable(req.host, req.session_sent):
                # The master came back in the same session (a cut shorter than an
                # election): it was not dead after all. A later loss sets a new deadline.
                req.end_deadline = None
                continue
            self._fail(
                8,
                f"request {req.cid} on {req.host} (sent in session {req.session_sent}) is still open "
                f"{now - req.submitted_at:.3f} s after it was submitted, past its deadline {deadline:.3f}",
                req.host,
            )

    # --- invariant 5 (at convergence) ----------------------------------------------------------------

    def check_placements_kept(self, final: State, alive: set[NodeId]) -> None:
        """Instances a hosting node applied, never deleted, hosts up since: all still placed."""
        for iid in sorted(self.created):
            if iid in self.deleted or iid in final.instances:
                continue
            info = self.created[iid]
            if any(h not in alive for h in info.hosts):
                continue
            if any(t >= info.t for h in info.hosts for t in self.crashes.get(h, ())):
                continue
            applied_by_host = [
                h for h in info.hosts if self.max_applied.get(h, {}).get(info.session, -1) >= info.index
            ]
            if applied_by_host:
                self._fail(
                    5,
                    f"instance {iid} (created at index {info.index} of session {info.session}, applied by "
                    f"{', '.join(applied_by_host)}) vanished without an indexed InstanceDeleted; its hosts "
                    f"{', '.join(info.hosts)} are all up",
                    None,
                )

    def summary(self) -> dict[str, Any]:
        return {
            "steps_checked": self.steps_checked,
            "events_indexed": self.events_indexed,
            "sessions": self.sessions_seen,
            "state_digests_compared": self.state_digests,
            "instances_created": len(self.created),
            "abandoned_requests": len(self.abandoned),
            "max_events_per_abandoned_request": self.max_abandoned_events,
        }
