"""A runner's refusal reaches the client with its own code, however the race with its chunk goes.

Found by the ``context_admission`` chaos scenario: a runner refuses an
over-long prompt in-band (an error chunk with code ``context_length_exceeded``,
an ``invalid_request_error``) and its worker reports ``TaskFailed``. The chunk
goes straight to the request's origin; the event goes through the master. When
the event arrived first, the origin ended the request as ``task_failed``, a
server error: the API answered 500 instead of 400 for the client's own
mistake. ``TaskFailed`` now carries the runner's code and type.
"""

from __future__ import annotations

from skulk.core.codec import from_wire, to_wire
from skulk.core.commands import CommandResult, SubmitTask
from skulk.core.config import CoreConfig
from skulk.core.effects import DeliverChunk
from skulk.core.events import Event, IndexedEvent, TaskFailed
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId, TaskId, derive_id
from skulk.core.requests import Requests
from skulk.core.session import Session
from skulk.core.tasks import ChatMessage, ChunkError, GenerationParams, TokenChunk
from skulk.core.worker import Worker

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
    effects = req.on_applied(0.2, IndexedEvent(index=5, event=event, at=0.2))
    chunks = [e.chunk for e in effects if isinstance(e, DeliverChunk)]
    assert len(chunks) == 1 and chunks[0].finish_reason == "error" and chunks[0].error is not None, effects
    assert not req.is_open(CID)
    return chunks[0].error


def test_the_worker_reports_the_runners_code_and_type() -> None:
    worker = Worker(NodeId("n1"), CoreConfig())
    chunk = TokenChunk(command_id=CID, task_id=TASK, seq=0, finish_reason="error", error=REFUSAL)
    (event,) = worker.on_output(1.0, RunnerId("r"), chunk)
    assert event == TaskFailed(
        task_id=TASK, error_message=REFUSAL.message, code="context_length_exceeded", error_type="invalid_request_error"
    )
    assert from_wire(Event, to_wire(event)) == event  # the code survives the wire


def test_a_refusal_that_arrives_as_the_event_keeps_its_code() -> None:
    err = _ended_with(_accepted(), TaskFailed(task_id=TASK, error_message=REFUSAL.message, code=REFUSAL.code,
                                              error_type=REFUSAL.type))
    assert (err.code, err.type, err.message) == ("context_length_exceeded", "invalid_request_error", REFUSAL.message)


def test_a_cluster_failure_is_still_a_server_error() -> None:
    err = _ended_with(_accepted(), TaskFailed(task_id=TASK, error_message="runner r exited with code -11"))
    assert (err.code, err.type) == ("task_failed", "server_error")


def test_a_kv_budget_refusal_keeps_its_retry_after_either_way() -> None:
    refusal = ChunkError(message="kv_budget_exhausted: ...", type="service_unavailable", code="kv_budget_exhausted", retry_after_s=7)
    worker = Worker(NodeId("n1"), CoreConfig())
    chunk = TokenChunk(command_id=CID, task_id=TASK, seq=0, finish_reason="error", error=refusal)
    (event,) = worker.on_output(1.0, RunnerId("r"), chunk)
    assert isinstance(event, TaskFailed) and event.retry_after_s == 7
    assert from_wire(Event, to_wire(event)) == event
    err = _ended_with(_accepted(), event)
    assert (err.code, err.type, err.retry_after_s) == ("kv_budget_exhausted", "service_unavailable", 7)
