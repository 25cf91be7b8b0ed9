"""Regression: a master's AppendLog effects leave in index order.

Found by the simulator (``python -m chaos run swarm --seed 28``): a node
restarted inside a partition, its API took requests before any session
existed, and it then won a campaign alone. On the session change the request
tracker broadcast the waiting commands *before* the new master indexed
``SessionStarted``; the node's loopback handled its own broadcast at once and
spliced the effects (an event at index 11) in front of the effects already
produced (indices 0-10). The driver was told to append index 11 to the disk
log before index 0. Looped-back effects now go to the end of the queue, so
effects leave in the order they were produced.
"""

from __future__ import annotations

from sim.manual import ManualCluster
from skulk.core.commands import DeleteInstance, PlaceInstance
from skulk.core.effects import AppendLog, NodeRecord
from skulk.core.election import CAMPAIGN_TIMER
from skulk.core.events import InstanceDeleted, SessionStarted
from skulk.core.ids import CommandId, NodeId
from skulk.core.inputs import Boot, SubmitCommand, TimerFired
from skulk.core.node import CoreNode
from skulk.core.state import encode_state
from skulk.modelcards import load_cards

MODEL = "skulk/tiny-qwen2"


def test_commands_waiting_for_a_session_are_indexed_after_session_started() -> None:
    cards = load_cards()
    # A state holding one instance, as a node would have persisted it.
    c = ManualCluster(1, cards=cards)
    c.boot_all()
    c.settle(until=10.0)
    c.submit("n1", SubmitCommand(command=PlaceInstance(command_id=CommandId("place-1"), model_id=MODEL)))
    c.settle(until=c.now + 10.0)
    iid = c.completed["place-1"].result.instance_id
    assert iid is not None
    record = NodeRecord(node_id=NodeId("n1"), election_clock=5, state=encode_state(c.node("n1").state))

    node = CoreNode(NodeId("n1"), c.config, cards=cards, record=record)
    node.handle(0.0, Boot())
    # The API takes a command before any master is known: it waits for a session.
    node.handle(0.1, SubmitCommand(command=DeleteInstance(command_id=CommandId("del-1"), instance_id=iid)))
    effects = node.handle(3.5, TimerFired(key=CAMPAIGN_TIMER))  # wins alone, becomes master
    appended = [e.indexed for e in effects if isinstance(e, AppendLog)]
    assert node.is_master and appended, "the node should have become master and indexed"
    assert [i.index for i in appended] == list(range(len(appended))), "AppendLog effects out of index order"
    assert isinstance(appended[0].event, SessionStarted)
    assert any(isinstance(i.event, InstanceDeleted) for i in appended[1:]), "the waiting command was executed"
