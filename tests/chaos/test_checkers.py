"""The safety checkers: each invariant of DESIGN.md section 6 is caught when broken.

The checker watches what a driver shows it after every step: a node's view
(acting-master session, election session and clock, applied state) and the
effects it returned (``AppendLog`` is the master's log). These tests feed it
real records, each test breaking exactly one invariant.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from chaos.checkers import SafetyChecker, SafetyViolation
from skulk.core.effects import AppendLog
from skulk.core.events import (
    Carryover,
    IndexedEvent,
    InstanceCreated,
    NodeGatheredInfo,
    SessionStarted,
    TaskCreated,
    TaskDeleted,
    TaskFailed,
    TaskStatusUpdated,
)
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId, TaskId, derive_id
from skulk.core.instances import MlxRingInstance, PipelineShardMetadata, RunnerReady, ShardAssignments
from skulk.core.telemetry import Memory, MemoryInfo
from skulk.core.session import Session
from skulk.core.state import EMPTY_STATE, State, apply
from skulk.core.tasks import GenerationParams, Task

GIB = 1024**3
N1, N2 = NodeId("n1"), NodeId("n2")
S1 = Session(clock=1, master=N1)
S2 = Session(clock=2, master=N2)


def _view(*, acting: Session | None = None, session: Session | None = None, clock: int = 1, state: State | None = None) -> Any:
    master = SimpleNamespace(session=acting, active=True) if acting is not None else None
    return SimpleNamespace(
        master=master,
        election=SimpleNamespace(session=session if session is not None else acting, clock=clock),
        replica=SimpleNamespace(current=state),
    )


def _checker(**kw: Any) -> tuple[SafetyChecker, list[float]]:
    now = [0.0]
    return SafetyChecker(clock=lambda: now[0], **kw), now


class _Log:
    """A master's log for ``session``, appended through the checker like a real driver."""

    def __init__(self, checker: SafetyChecker, session: Session) -> None:
        self.checker = checker
        self.session = session
        self.state = EMPTY_STATE
        self.next = 0

    def append(self, event: Any, *, index: int | None = None) -> State:
        indexed = IndexedEvent(index=self.next if index is None else index, event=event, at=float(self.next))
        self.next = indexed.index + 1
        self.checker.after_step(
            self.session.master,
            _view(acting=self.session, state=None),
            None,
            [AppendLog(session=self.session, indexed=indexed)],
        )
        self.state = apply(self.state, indexed)
        return self.state

    def start(self) -> State:
        return self.append(SessionStarted(session=self.session, carryover=Carryover()))


def _instance(node: NodeId, need: int, ceiling: int = 4096) -> MlxRingInstance:
    runner = RunnerId(f"r-{node}")
    shard = PipelineShardMetadata(model_id=ModelId("m"), device_rank=0, world_size=1, start_layer=0, end_layer=8, n_layers=8)
    return MlxRingInstance(
        instance_id=InstanceId(f"inst-{node}"),
        shard_assignments=ShardAssignments(model_id=ModelId("m"), runner_to_shard={runner: shard}, node_to_runner={node: runner}),
        context_ceiling=ceiling,
        memory_by_node={node: need},
    )


def _memory(total_gib: int, available_gib: int) -> NodeGatheredInfo:
    return NodeGatheredInfo(
        node_id=N1,
        memory=MemoryInfo(ram_total=Memory(in_bytes=total_gib * GIB), ram_available=Memory(in_bytes=available_gib * GIB)),
    )


def test_invariant_1_two_nodes_acting_as_master_of_one_session() -> None:
    checker, _ = _checker()
    checker.after_step(N1, _view(acting=S1), None, [])
    with pytest.raises(SafetyViolation) as v:
        checker.after_step(N2, _view(acting=S1), None, [])
    assert v.value.invariant == 1


def test_invariant_1_a_session_never_goes_back() -> None:
    checker, _ = _checker()
    checker.after_step(N2, _view(session=S2, clock=2), None, [])
    with pytest.raises(SafetyViolation) as v:
        checker.after_step(N2, _view(session=S1, clock=2), None, [])
    assert v.value.invariant == 1
    checker.node_crashed(N2)  # a new process starts over (its persisted clock is checked by the core)
    checker.after_step(N2, _view(session=S1, clock=1), None, [])


