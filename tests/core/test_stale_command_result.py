"""Regression: an answer from a deposed master does not settle a request.

Found by the simulator (``python -m chaos run swarm --seed 13``): while n5
was clogged off, n3 moved to a new session and sent a chat request (commands
are broadcast). n5, still master of its old session in its own view, acted
on the broadcast and answered "accepted". n3 took that answer although it had
sent the request in the new session, and the request waited forever for a
task that no live master would run. A node now counts an answer only from
the session it sent the command in.
"""

from __future__ import annotations

from sim.manual import ManualCluster
from skulk.core.commands import CommandResult, SubmitTask
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId
from skulk.core.inputs import Received, SubmitCommand
from skulk.core.messages import CommandResultMessage
from skulk.core.session import Session
from skulk.core.tasks import ChatMessage, GenerationParams


def test_a_result_from_another_session_is_ignored() -> None:
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
