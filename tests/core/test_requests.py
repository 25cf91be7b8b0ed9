"""The request tracker: what this node's API submitted, until it ends.

Deadlines, answers only from the session a command was sent in, and the
runner's own error code reaching the client.
"""

from __future__ import annotations

from sim.manual import ManualCluster
from skulk.core.commands import CommandResult, PlaceInstance, SubmitTask
from skulk.core.config import CoreConfig
from skulk.core.effects import CommandCompleted, DeliverChunk, SetTimer
from skulk.core.events import IndexedEvent, TaskFailed
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, TaskId, derive_id
from skulk.core.inputs import Received, SubmitCommand
from skulk.core.messages import CommandResultMessage
from skulk.core.requests import Requests
from skulk.core.session import Session
from skulk.core.state import State
from skulk.core.tasks import ChatMessage, ChunkError, GenerationParams, Task
from skulk.core.timers import RequestTimer, key

SUBMITTED = 30.54538900294016  # + 15 s rounds to a time whose distance back is < 15 s


def test_the_last_retry_timer_ends_the_request_at_its_deadline() -> None:
    """Regression: a request whose timer fires exactly at its deadline fails instead of spinning.

    Found by the simulator (``python -m chaos run partition_heal --seed 96``):
    the request tracker armed its last retry timer at ``submitted_at +
    deadline`` but judged the deadline with ``now - submitted_at >= deadline``.
    In floating point the two disagree by an ulp (30.54538900294016 + 15 ==
    45.545389002940155, yet 45.545389002940155 - 30.54538900294016 <
    15), so the timer fired, the request was "not yet" past its deadline, the
    time left rounded to zero and the timer was armed again at ``now``, forever
    (50,000 steps without simulated time moving). Both now use the same
    expression.
    """
    config = CoreConfig(command_deadline_s=15.0, command_retry_s=1.0)
    assert (SUBMITTED + 15.0) - SUBMITTED < 15.0, "the float trap this test is about"
    r = Requests(NodeId("n1"), config)
    cid = CommandId("place-1")
    effects = r.submit(SUBMITTED, PlaceInstance(command_id=cid, model_id=ModelId("m")), None).effects  # no master yet
    timer = RequestTimer(cid)
    at = next(e.at for e in effects if isinstance(e, SetTimer) and e.key == key(timer))
    for _ in range(40):  # fire each retry timer exactly when it is due, as a driver does
        effects = r.on_timer(at, timer, None).effects
        timers = [e for e in effects if isinstance(e, SetTimer) and e.key == key(timer)]
        if not timers:
            break
        assert timers[0].at > at, f"a retry timer re-armed at its own firing time {at!r}: it would spin"
        at = timers[0].at
    done = [e for e in effects if isinstance(e, CommandCompleted)]
    assert done and done[0].result.code == "unavailable", "the request gives up at its deadline"
    assert not r.is_open(cid)
    assert at == SUBMITTED + 15.0


def test_a_result_from_another_session_is_ignored() -> None:
    """Regression: an answer from a deposed master does not settle a request.

    Found by the simulator (``python -m chaos run swarm --seed 13``): while n5
    was clogged off, n3 moved to a new session and sent a chat request (commands
    are broadcast). n5, still master of its old session in its own view, acted
    on the broadcast and answered "accepted". n3 took that answer although it had
    sent the request in the new session, and the request waited forever for a
    task that no live master would run. A node now counts an answer only from
    the session it sent the command in.
    """
    c = ManualCluster(2)
    c.boot_all()
    c.settle(until=10.0)
    session = c.node("n1").session
    assert session is not None and session.master == "n2"
    cid = CommandId("chat-1")
    params = GenerationParams(messages=(ChatMessage(role="user", content="hi"),), max_tokens=3)
    c.submit("n1", SubmitCommand(command=SubmitTask(command_id=cid, model_id=ModelId("no/such-model"), params=params)))
    # A zombie master of an older session answers first.
    stale = Session(clock=session.clock - 1, master=NodeId("n2"))
    accepted = CommandResult(command_id=cid, status="accepted", instance_id=InstanceId("inst-gone"))
    c.submit("n1", Received(sender=NodeId("n2"), message=CommandResultMessage(session=stale, result=accepted)))
    assert cid not in c.completed, "a stale answer must not settle the request"
    assert c.node("n1").requests.is_open(cid)
    # The real master's answer does.
    c.settle(until=c.now + 5.0)
    done = c.completed[cid]
    assert done.result.status == "rejected" and done.result.code == "model_not_found"
    assert not c.node("n1").requests.is_open(cid)


SESSION = Session(clock=1, master=NodeId("m"))


CID = CommandId("chat-1")


TASK = TaskId(derive_id("task", CID))


REFUSAL = ChunkError(
    message="context_length_exceeded: the prompt has 9000 tokens, which fills this instance's context window of 8192 tokens",
    type="invalid_request_error",
    code="context_length_exceeded",
)


def _accepted() -> Requests:
    req = Requests(NodeId("n1"), CoreConfig())
    params = GenerationParams(messages=(ChatMessage(role="user", content="p" * 36_000),))
    req.submit(0.0, SubmitTask(command_id=CID, model_id=ModelId("m/x"), params=params), SESSION)
    req.on_result(0.1, CommandResult(command_id=CID, status="accepted", instance_id=InstanceId("i")), SESSION, SESSION)
    return req


