"""The worker: runners for this node's shards, their deadlines and reports.
"""

from __future__ import annotations

from skulk.core import placement, runner_policy
from skulk.core.codec import from_wire, to_wire
from skulk.core.config import CoreConfig
from skulk.core.effects import SetTimer, StartRunner, StopRunner
from skulk.core.events import Event, InstanceCreated, RunnerStatusUpdated, TaskFailed
from skulk.core.ids import CommandId, NodeId, RunnerId, TaskId, derive_id
from skulk.core.instances import GROUP_CONNECT_TIMEOUT, RunnerConnecting, RunnerFailed
from skulk.core.session import Session
from skulk.core.tasks import ChunkError, TokenChunk
from skulk.core.timers import RunnerDeadlineTimer, parse
from skulk.core.worker import Worker
from tests.core.builders import (
    CONFIG,
    GB,
    apply_events,
    build_state,
    cards_of,
    command,
    files_on,
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
    worker.on_memory(mem(64 * GB))
    state = files_on(state, card, ["a", "b"], keeper=worker.files)
    effects = worker.reconcile(0.0, state).effects
    starts = [e for e in effects if isinstance(e, StartRunner)]
    assert len(starts) == 1
    return worker, starts[0].spec.runner_id


def _deadline_at(effects: list) -> float:
    timers = [e for e in effects if isinstance(e, SetTimer) and isinstance(parse(e.key), RunnerDeadlineTimer)]
    assert len(timers) == 1, effects
    return timers[0].at


def test_the_backstop_waits_past_the_runners_own_deadline():
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
    worker, runner_id = _two_rank_world()
    out = worker.on_status(1.0, runner_id, RunnerConnecting())
    at = _deadline_at(out.effects)
    assert at == 1.0 + DEADLINE_S + runner_policy.GROUP_CONNECT_REPORT_GRACE_S
    assert runner_policy.GROUP_CONNECT_REPORT_GRACE_S >= 15.0  # the real guard probes up to 15 peers, 1 s each
    # At the deadline itself the backstop does nothing: the runner is still the one to speak.
    assert not worker.on_deadline(1.0 + DEADLINE_S, RunnerDeadlineTimer(runner_id))
    # The runner's own report, with its diagnosis, is what goes to the master.
    diagnosis = RunnerFailed(
        error_message="group connect deadline (120 s) expired: rank 1 at 10.0.0.2:52501 is unreachable from rank 0",
        code=GROUP_CONNECT_TIMEOUT,
    )
    out = worker.on_status(1.0 + DEADLINE_S + 0.5, runner_id, diagnosis)
    assert [e.status for e in out.events if isinstance(e, RunnerStatusUpdated)] == [diagnosis]
    assert not [e for e in out.effects if isinstance(e, StopRunner)]


def test_a_silent_runner_still_meets_the_backstop():
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
    worker, runner_id = _two_rank_world()
    at = _deadline_at(worker.on_status(1.0, runner_id, RunnerConnecting()).effects)
    out = worker.on_deadline(at, RunnerDeadlineTimer(runner_id))
    assert [type(e) for e in out.effects if isinstance(e, StopRunner)] == [StopRunner]
    (failed,) = [e.status for e in out.events if isinstance(e, RunnerStatusUpdated)]
    assert isinstance(failed, RunnerFailed) and failed.code == GROUP_CONNECT_TIMEOUT and not failed.permanent
    assert f"{DEADLINE_S:g} s" in failed.error_message


SESSION = Session(clock=1, master=NodeId("m"))


CID = CommandId("chat-1")


TASK = TaskId(derive_id("task", CID))


REFUSAL = ChunkError(
    message="context_length_exceeded: the prompt has 9000 tokens, which fills this instance's context window of 8192 tokens",
    type="invalid_request_error",
    code="context_length_exceeded",
)


def test_the_worker_reports_the_runners_code_and_type() -> None:
    """A runner's refusal reaches the client with its own code, however the race with its chunk goes.

    Found by the ``context_admission`` chaos scenario: a runner refuses an
    over-long prompt in-band (an error chunk with code ``context_length_exceeded``,
    an ``invalid_request_error``) and its worker reports ``TaskFailed``. The chunk
    goes straight to the request's origin; the event goes through the master. When
    the event arrived first, the origin ended the request as ``task_failed``, a
    server error: the API answered 500 instead of 400 for the client's own
    mistake. ``TaskFailed`` now carries the runner's code and type.
    """
    worker = Worker(NodeId("n1"), CoreConfig())
    chunk = TokenChunk(command_id=CID, task_id=TASK, seq=0, finish_reason="error", error=REFUSAL)
    (event,) = worker.on_output(1.0, RunnerId("r"), chunk).events
    assert event == TaskFailed(
        task_id=TASK, error_message=REFUSAL.message, code="context_length_exceeded", error_type="invalid_request_error"
    )
    assert from_wire(Event, to_wire(event)) == event  # the code survives the wire


def test_the_worker_reports_a_kv_refusals_retry_after() -> None:
    """A runner's 503 ``kv_budget_exhausted`` keeps its Retry-After through ``TaskFailed`` (and the wire)."""
    refusal = ChunkError(message="kv_budget_exhausted: ...", type="service_unavailable", code="kv_budget_exhausted", retry_after_s=7)
    chunk = TokenChunk(command_id=CID, task_id=TASK, seq=0, finish_reason="error", error=refusal)
    (event,) = Worker(NodeId("n1"), CoreConfig()).on_output(1.0, RunnerId("r"), chunk).events
    assert isinstance(event, TaskFailed) and (event.code, event.retry_after_s) == ("kv_budget_exhausted", 7)
    assert from_wire(Event, to_wire(event)) == event