def test_invariant_2_indices_are_dense_from_zero() -> None:
    checker, _ = _checker()
    log = _Log(checker, S1)
    log.start()
    with pytest.raises(SafetyViolation) as v:
        log.append(NodeGatheredInfo(node_id=N1), index=2)
    assert v.value.invariant == 2


def test_invariant_2_a_node_cannot_apply_what_its_master_never_indexed() -> None:
    checker, _ = _checker()
    log = _Log(checker, S1)
    state = log.start()
    ahead = apply(state, IndexedEvent(index=1, event=NodeGatheredInfo(node_id=N2), at=1.0))
    with pytest.raises(SafetyViolation) as v:
        checker.after_step(N2, _view(session=S1, state=ahead), None, [])
    assert v.value.invariant == 2


def test_invariant_3_same_index_different_state() -> None:
    checker, _ = _checker()
    log = _Log(checker, S1)
    log.start()
    good = log.append(NodeGatheredInfo(node_id=N2))
    checker.after_step(N2, _view(session=S1, state=good), None, [])
    other = apply(
        apply(EMPTY_STATE, IndexedEvent(index=0, event=SessionStarted(session=S1, carryover=Carryover()), at=0.0)),
        IndexedEvent(index=1, event=NodeGatheredInfo(node_id=N1), at=1.0),
    )
    with pytest.raises(SafetyViolation) as v:
        checker.after_step(NodeId("n3"), _view(session=S1, state=other), None, [])
    assert v.value.invariant == 3


def test_invariant_3_a_lagging_node_is_checked_against_a_recomputed_old_state() -> None:
    checker, _ = _checker()
    log = _Log(checker, S1)
    log.start()
    states = [log.append(NodeGatheredInfo(node_id=N2)) for _ in range(1_200)]
    checker.after_step(N2, _view(session=S1, state=states[10]), None, [])  # far behind the window
    assert checker.state_digests == 1


def test_invariant_4_an_instance_beyond_usable_memory() -> None:
    checker, _ = _checker(ram_total_bytes={N1: 64 * GIB})
    log = _Log(checker, S1)
    log.start()
    log.append(_memory(total_gib=64, available_gib=20))
    log.append(InstanceCreated(instance=_instance(N1, need=19 * GIB)))  # fits
    with pytest.raises(SafetyViolation) as v:
        log.append(InstanceCreated(instance=_instance(N2, need=1 * GIB)))  # memory of n2 never reported
    assert v.value.invariant == 4
    checker2, _ = _checker(ram_total_bytes={N1: 64 * GIB})
    log2 = _Log(checker2, S1)
    log2.start()
    log2.append(_memory(total_gib=64, available_gib=20))
    with pytest.raises(SafetyViolation) as v2:
        log2.append(InstanceCreated(instance=_instance(N1, need=21 * GIB)))
    assert v2.value.invariant == 4


def test_invariant_5_a_placement_vanishing_without_deletion() -> None:
    checker, _ = _checker()
    log = _Log(checker, S1)
    log.start()
    log.append(_memory(total_gib=64, available_gib=60))
    state = log.append(InstanceCreated(instance=_instance(N1, need=GIB)))
    checker.after_step(N1, _view(acting=S1, state=state), None, [])  # the hosting node applied it
    checker.check_placements_kept(state, {N1})  # still there: fine
    new = _Log(checker, S2)
    final = new.start()  # a new master that never had it
    with pytest.raises(SafetyViolation) as v:
        checker.check_placements_kept(final, {N1, N2})
    assert v.value.invariant == 5
    checker.node_crashed(N1)  # a host that went down since is exempt
    checker.check_placements_kept(final, {N2})


def _task(cid: str) -> Task:
    return Task(
        task_id=TaskId(derive_id("task", cid)),
        command_id=CommandId(cid),
        origin=N1,
        instance_id=InstanceId("inst-n1"),
        model_id=ModelId("m"),
        kind="chat",
        params=GenerationParams(),
    )