def _ended_with(req: Requests, event: TaskFailed) -> ChunkError:
    effects = req.on_applied(0.2, IndexedEvent(index=5, event=event, at=0.2)).effects
    chunks = [e.chunk for e in effects if isinstance(e, DeliverChunk)]
    assert len(chunks) == 1 and chunks[0].finish_reason == "error" and chunks[0].error is not None, effects
    assert not req.is_open(CID)
    return chunks[0].error


def test_a_refusal_that_arrives_as_the_event_keeps_its_code() -> None:
    """A runner's refusal reaches the client with its own code, however the race with its chunk goes.

    Found by the ``context_admission`` chaos scenario: a runner refuses an
    over-long prompt in-band (an error chunk with code ``context_length_exceeded``,
    an ``invalid_request_error``) and its worker reports ``TaskFailed``. The chunk
    goes straight to the request's origin; the event goes through the master. When
    the event arrived first, the origin ended the request as ``task_failed``, a
    server error: the API answered 500 instead of 400 for the client's own
    mistake. ``TaskFailed`` now carries the runner's code and type.
    """
    err = _ended_with(_accepted(), TaskFailed(task_id=TASK, error_message=REFUSAL.message, code=REFUSAL.code,
                                              error_type=REFUSAL.type))
    assert (err.code, err.type, err.message) == ("context_length_exceeded", "invalid_request_error", REFUSAL.message)


def test_a_cluster_failure_is_still_a_server_error() -> None:
    """A runner's refusal reaches the client with its own code, however the race with its chunk goes.

    Found by the ``context_admission`` chaos scenario: a runner refuses an
    over-long prompt in-band (an error chunk with code ``context_length_exceeded``,
    an ``invalid_request_error``) and its worker reports ``TaskFailed``. The chunk
    goes straight to the request's origin; the event goes through the master. When
    the event arrived first, the origin ended the request as ``task_failed``, a
    server error: the API answered 500 instead of 400 for the client's own
    mistake. ``TaskFailed`` now carries the runner's code and type.
    """
    err = _ended_with(_accepted(), TaskFailed(task_id=TASK, error_message="runner r exited with code -11"))
    assert (err.code, err.type) == ("task_failed", "server_error")


def test_a_kv_refusal_that_arrives_as_the_event_keeps_its_retry_after() -> None:
    """Whichever reaches the origin first, the runner's chunk or the event, the client gets Retry-After."""
    err = _ended_with(_accepted(), TaskFailed(task_id=TASK, error_message="kv_budget_exhausted: ...", code="kv_budget_exhausted",
                                              error_type="service_unavailable", retry_after_s=7))  # fmt: skip
    assert (err.code, err.type, err.retry_after_s) == ("kv_budget_exhausted", "service_unavailable", 7)


def _accepted_at(task_index: int) -> Requests:
    req = Requests(NodeId("n1"), CoreConfig(request_linger_s=5.0))
    params = GenerationParams(messages=(ChatMessage(role="user", content="hi"),))
    req.submit(0.0, SubmitTask(command_id=CID, model_id=ModelId("m/x"), params=params), SESSION)
    accepted = CommandResult(command_id=CID, status="accepted", instance_id=InstanceId("i"), task_index=task_index)
    req.on_result(0.1, accepted, SESSION, SESSION)
    return req


def test_a_request_whose_task_ended_inside_a_snapshot_ends_instead_of_hanging() -> None:
    """Regression: a follower that caught up from a snapshot never learnt its request's task had failed.

    Found by the 10,000-seed nightly (``python -m chaos run log_compaction --seed 141``): the task of
    n2's request ran on n1, which crashed; the master indexed ``TaskFailed`` and ``TaskDeleted``
    (126, 127) while n2 was missing 112; before the gap filled, n2 installed a snapshot at 143,
    which skipped the two events, so the request tracker never saw them and the client waited
    forever. A snapshot at or after an index at which the task existed, without the task, now
    ends the request: its last chunk gets ``request_linger_s``, then the client gets an error.
    """
    req = _accepted_at(83)
    snapshot = State(session=SESSION, last_index=143)  # no tasks: this one ended in between
    effects = req.on_state_jumped(8.3, snapshot).effects
    timers = [e for e in effects if isinstance(e, SetTimer) and e.key == key(RequestTimer(CID))]
    assert [t.at for t in timers] == [8.3 + 5.0] and req.is_open(CID), "the last chunk may still arrive"
    effects = req.on_timer(13.3, RequestTimer(CID), SESSION).effects
    chunks = [e.chunk for e in effects if isinstance(e, DeliverChunk)]
    assert len(chunks) == 1 and chunks[0].finish_reason == "error" and chunks[0].error is not None
    assert chunks[0].error.code == "stream_lost" and "catching up" in chunks[0].error.message
    assert not req.is_open(CID)


def test_a_snapshot_that_predates_the_task_or_still_holds_it_leaves_the_request_open() -> None:
    req = _accepted_at(83)
    assert req.on_state_jumped(8.3, State(session=SESSION, last_index=82)).effects == []  # before TaskCreated
    task = Task(task_id=TASK, command_id=CID, origin=NodeId("n1"), instance_id=InstanceId("i"), model_id=ModelId("m/x"),
                kind="chat", params=GenerationParams(messages=(ChatMessage(role="user", content="hi"),)))
    assert req.on_state_jumped(8.3, State(session=SESSION, last_index=143, tasks={TASK: task})).effects == []
    assert req.is_open(CID)


def test_a_finished_stream_is_not_ended_twice_by_a_later_snapshot() -> None:
    req = _accepted_at(83)
    req.on_state_jumped(8.3, State(session=SESSION, last_index=143))
    assert req.on_state_jumped(9.0, State(session=SESSION, last_index=160)).effects == [], "already lingering"
