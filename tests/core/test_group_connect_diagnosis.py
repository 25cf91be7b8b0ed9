"""A group-connect failure reaches the master with the runner's diagnosis, not the worker's bare backstop.

Found by the ``ring_deadline`` chaos scenario (88 of its first 100 seeds): the
runner enforces the group-connect deadline itself and reports which rank it
could not reach, but the worker armed its own deadline for the very same
instant, won the race and reported only "did not complete group connect
within N s" (and stopped the runner before it could say more). In production
the runner's guard even spends up to a second per peer probing before it
reports, so the backstop always won. The worker's deadline now waits
``GROUP_CONNECT_REPORT_GRACE_S`` longer.
"""

from __future__ import annotations

from skulk.core import placement, runner_policy
from skulk.core.effects import SetTimer, StartRunner, StopRunner
from skulk.core.events import InstanceCreated, RunnerStatusUpdated
from skulk.core.ids import NodeId
from skulk.core.instances import GROUP_CONNECT_TIMEOUT, RunnerConnecting, RunnerFailed
from skulk.core.worker import DEADLINE_TIMER_PREFIX, Worker
from tests.core.test_placement import (
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

DEADLINE_S = CONFIG.group_connect_deadline_s


def _two_rank_world():
    card = make_card(weight_bytes=10 * GB)
    state = build_state({"a": mem(64 * GB), "b": mem(64 * GB)}, full_mesh(["a", "b"]))
    inst = placed(placement.place(state, command(min_nodes=2), cards_of(card), CONFIG))
    assert len(inst.ring) == 2
    state = apply_events(state, [InstanceCreated(instance=inst)])
    worker = Worker(NodeId("a"), CONFIG)
    worker.memory = mem(64 * GB)
    effects, _ = worker.reconcile(0.0, state)
    starts = [e for e in effects if isinstance(e, StartRunner)]
    assert len(starts) == 1
    return worker, starts[0].spec.runner_id


def _deadline_at(effects: list) -> float:
    timers = [e for e in effects if isinstance(e, SetTimer) and e.key.startswith(DEADLINE_TIMER_PREFIX)]
    assert len(timers) == 1, effects
    return timers[0].at


def test_the_backstop_waits_past_the_runners_own_deadline():
    worker, runner_id = _two_rank_world()
    effects, events = worker.on_status(1.0, runner_id, RunnerConnecting())
    at = _deadline_at(effects)
    assert at == 1.0 + DEADLINE_S + runner_policy.GROUP_CONNECT_REPORT_GRACE_S
    assert runner_policy.GROUP_CONNECT_REPORT_GRACE_S >= 15.0  # the real guard probes up to 15 peers, 1 s each
    # At the deadline itself the backstop does nothing: the runner is still the one to speak.
    assert worker.on_deadline(1.0 + DEADLINE_S, runner_id) == ([], [])
    # The runner's own report, with its diagnosis, is what goes to the master.
    diagnosis = RunnerFailed(
        error_message="group connect deadline (120 s) expired: rank 1 at 10.0.0.2:52501 is unreachable from rank 0",
        code=GROUP_CONNECT_TIMEOUT,
    )
    effects, events = worker.on_status(1.0 + DEADLINE_S + 0.5, runner_id, diagnosis)
    assert [e.status for e in events if isinstance(e, RunnerStatusUpdated)] == [diagnosis]
    assert not [e for e in effects if isinstance(e, StopRunner)]


def test_a_silent_runner_still_meets_the_backstop():
    worker, runner_id = _two_rank_world()
    effects, _ = worker.on_status(1.0, runner_id, RunnerConnecting())
    at = _deadline_at(effects)
    effects, events = worker.on_deadline(at, runner_id)
    assert [type(e) for e in effects if isinstance(e, StopRunner)] == [StopRunner]
    (failed,) = [e.status for e in events if isinstance(e, RunnerStatusUpdated)]
    assert isinstance(failed, RunnerFailed) and failed.code == GROUP_CONNECT_TIMEOUT and not failed.permanent
    assert f"{DEADLINE_S:g} s" in failed.error_message
