"""The worker: runs this node's share of every instance the state assigns it.

Theory of operation
-------------------
``reconcile(now, state)`` compares the replicated state with the runners this
node has, and returns effects that close the gap: start a runner for each
shard assigned here (through the pre-spawn memory guard and the crash
breaker), stop runners whose instance is gone, dispatch each pending task to
the rank-0 runner of its instance once that runner is serving, and cancel
dispatched tasks that left the state. Runner statuses, exits and output come
back through ``on_*`` methods, which return local events for the master and
effects.

Runner policy (runner_policy.py) decides restarts: the breaker trips once per
crash loop, wedge deaths (exit 86) are never retried, and first-report and
warmup deadlines stop a runner that never becomes ready.

A worker never restarts a runner because the master changed: a failover
carries the instance over, the runner keeps its loaded weights and serves the
new session's tasks (invariant 5, and the fast failover it buys).
"""

from __future__ import annotations

from skulk.core import interconnect, runner_policy
from skulk.core.config import CoreConfig
from skulk.core.effects import CancelRunnerTask, DispatchTask, Effect, Log, StartRunner, StopRunner
from skulk.core.files import need_of
from skulk.core.keeper import PERMANENT_CODES, FileKeeper
from skulk.core.events import (
    Event,
    InstanceStillHosted,
    RunnerStatusUpdated,
    TaskDeleted,
    TaskFailed,
    TaskStatusUpdated,
)
from skulk.core.ids import InstanceId, NodeId, RunnerId, TaskId
from skulk.core.instances import (
    GROUP_CONNECT_TIMEOUT,
    RUNNER_SERVING,
    Instance,
    RunnerFailed,
    RunnerRunning,
    RunnerSpec,
    RunnerStatus,
)
from skulk.core.output import Output
from skulk.core.state import State
from skulk.core.tasks import Task, TokenChunk
from skulk.core.telemetry import MemoryInfo
from skulk.core.timers import RunnerDeadlineTimer, RunnerRestartTimer, cancel_timer, set_timer

__all__ = ["Worker"]


class _Runner:
    __slots__ = ("spec", "instance", "status", "started_at", "entered_at", "stopping", "reported")

    def __init__(self, spec: RunnerSpec, instance: Instance, now: float) -> None:
        self.spec = spec
        self.instance = instance
        self.status: RunnerStatus | None = None
        self.started_at = now
        self.entered_at = now  # when the runner entered its current lifecycle state
        self.stopping = False
        self.reported: RunnerStatus | None = None


