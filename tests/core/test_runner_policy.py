"""Runner policy: lifecycle table, edge-triggered crash breaker, deadlines, memory guard, removal order."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skulk.core import placement, runner_policy
from skulk.core.events import (
    InstanceCreated,
    InstanceDeleted,
    NodeTimedOut,
    RunnerStatusUpdated,
    TaskCreated,
    TaskDeleted,
    TaskFailed,
    TaskStatusUpdated,
)
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, TaskId
from skulk.core.instances import (
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
    RunnerWarmingUp,
)
from skulk.core.runner_policy import CrashBreaker, GiveUp, Restart, RunnerState
from skulk.core.tasks import GenerationParams, Task
from tests.core.builders import (
    CONFIG,
    GB,
    apply_events,
    build_state,
    cards_of,
    command,
    full_mesh,
    make_card,
    mem,
    placed,
)

IID = InstanceId("inst-1")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "placement.md"


# --- lifecycle -----------------------------------------------------------------------------


def test_a_multi_rank_runner_walks_the_whole_lifecycle():
    path = [
        RunnerIdle(),
        RunnerConnecting(),
        RunnerConnected(),
        RunnerLoading(layers_loaded=0, layers_total=4),
        RunnerLoading(layers_loaded=2, layers_total=4),
        RunnerLoaded(),
        RunnerWarmingUp(),
        RunnerReady(context_ceiling=8192),
        RunnerRunning(active_tasks=1),
        RunnerRunning(active_tasks=2),
        RunnerReady(context_ceiling=8192),
        RunnerShuttingDown(),
        RunnerShutdown(),
    ]
    previous = None
    for status in path:
        assert runner_policy.check_transition(previous, status) is None, (previous, status)
        previous = status


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (RunnerReady(), RunnerLoading()),
        (RunnerIdle(), RunnerReady()),
        (RunnerShutdown(), RunnerIdle()),
        (None, RunnerReady()),
        (RunnerConnecting(), RunnerLoaded()),
    ],
)
def test_illegal_transitions_are_named(before, after):
    problem = runner_policy.check_transition(before, after)
    assert problem is not None and "illegal runner transition" in problem
    assert runner_policy.state_of(after).value in problem


def test_a_failed_runner_may_be_restarted_and_any_live_state_may_fail_or_stop():
    assert runner_policy.check_transition(RunnerFailed(error_message="x"), RunnerIdle()) is None
    for status in (RunnerIdle(), RunnerConnecting(), RunnerLoading(), RunnerWarmingUp(), RunnerRunning()):
        assert runner_policy.check_transition(status, RunnerFailed(error_message="x")) is None
        assert runner_policy.check_transition(status, RunnerShuttingDown()) is None
    assert runner_policy.check_transition(RunnerShutdown(), RunnerFailed(error_message="x")) is not None


def test_every_state_has_a_status_record_and_the_docs_embed_the_generated_table():
    plain = (RunnerIdle, RunnerConnecting, RunnerConnected, RunnerLoading, RunnerLoaded, RunnerWarmingUp)
    plain += (RunnerReady, RunnerRunning, RunnerShuttingDown, RunnerShutdown)
    states = {runner_policy.state_of(cls()) for cls in plain} | {runner_policy.state_of(RunnerFailed(error_message=""))}
    assert states == set(RunnerState)
    table = runner_policy.transitions_markdown()
    assert table.startswith("| from | to | when |")
    assert table in DOCS.read_text(), "docs/placement.md must embed runner_policy.transitions_markdown() verbatim"


# --- crash breaker ----------------------------------------------------------------------------


def test_three_failures_in_a_minute_trip_the_breaker_once():
    breaker = CrashBreaker()
    first = breaker.record_exit(0.0, IID, 1)
    second = breaker.record_exit(2.0, IID, 1)
    assert first == Restart(after_s=1.0, failures_in_window=1)
    assert second == Restart(after_s=2.0, failures_in_window=2)
    trip = breaker.record_exit(5.0, IID, 139)
    assert isinstance(trip, GiveUp) and trip.tripped_now and not trip.wedged
    assert "3 failures within 60 s (exit codes 1, 1, 139)" in trip.reason
    # The rest of the loop: given up, never reported as a new trip.
    later = [breaker.record_exit(5.0 + i, IID, 1) for i in range(1, 10)]
    assert all(isinstance(d, GiveUp) and not d.tripped_now and d.reason == trip.reason for d in later)
    assert breaker.is_tripped(14.0, IID)


def test_a_quiet_period_or_a_ready_runner_re_arms_the_breaker():
    breaker = CrashBreaker()
    for t in (0.0, 1.0, 2.0):
        breaker.record_exit(t, IID, 1)
    assert not breaker.is_tripped(62.0, IID)
    assert breaker.record_exit(62.0, IID, 1) == Restart(after_s=1.0, failures_in_window=1)
    breaker.record_exit(63.0, IID, 1)
    breaker.record_ready(64.0, IID)
    assert breaker.record_exit(65.0, IID, 1) == Restart(after_s=1.0, failures_in_window=1)


def test_failures_spread_over_more_than_the_window_never_trip():
    breaker = CrashBreaker()
    decisions = [breaker.record_exit(t * 31.0, IID, 1) for t in range(10)]
    assert all(isinstance(d, Restart) and d.failures_in_window <= 2 for d in decisions)


def test_a_wedge_is_never_retried_and_does_not_re_arm_by_itself():
    breaker = CrashBreaker()
    wedge = breaker.record_exit(0.0, IID, runner_policy.WEDGE_EXIT_CODE)
    assert isinstance(wedge, GiveUp) and wedge.tripped_now and wedge.wedged
    assert "code 86" in wedge.reason and "never restarted" in wedge.reason
    after = breaker.record_exit(1_000.0, IID, 1)
    assert isinstance(after, GiveUp) and not after.tripped_now and after.wedged
    assert breaker.is_tripped(10_000.0, IID)
    breaker.forget(IID)
    assert isinstance(breaker.record_exit(10_001.0, IID, 1), Restart)


def test_instances_have_independent_breakers_and_backoff_is_capped():
    policy = runner_policy.BreakerPolicy(failures_to_trip=10, backoff_first_s=1.0, backoff_max_s=8.0)
    breaker = CrashBreaker(policy)
    delays = [breaker.record_exit(float(i), IID, 1) for i in range(6)]
    assert [d.after_s for d in delays if isinstance(d, Restart)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert breaker.record_exit(7.0, InstanceId("other"), 1) == Restart(after_s=1.0, failures_in_window=1)


@settings(max_examples=200, deadline=None)
@given(gaps=st.lists(st.floats(0.0, 90.0, allow_nan=False), min_size=1, max_size=40), wedge_at=st.integers(-1, 40))
def test_the_breaker_trips_at_most_once_per_crash_loop(gaps, wedge_at):
    breaker = CrashBreaker()
    now = 0.0
    trips = 0
    loops = 1
    last = None
    tripped = False
    for i, gap in enumerate(gaps):
        now += gap
        if tripped and last is not None and now - last >= 60.0 and not breaker.is_tripped(now, IID):
            loops += 1  # a quiet period ended the loop
        decision = breaker.record_exit(now, IID, runner_policy.WEDGE_EXIT_CODE if i == wedge_at else 1)
        if isinstance(decision, GiveUp):
            trips += decision.tripped_now
            tripped = True
        else:
            assert not tripped or not breaker.is_tripped(now, IID)
            tripped = False
        last = now
    assert trips <= loops


# --- deadlines ------------------------------------------------------------------------------


def test_deadlines_follow_the_runner_state():
    # Group connect: the worker's backstop leaves the runner time to report its own diagnosis.
    grace = runner_policy.GROUP_CONNECT_REPORT_GRACE_S
    cases = {
        None: ("first_report", 120.0, 0.0),
        RunnerState.IDLE: ("first_report", 120.0, 0.0),
        RunnerState.CONNECTING: ("group_connect", 120.0, grace),
        RunnerState.CONNECTED: ("group_connect", 120.0, grace),
        RunnerState.LOADED: ("warmup", 300.0, 0.0),
        RunnerState.WARMING_UP: ("warmup", 300.0, 0.0),
    }
    for state, (kind, limit, extra) in cases.items():
        deadline = runner_policy.deadline_for(state, 10.0, CONFIG)
        assert deadline is not None and (deadline.kind, deadline.at) == (kind, 10.0 + limit + extra)
        assert f"{limit:g} s" in deadline.message
    S = RunnerState
    for state in (S.LOADING, S.READY, S.RUNNING, S.FAILED, S.SHUT_DOWN):
        assert runner_policy.deadline_for(state, 10.0, CONFIG) is None


# --- pre-spawn memory guard ----------------------------------------------------------------------


def _hosted_pair():
    state = build_state({"a": mem(64 * GB)})
    card = make_card(weight_bytes=12 * GB, n_layers=24, num_kv_heads=8, head_dim=128)
    first = placed(placement.place(state, command(cid="c1"), cards_of(card), CONFIG))
    state = apply_events(state, [InstanceCreated(instance=first)])
    second = placed(placement.place(state, command(cid="c2"), cards_of(card), CONFIG))
    state = apply_events(state, [InstanceCreated(instance=second)])
    return state, card, first, second


def test_the_guard_passes_when_memory_is_there_and_counts_other_unloaded_instances():
    state, card, first, second = _hosted_pair()
    node = NodeId("a")
    assert runner_policy.prespawn_guard(state, second, node, mem(64 * GB)) is None
    # Something else took memory since placement: 20 GB available, and the first
    # instance (not loaded yet) will take its ~16 GB too.
    problem = runner_policy.prespawn_guard(state, second, node, mem(64 * GB, 20 * GB), card)
    assert problem is not None and problem.startswith("pre-spawn memory guard: node a needs ~16.7 GB")
    assert "(12.0 GB weights + 0.8 GB KV at 8192 tokens + headroom)" in problem
    assert "reserved for other instances still loading" in problem
    # Once the first has loaded, telemetry shows its memory: no double counting.
    ((_, runner),) = first.shard_assignments.node_to_runner.items()
    report = RunnerStatusUpdated(runner_id=runner, node_id=node, instance_id=first.instance_id, status=RunnerLoaded())
    loaded = apply_events(state, [report])
    assert runner_policy.prespawn_guard(loaded, second, node, mem(64 * GB, 20 * GB)) is None
    assert "no memory reading" in (runner_policy.prespawn_guard(state, second, node, None) or "")


# --- removal order -------------------------------------------------------------------------------


def _task(i: int, instance_id: InstanceId) -> Task:
    return Task(
        task_id=TaskId(f"t{i}"),
        command_id=CommandId(f"c{i}"),
        origin=NodeId("a"),
        instance_id=instance_id,
        model_id=ModelId("test/model"),
        kind="chat",
        params=GenerationParams(prompt="hi"),
    )


def _state_with_tasks():
    names = ["a", "b"]
    state = build_state({n: mem(64 * GB) for n in names}, full_mesh(names))
    one = placed(placement.place(state, command(cid="c1", min_nodes=2), cards_of(make_card(weight_bytes=GB)), CONFIG))
    state = apply_events(state, [InstanceCreated(instance=one)])
    only_a = command(cid="c2", excluded_nodes=("b",))
    two = placed(placement.place(state, only_a, cards_of(make_card(weight_bytes=GB)), CONFIG))
    state = apply_events(state, [InstanceCreated(instance=two)])
    events = [TaskCreated(task=_task(i, one.instance_id if i < 3 else two.instance_id)) for i in range(4)]
    events += [
        TaskStatusUpdated(task_id=TaskId("t1"), status="running"),
        TaskFailed(task_id=TaskId("t2"), error_message="earlier"),
    ]
    return apply_events(state, events), one, two


def test_removing_an_instance_fails_its_tasks_first_then_deletes_them_then_the_instance():
    state, one, two = _state_with_tasks()
    events = runner_policy.instance_removal_events(state, one.instance_id, "deleted by request")
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["TaskFailed", "TaskFailed", "TaskDeleted", "TaskDeleted", "TaskDeleted", "InstanceDeleted"]
    assert [e.task_id for e in events if isinstance(e, TaskFailed)] == ["t0", "t1"]  # t2 had already failed
    assert all(e.outcome == "failed" for e in events if isinstance(e, TaskDeleted))
    assert "deleted by request" in events[0].error_message  # type: ignore[union-attr]
    after = apply_events(state, events)  # apply asserts no in-flight task outlives its instance
    assert one.instance_id not in after.instances and set(after.tasks) == {"t3"}


def test_removing_a_node_removes_every_instance_on_it_then_the_node():
    state, one, two = _state_with_tasks()
    events = runner_policy.node_removal_events(state, NodeId("a"), "no telemetry for 30 s")
    assert isinstance(events[-1], NodeTimedOut) and events[-1].node_id == "a"
    deleted = [e.instance_id for e in events if isinstance(e, InstanceDeleted)]
    assert deleted == sorted([one.instance_id, two.instance_id])
    # Every TaskFailed of an instance precedes that instance's removal.
    for iid in deleted:
        removal = next(i for i, e in enumerate(events) if isinstance(e, InstanceDeleted) and e.instance_id == iid)
        failed = [
            i for i, e in enumerate(events) if isinstance(e, TaskFailed) and state.tasks[e.task_id].instance_id == iid
        ]
        assert all(i < removal for i in failed)
    after = apply_events(state, events)
    assert not after.instances and not after.tasks and "a" not in after.topology.nodes
    untouched = runner_policy.node_removal_events(after, NodeId("b"), "gone")
    assert untouched == [NodeTimedOut(node_id=NodeId("b"))]