def _abandoned_task() -> tuple[SafetyChecker, _Log, Task]:
    """A checker (bound 3) whose log has indexed TaskCreated for a request its client abandoned."""
    checker, _ = _checker(abandoned_events_max=3)
    log = _Log(checker, S1)
    log.start()
    log.append(_memory(total_gib=64, available_gib=60))
    log.append(InstanceCreated(instance=_instance(N1, need=GIB)))
    task = _task("chat-1")
    checker.request_abandoned(SimpleNamespace(kind="SubmitTask", cid="chat-1", host=N1))
    log.append(TaskCreated(task=task))
    return checker, log, task


def test_invariant_6_events_per_abandoned_request_are_bounded() -> None:
    checker, log, task = _abandoned_task()
    log.append(TaskStatusUpdated(task_id=task.task_id, status="running"))
    log.append(TaskStatusUpdated(task_id=task.task_id, status="running"))
    with pytest.raises(SafetyViolation) as v:
        log.append(TaskDeleted(task_id=task.task_id, outcome="cancelled"))
    assert v.value.invariant == 6 and checker.max_abandoned_events == 4 and "(bound 3)" in str(v.value)


def test_invariant_6_allows_the_one_failure_a_fault_adds() -> None:
    # A node restart fails the running task before the cancel lands:
    # created, running, failed, deleted(failed). The fault's TaskFailed is
    # allowed; anything more is not.
    checker, log, task = _abandoned_task()
    log.append(TaskStatusUpdated(task_id=task.task_id, status="running"))
    log.append(TaskFailed(task_id=task.task_id, error_message="the node running this request restarted"))
    log.append(TaskDeleted(task_id=task.task_id, outcome="failed"))
    assert checker.max_abandoned_events == 4


def test_invariant_6_a_failure_allows_one_event_more_not_two() -> None:
    checker, log, task = _abandoned_task()
    log.append(TaskFailed(task_id=task.task_id, error_message="the node running this request restarted"))
    log.append(TaskStatusUpdated(task_id=task.task_id, status="running"))
    log.append(TaskStatusUpdated(task_id=task.task_id, status="running"))
    with pytest.raises(SafetyViolation) as v:
        log.append(TaskDeleted(task_id=task.task_id, outcome="failed"))
    assert v.value.invariant == 6 and "(bound 4)" in str(v.value)


def test_invariant_7_ranks_disagree_on_the_ceiling() -> None:
    checker, _ = _checker()
    iid = InstanceId("inst-x")
    checker.runner_reported(N1, iid, RunnerId("r1"), RunnerReady(context_ceiling=4096), 4096)
    with pytest.raises(SafetyViolation) as v:
        checker.runner_reported(N2, iid, RunnerId("r2"), RunnerReady(context_ceiling=2048), 2048)
    assert v.value.invariant == 7


def test_invariant_8_a_request_on_a_lost_master_must_end_by_its_deadline() -> None:
    paused: set[str] = set()
    checker, now = _checker(host_paused=lambda h: h in paused)
    ended = SimpleNamespace(cid="a", host=N1, end_deadline=5.0, ended=True, session_sent=S1, submitted_at=0.0)
    open_ = SimpleNamespace(cid="b", host=N2, end_deadline=5.0, ended=False, session_sent=S1, submitted_at=0.0)
    checker.request_deadline(ended)
    checker.request_deadline(open_)
    now[0] = 4.0
    checker.check_deadlines()
    paused.add(N2)
    now[0] = 6.0
    checker.check_deadlines()  # a frozen origin gets its pause back
    paused.clear()
    now[0] = 7.5
    with pytest.raises(SafetyViolation) as v:
        checker.check_deadlines()
    assert v.value.invariant == 8


def test_invariant_8_a_master_that_comes_back_in_its_session_clears_the_deadline() -> None:
    back: set[str] = set()
    checker, now = _checker(master_reachable=lambda h, s: h in back)
    req = SimpleNamespace(cid="c", host=N2, end_deadline=5.0, ended=False, session_sent=S1, submitted_at=0.0)
    checker.request_deadline(req)
    back.add(N2)  # a cut shorter than an election: the master of S1 is reachable again
    now[0] = 6.0
    checker.check_deadlines()
    assert req.end_deadline is None, "not on a dead master: no deadline any more"
    now[0] = 60.0
    checker.check_deadlines()  # nothing left to enforce until the master is lost again