class Worker:
    def __init__(self, node_id: NodeId, config: CoreConfig, files: FileKeeper | None = None) -> None:
        self.node_id = node_id
        self.config = config
        # The gate on model files: a runner starts only once every rank's files are verified.
        self.files = files if files is not None else FileKeeper(node_id, config)
        self._files_failed: dict[RunnerId, str] = {}  # the files failure last reported per runner
        self.runners: dict[RunnerId, _Runner] = {}
        self.dispatched: dict[TaskId, RunnerId] = {}
        self.memory: MemoryInfo | None = None
        self.breaker = runner_policy.CrashBreaker()
        # Runners that must not be (re)started before a time, or ever (inf).
        self._blocked_until: dict[RunnerId, float] = {}
        self._failures: dict[RunnerId, RunnerFailed] = {}
        self._last_tasks: dict[TaskId, Task] | None = None
        # Tasks this worker already reported ended (finished, runner exit, restart orphan).
        self._settled: set[TaskId] = set()
        self._last_runners_key: tuple[tuple[RunnerId, bool, bool], ...] = ()
        # Bumped whenever a runner is added or removed, or its status or stopping flag changes.
        self._epoch = 0
        self._key_epoch = -1
        self._runners_key: tuple[tuple[RunnerId, bool, bool], ...] = ()

    # --- observations ------------------------------------------------------------------

    def on_memory(self, memory: MemoryInfo) -> Output:
        """This node's memory, as telemetry last measured it (the pre-spawn guard reads it)."""
        self.memory = memory
        return Output()

    # --- reconciliation ------------------------------------------------------------

    def reconcile(self, now: float, state: State) -> Output:
        effects: list[Effect] = []
        events: list[Event] = []
        desired: dict[RunnerId, Instance] = {}
        for iid in sorted(state.instances):
            inst = state.instances[iid]
            runner_id = inst.shard_assignments.node_to_runner.get(self.node_id)
            if runner_id is not None:
                desired[runner_id] = inst
        for runner_id in sorted(self.runners):
            entry = self.runners[runner_id]
            if runner_id not in desired and not entry.stopping:
                entry.stopping = True
                self._epoch += 1
                effects.append(StopRunner(runner_id=runner_id, reason="instance removed"))
                effects.append(cancel_timer(RunnerDeadlineTimer(runner_id)))
        for runner_id in [r for r in self._files_failed if r not in desired]:
            del self._files_failed[runner_id]
        for runner_id in [r for r in self._blocked_until if r not in desired]:
            del self._blocked_until[runner_id]
            self._failures.pop(runner_id, None)
        for runner_id, inst in desired.items():
            if runner_id in self.runners:
                continue
            if self._blocked_until.get(runner_id, -1.0) > now:
                continue
            e, ev = self._start(now, state, runner_id, inst)
            effects += e
            events += ev
        e, ev = self._dispatch(now, state)
        return Output(effects + e, events + ev)

    def _start(self, now: float, state: State, runner_id: RunnerId, inst: Instance) -> tuple[list[Effect], list[Event]]:
        shard = inst.shard_assignments.runner_to_shard[runner_id]
        waiting = self.files.ready(state, inst)
        if waiting is not None:
            # Not started (so no deadline runs) until every rank holds verified files; a
            # failure to fetch ours is reported on the runner, so requests fail with the reason.
            problem = self.files.problem(inst.shard_assignments.model_id)
            if problem is None or self.files.covered(inst.shard_assignments.model_id, need_of(shard)):
                self._files_failed.pop(runner_id, None)
                return [], []
            code, message = problem
            text = f"the files of {inst.shard_assignments.model_id} are not available on {self.node_id}: {message}"
            if self._files_failed.get(runner_id) == text:
                return [], []
            self._files_failed[runner_id] = text
            failed = RunnerFailed(error_message=text, permanent=code in PERMANENT_CODES, code=f"files_{code}")
            return [Log(level="error", message=text)], self._report(inst, runner_id, failed)
        self._files_failed.pop(runner_id, None)
        refusal = runner_policy.prespawn_guard(state, inst, self.node_id, self.memory)
        if refusal is not None:
            # Not permanent: memory may free up (another runner exiting); retry later.
            failed = RunnerFailed(error_message=refusal, permanent=False, code="prespawn_memory")
            retry_at = now + self.config.prune_check_interval_s
            self._blocked_until[runner_id] = retry_at
            return [
                Log(level="warning", message=refusal),
                set_timer(RunnerRestartTimer(runner_id), retry_at),
            ], self._report(inst, runner_id, failed)
        spec = RunnerSpec(
            instance_id=inst.instance_id,
            runner_id=runner_id,
            node_id=self.node_id,
            model_id=inst.shard_assignments.model_id,
            shard=shard,
            hosts=interconnect.hostfile(inst),
            context_ceiling=inst.context_ceiling,
            max_concurrent_requests=self.config.max_concurrent_requests,
            group_connect_deadline_s=self.config.group_connect_deadline_s,
            warmup_deadline_s=self.config.warmup_deadline_s,
            speculation=inst.speculation,
            kv_reserved_bytes=inst.kv_bytes_by_node.get(self.node_id, 0),
        )
        entry = _Runner(spec, inst, now)
        self.runners[runner_id] = entry
        self._epoch += 1
        self._blocked_until.pop(runner_id, None)
        return [StartRunner(spec=spec), *self._arm_deadline(now, entry, runner_id)], []

    def _arm_deadline(self, now: float, entry: _Runner, runner_id: RunnerId) -> list[Effect]:
        state = None if entry.status is None else runner_policy.state_of(entry.status)
        deadline = runner_policy.deadline_for(state, entry.entered_at, self.config)
        if deadline is None:
            return [cancel_timer(RunnerDeadlineTimer(runner_id))]
        return [set_timer(RunnerDeadlineTimer(runner_id), deadline.at)]

    def _dispatch(self, now: float, state: State) -> tuple[list[Effect], list[Event]]:
        # Nothing to do unless the tasks or our runners changed since the last
        # pass (apply replaces state.tasks only when a task event is applied),
        # which keeps a storm of thousands of tasks from costing O(n) per event.
        # The runners' key is recomputed only after a runner was added, removed,
        # stopped or changed status (``_touch``): the same value, without the work.
        if self._key_epoch != self._epoch:
            self._key_epoch = self._epoch
            self._runners_key = tuple(
                (r, e.stopping, isinstance(e.status, RUNNER_SERVING)) for r, e in sorted(self.runners.items())
            )
        runners_key = self._runners_key
        if state.tasks is self._last_tasks and runners_key == self._last_runners_key:
            return [], []
        self._last_tasks = state.tasks
        self._last_runners_key = runners_key
        effects: list[Effect] = []
        events: list[Event] = []
        tasks, dispatched, settled = state.tasks, self.dispatched, self._settled
        for task_id in [t for t in dispatched if t not in tasks]:
            runner_id = dispatched.pop(task_id)
            if runner_id in self.runners:
                effects.append(CancelRunnerTask(runner_id=runner_id, task_id=task_id))
        # A task marked running on an instance whose rank 0 is here, but that this
        # worker never dispatched, ran on a previous incarnation of this node
        # (it crashed and restarted). Running it again would stream from the
        # start to a client that already has part of it: fail it instead.
        # Both passes below pick their few candidates first and sort only those (a
        # pass never changes which other tasks qualify): the order of sorting every
        # task, at a fraction of the cost.
        for task_id in sorted(
            t for t, task in tasks.items() if task.status == "running" and t not in dispatched and t not in settled
        ):
            task = tasks[task_id]
            inst = state.instances.get(task.instance_id)
            local = inst.shard_assignments.node_to_runner.get(self.node_id) if inst is not None else None
            if inst is None or local is None or inst.shard_assignments.runner_to_shard[local].device_rank != 0:
                continue
            settled.add(task_id)
            events.append(
                TaskFailed(task_id=task_id, error_message="the node running this request restarted; retry the request")
            )
        if settled:
            settled.intersection_update(tasks)
        # Instances whose rank-0 runner here is serving: only their tasks can go out.
        serving: dict[InstanceId, RunnerId] = {}
        for runner_id, entry in self.runners.items():
            if entry.stopping or not isinstance(entry.status, RUNNER_SERVING):
                continue
            if entry.spec.shard.device_rank == 0:
                serving[entry.instance.instance_id] = runner_id
        if not serving:
            return effects, events
        instances = state.instances
        for task_id in sorted(
            t for t, task in tasks.items()
            if t not in dispatched and task.instance_id in serving and task.status != "failed"
            and task.instance_id in instances
        ):
            task = tasks[task_id]
            runner_id = serving[task.instance_id]
            dispatched[task_id] = runner_id
            effects.append(DispatchTask(runner_id=runner_id, task=task))
            if task.status != "running":
                events.append(TaskStatusUpdated(task_id=task_id, status="running"))
        return effects, events

    # --- runner reports -------------------------------------------------------------

    def on_status(self, now: float, runner_id: RunnerId, status: RunnerStatus) -> Output:
        entry = self.runners.get(runner_id)
        if entry is None:
            return Output()
        effects: list[Effect] = []
        problem = runner_policy.check_transition(entry.status, status)
        if problem is not None:
            effects.append(Log(level="warning", message=f"runner {runner_id}: {problem}"))
        changed = entry.status is None or type(entry.status) is not type(status)
        entry.status = status
        self._epoch += 1
        if changed:
            entry.entered_at = now
            effects += self._arm_deadline(now, entry, runner_id)
        if isinstance(status, RUNNER_SERVING):
            self.breaker.record_ready(now, entry.instance.instance_id)
        return Output(effects, self._report(entry.instance, runner_id, status))

    def _report(self, inst: Instance, runner_id: RunnerId, status: RunnerStatus) -> list[Event]:
        entry = self.runners.get(runner_id)
        if entry is not None:
            if entry.reported == status or (
                # Busy-ness is visible in the tasks; a count change is not news for the log.
                isinstance(entry.reported, RunnerRunning) and isinstance(status, RunnerRunning)
            ):
                return []
            entry.reported = status
        return [
            RunnerStatusUpdated(runner_id=runner_id, node_id=self.node_id, instance_id=inst.instance_id, status=status)
        ]

    def on_exit(self, now: float, runner_id: RunnerId, exit_code: int) -> Output:
        entry = self.runners.pop(runner_id, None)
        self._epoch += 1
        if entry is None:
            return Output()
        effects: list[Effect] = [cancel_timer(RunnerDeadlineTimer(runner_id))]
        events: list[Event] = []
        for task_id in [t for t, r in self.dispatched.items() if r == runner_id]:
            del self.dispatched[task_id]
            if not entry.stopping:
                self._settled.add(task_id)
                events.append(TaskFailed(task_id=task_id, error_message=f"runner {runner_id} exited with code {exit_code}"))
        if entry.stopping:
            return Output(effects, events)
        decision = self.breaker.record_exit(now, entry.instance.instance_id, exit_code)
        if isinstance(decision, runner_policy.Restart):
            self._blocked_until[runner_id] = now + decision.after_s
            effects.append(set_timer(RunnerRestartTimer(runner_id), now + decision.after_s))
            effects.append(
                Log(level="warning", message=f"runner {runner_id} exited ({exit_code}); restarting in {decision.after_s:g} s")
            )
            events += self._report(
                entry.instance,
                runner_id,
                RunnerFailed(error_message=f"runner exited with code {exit_code}; restarting", permanent=False),
            )
            return Output(effects, events)
        assert isinstance(decision, runner_policy.GiveUp)
        self._blocked_until[runner_id] = float("inf")
        failed = RunnerFailed(error_message=decision.reason, permanent=True)
        self._failures[runner_id] = failed
        if decision.tripped_now:
            effects.append(Log(level="error", message=f"instance {entry.instance.instance_id} failed: {decision.reason}"))
        events += self._report(entry.instance, runner_id, failed)
        return Output(effects, events)

    def on_deadline(self, now: float, timer: RunnerDeadlineTimer) -> Output:
        runner_id = timer.runner_id
        entry = self.runners.get(runner_id)
        if entry is None or entry.stopping:
            return Output()
        state = None if entry.status is None else runner_policy.state_of(entry.status)
        deadline = runner_policy.deadline_for(state, entry.entered_at, self.config)
        if deadline is None or deadline.at > now:
            return Output()  # the runner moved on meanwhile
        entry.stopping = True
        self._epoch += 1
        self._blocked_until[runner_id] = float("inf")
        code = GROUP_CONNECT_TIMEOUT if deadline.kind == "group_connect" else f"{deadline.kind}_deadline"
        failed = RunnerFailed(
            error_message=f"runner {runner_id}: {deadline.message}; stopped", permanent=code != GROUP_CONNECT_TIMEOUT, code=code
        )
        self._failures[runner_id] = failed
        events = self._report(entry.instance, runner_id, failed)
        effects: list[Effect] = [
            StopRunner(runner_id=runner_id, reason=failed.error_message),
            Log(level="error", message=failed.error_message),
        ]
        return Output(effects, events)

    def on_restart_timer(self, now: float, timer: RunnerRestartTimer, state: State | None) -> Output:
        """A runner's restart backoff ended: unblock it, then reconcile (``state`` None: mid-failover, wait)."""
        if self._blocked_until.get(timer.runner_id, float("inf")) <= now:
            del self._blocked_until[timer.runner_id]
        if state is None:
            return Output()  # a failover is in progress: never act on a half-known state
        return self.reconcile(now, state)

    def on_output(self, now: float, runner_id: RunnerId, chunk: TokenChunk) -> Output:
        """Local events for a chunk (the node routes the chunk itself)."""
        if chunk.finish_reason is None:
            return Output()
        self.dispatched.pop(chunk.task_id, None)
        self._settled.add(chunk.task_id)
        if chunk.error is not None:
            err = chunk.error
            failed = TaskFailed(
                task_id=chunk.task_id, error_message=err.message, code=err.code, error_type=err.type,
                retry_after_s=err.retry_after_s,
            )  # fmt: skip
            return Output(events=[failed])
        outcome = "cancelled" if chunk.finish_reason == "cancelled" else "completed"
        return Output(events=[TaskDeleted(task_id=chunk.task_id, outcome=outcome)])

    # --- failover ----------------------------------------------------------------------

    def rebuild(self, state: State) -> list[Event]:
        """Facts to re-report to a new master once its first event is applied."""
        events: list[Event] = []
        self._files_failed.clear()  # re-reported by the next reconcile
        for runner_id in sorted(self.runners):
            entry = self.runners[runner_id]
            if entry.stopping:
                continue
            if entry.instance.instance_id not in state.instances:
                events.append(InstanceStillHosted(instance=entry.instance))
            entry.reported = None
            if entry.status is not None:
                events += self._report(entry.instance, runner_id, entry.status)
        for runner_id in sorted(self._failures):
            inst_id = next(
                (i for i, inst in state.instances.items() if runner_id in inst.shard_assignments.runner_to_shard), None
            )
            if inst_id is not None:
                events.append(
                    RunnerStatusUpdated(
                        runner_id=runner_id,
                        node_id=self.node_id,
                        instance_id=InstanceId(inst_id),
                        status=self._failures[runner_id],
                    )
                )
        return events

    def hosted_instance_ids(self) -> list[InstanceId]:
        return sorted({e.instance.instance_id for e in self.runners.values() if not e.stopping})

    def stop_all(self) -> Output:
        effects: list[Effect] = []
        for runner_id in sorted(self.runners):
            if not self.runners[runner_id].stopping:
                self.runners[runner_id].stopping = True
                self._epoch += 1
                effects.append(StopRunner(runner_id=runner_id, reason="node shutting down"))
        return Output(effects)

