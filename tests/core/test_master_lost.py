"""Regression: a follower cut off from a master the others still reach ends its requests.

Found by the simulator (``python -m chaos sweep --scenario swarm --start 201
--seeds 800``, seeds 752 and 811): the only link between n1 and the master n5
was lost while the other nodes still reached both. n1's peer set changed, it
campaigned, and the votes gossiped through the others re-elected n5, keeping
its session: nothing told n1's open request that its chunks could never
arrive, and it hung (invariant 8). In seed 752 a node restarted, adopted the
session from a heartbeat and was isolated before its peer set ever held the
master. A follower now ends its accepted requests once its master has been
missing from its peer set for ``master_lost_grace_s``.
"""

from __future__ import annotations

from sim.manual import ManualCluster
from skulk.core.commands import CommandResult, SubmitTask
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId
from skulk.core.inputs import Received, SubmitCommand
from skulk.core.messages import CommandResultMessage
from skulk.core.requests import MASTER_UNREACHABLE
from skulk.core.tasks import ChatMessage, GenerationParams


def _accepted_request(c: ManualCluster, origin: str, cid: CommandId) -> None:
    session = c.node(origin).session
    assert session is not None
    params = GenerationParams(messages=(ChatMessage(role="user", content="hi"),), max_tokens=3)
    c.submit(origin, SubmitCommand(command=SubmitTask(command_id=cid, model_id=ModelId("m"), params=params)))
    accepted = CommandResult(command_id=cid, status="accepted", instance_id=InstanceId("inst-1"))
    c.submit(origin, Received(sender=session.master, message=CommandResultMessage(session=session, result=accepted)))
    assert c.node(origin).requests.is_open(cid)


def _cluster() -> tuple[ManualCluster, NodeId, NodeId]:
    c = ManualCluster(3)
    c.boot_all()
    c.settle(until=10.0)
    session = c.node("n1").session
    assert session is not None
    origin = next(n for n in c.alive() if n != session.master)
    return c, session.master, origin


def _cut_off_from_master() -> tuple[ManualCluster, NodeId, NodeId]:
    """A 3-node cluster where ``origin`` restarted cut off from the master; the third node links both."""
    c, master, origin = _cluster()
    c.crash(origin)
    c.cut = {frozenset((origin, master))}
    c.boot(origin)
    c.settle(until=c.now + 10.0)
    session = c.node(origin).session
    assert session is not None and session.master == master, "the votes, gossiped by the third node, elect the master"
    assert all(c.node(n).session == session for n in c.alive()), "one session, which the origin follows"
    assert master not in c.node(origin).election.peers
    return c, master, origin


def test_a_request_ends_when_its_origin_cannot_reach_the_master_the_others_keep() -> None:
    c, master, origin = _cut_off_from_master()
    cid = CommandId("chat-cut")
    _accepted_request(c, origin, cid)
    accepted_at = c.now
    c.settle(until=accepted_at + 0.5)
    # The grace ran from the moment the origin followed a master it could not reach.
    c.settle(until=accepted_at + c.node(origin).config.master_lost_grace_s + 1.0)
    (chunk,) = c.delivered[cid]
    assert chunk.finish_reason == "error" and chunk.error is not None
    assert chunk.error.code == MASTER_UNREACHABLE and str(master) in chunk.error.message
    assert not c.node(origin).requests.is_open(cid)
    assert any("master_unreachable" in line for _, n, line in c.log if n == origin)


def test_a_master_back_within_the_grace_keeps_the_request() -> None:
    c, master, origin = _cut_off_from_master()
    cid = CommandId("chat-heal")
    _accepted_request(c, origin, cid)
    c.settle(until=c.now + 0.5)
    c.cut = set()  # the link comes back before the next look
    c._refresh_membership()
    c.settle(until=c.now + 3 * c.node(origin).config.master_lost_grace_s)
    assert master in c.node(origin).election.peers
    assert c.node(origin).requests.is_open(cid), "a reachable master ends nothing (the request waits for its chunks)"
    assert cid not in c.delivered
