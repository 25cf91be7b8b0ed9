"""``CoreNode``: one node's whole protocol, on real core nodes driven by hand.

Failover carryover and requests on a dead master (DESIGN.md section 2,
invariants 5 and 8), the loopback of a node's own messages, a master out of
reach, and the routing tables (every input, message and timer kind has a route).
"""

from __future__ import annotations

from typing import get_args

import msgspec
import pytest

from sim.manual import ManualCluster
from skulk.cards import load_cards
from skulk.core.commands import CommandResult, DeleteInstance, PlaceInstance, SubmitTask
from skulk.core.config import CoreConfig
from skulk.core.effects import AppendLog, Log, NodeRecord
from skulk.core.events import InstanceDeleted, SessionStarted
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId
from skulk.core.inputs import Boot, InfoObserved, Input, ModelAvailable, Received, Shutdown, SubmitCommand, TimerFired
from skulk.core.instances import RunnerReady
from skulk.core.messages import CommandResultMessage, Message
from skulk.core.node import INPUT_ROUTES, MESSAGE_ROUTES, TIMER_ROUTES, CoreNode, _check_covers
from skulk.core.requests import MASTER_UNREACHABLE
from skulk.core.state import digest, encode_state
from skulk.core.tasks import ChatMessage, GenerationParams
from skulk.core.telemetry import Memory, MemoryInfo
from skulk.core.timers import TIMER_KINDS, CampaignTimer, key

MODEL = "skulk/tiny-qwen2"


def _cluster(n: int = 3) -> ManualCluster:
    c = ManualCluster(n, cards=load_cards())
    c.boot_all()
    c.settle(until=10.0)
    return c


def _place(c: ManualCluster, via: str, min_nodes: int) -> str:
    c.submit(via, SubmitCommand(command=PlaceInstance(command_id="place-1", model_id=MODEL, min_nodes=min_nodes)))
    c.settle(until=c.now + 10.0)
    done = c.completed["place-1"]
    assert done.result.status == "accepted", done.result
    assert done.result.instance_id is not None
    return done.result.instance_id


def _chat(c: ManualCluster, via: str, cid: str) -> None:
    params = GenerationParams(messages=(ChatMessage(role="user", content="hi"),), max_tokens=3)
    c.submit(via, SubmitCommand(command=SubmitTask(command_id=cid, model_id=MODEL, params=params)))


def _converged(c: ManualCluster) -> None:
    digests = {digest(c.node(n).state) for n in c.alive()}
    assert len(digests) == 1, "live nodes disagree on the state digest"


def test_a_placed_model_serves_a_request_through_any_node() -> None:
    c = _cluster(3)
    iid = _place(c, "n1", min_nodes=3)
    state = c.node("n1").state
    inst = state.instances[iid]
    assert sorted(inst.shard_assignments.node_to_runner) == ["n1", "n2", "n3"]
    assert all(isinstance(s, RunnerReady) for s in state.runners.values()) and len(state.runners) == 3
    _chat(c, "n2", "chat-1")
    c.settle(until=c.now + 10.0)
    chunks = c.delivered["chat-1"]
    assert [ch.text for ch in chunks] == ["t0", "t1", "t2"] and chunks[-1].finish_reason == "stop"
    assert not c.node("n2").state.tasks  # the task left the state once done
    _converged(c)


def test_failover_keeps_placements_whose_hosts_survive_and_never_restarts_their_runners() -> None:
    c = _cluster(3)
    iid = _place(c, "n1", min_nodes=2)
    hosts = sorted(c.node("n1").state.instances[iid].shard_assignments.node_to_runner)
    master = c.masters()[0]
    if master in hosts:
        # Make the master a non-host: re-place on the other two nodes.
        others = [n for n in c.alive() if n != master]
        c.submit("n1", SubmitCommand(command=PlaceInstance(command_id="place-2", model_id=MODEL, min_nodes=2, excluded_nodes=(master,))))
        c.settle(until=c.now + 10.0)
        iid = c.completed["place-2"].result.instance_id
        hosts = others
    started_before = {n: dict(c.hosts[n].runners) for n in hosts}
    c.crash(master)
    c.settle(until=c.now + 15.0)
    (new_master,) = c.masters()
    state = c.node(new_master).state
    assert iid in state.instances, "a failover lost a placement whose hosts survived (invariant 5)"
    first = [e for e in c.node(new_master).replica.last_state.instances]
    assert iid in first
    for n in hosts:
        assert c.hosts[n].runners == started_before[n], "a runner was restarted by a master change"
    assert all(isinstance(state.runners[r], RunnerReady) for r in state.instances[iid].shard_assignments.runner_to_shard)
    _chat(c, hosts[0], "after")
    c.settle(until=c.now + 10.0)
    assert c.delivered["after"][-1].finish_reason == "stop"
    _converged(c)


def test_requests_open_on_a_dead_master_end_with_a_clear_error() -> None:
    c = _cluster(3)
    _place(c, "n1", min_nodes=1)
    master = c.masters()[0]
    via = next(n for n in c.alive() if n != master)
    _chat(c, via, "inflight")
    # Deliver just enough for the master to accept, then kill it before tokens flow.
    for _ in range(200):
        if "inflight" in c.completed:
            break
        if c.inflight:
            c.deliver(0)
        else:
            c.fire_next_timer()
    assert c.completed["inflight"].result.status == "accepted"
    c.crash(master)
    c.settle(until=c.now + 15.0)
    chunks = c.delivered.get("inflight", [])
    assert chunks, "the request was left hanging"
    last = chunks[-1]
    assert last.finish_reason in ("stop", "error")
    if last.finish_reason == "error":
        assert last.error is not None and "retry" in last.error.message


def test_a_task_running_on_a_node_that_restarts_fails_instead_of_streaming_twice() -> None:
    # Found by chaos membership_churn seeds 60 and 154: the restarted worker ran
    # the task again from seq 0 and the client's node, already past it, dropped
    # every chunk including the last, so the request never ended.
    c = _cluster(3)
    master = c.masters()[0]
    host, origin = [n for n in c.alive() if n != master][:2]
    others = tuple(n for n in c.alive() if n != host)
    c.submit(origin, SubmitCommand(command=PlaceInstance(command_id="p", model_id=MODEL, excluded_nodes=others)))
    c.settle(until=c.now + 10.0)
    _chat(c, origin, "long")
    # Deliver until the host's runner has the task, then crash the host.
    for _ in range(500):
        if c.hosts[host].tasks:
            break
        if c.inflight:
            c.deliver(0)
        else:
            c.fire_next_timer()
    assert c.hosts[host].tasks, "the task was never dispatched"
    c.settle(until=c.now + 0.2)  # the running status reaches the master
    c.crash(host)
    c.boot(host)
    c.settle(until=c.now + 30.0)
    chunks = c.delivered.get("long", [])
    assert chunks and chunks[-1].finish_reason == "error", chunks
    assert "restarted" in chunks[-1].error.message
    assert not c.node(origin).requests.is_open("long")


def test_commands_waiting_for_a_session_are_indexed_after_session_started() -> None:
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
    effects = node.handle(3.5, TimerFired(key=key(CampaignTimer())))  # wins alone, becomes master
    appended = [e.indexed for e in effects if isinstance(e, AppendLog)]
    assert node.is_master and appended, "the node should have become master and indexed"
    assert [i.index for i in appended] == list(range(len(appended))), "AppendLog effects out of index order"
    assert isinstance(appended[0].event, SessionStarted)
    assert any(isinstance(i.event, InstanceDeleted) for i in appended[1:]), "the waiting command was executed"


def _accepted_request(c: ManualCluster, origin: str, cid: CommandId) -> None:
    session = c.node(origin).session
    assert session is not None
    params = GenerationParams(messages=(ChatMessage(role="user", content="hi"),), max_tokens=3)
    c.submit(origin, SubmitCommand(command=SubmitTask(command_id=cid, model_id=ModelId("m"), params=params)))
    accepted = CommandResult(command_id=cid, status="accepted", instance_id=InstanceId("inst-1"))
    c.submit(origin, Received(sender=session.master, message=CommandResultMessage(session=session, result=accepted)))
    assert c.node(origin).requests.is_open(cid)


def _mesh() -> tuple[ManualCluster, NodeId, NodeId]:
    c = ManualCluster(3)
    c.boot_all()
    c.settle(until=10.0)
    session = c.node("n1").session
    assert session is not None
    origin = next(n for n in c.alive() if n != session.master)
    return c, session.master, origin


def _cut_off_from_master() -> tuple[ManualCluster, NodeId, NodeId]:
    """A 3-node cluster where ``origin`` restarted cut off from the master; the third node links both."""
    c, master, origin = _mesh()
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


# --- routing -------------------------------------------------------------------------------------


def test_every_input_message_and_timer_kind_has_exactly_one_route() -> None:
    assert set(INPUT_ROUTES) == set(get_args(Input))
    assert set(MESSAGE_ROUTES) == set(get_args(Message))
    assert set(TIMER_ROUTES) == set(TIMER_KINDS)


def test_the_import_time_check_names_a_type_without_a_route() -> None:
    partial = {k: v for k, v in INPUT_ROUTES.items() if k is not Shutdown}
    with pytest.raises(AssertionError, match=r"missing \['Shutdown'\]"):
        _check_covers(partial, get_args(Input), "input")


def test_a_timer_no_kind_owns_is_logged_as_stale_not_an_error() -> None:
    node = CoreNode(NodeId("n1"), CoreConfig(), cards={})
    node.handle(0.0, Boot())
    effects = node.handle(1.0, TimerFired(key="nobody.owns.this"))
    assert effects == [Log(level="debug", message="stale timer nobody.owns.this")]


def test_a_model_card_reaches_the_core_only_with_model_available() -> None:
    """Regression (issue 16): the runtime used to add a new local model's card into the core's dict itself."""
    c = ManualCluster(1)
    c.boot_all()
    c.settle(until=10.0)
    node = c.node("n1")
    card = load_cards()[ModelId("skulk/tiny-qwen2")]
    cards_before = dict(node.cards)
    assert card.model_id not in node.cards
    c.submit("n1", ModelAvailable(model_id=card.model_id, card=card))
    assert node.cards == {**cards_before, card.model_id: card}
    assert any(m.endswith(f"new local model {card.model_id}: placeable from now on") for _, _, m in c.log)
    # A second card for a known model is ignored: built-in and operator cards win.
    other = msgspec.structs.replace(card, weight_bytes=card.weight_bytes + 1)
    c.submit("n1", ModelAvailable(model_id=card.model_id, card=other))
    assert node.cards[card.model_id] == card
    c.settle(until=c.now + 5.0)
    assert card.model_id in node.state.downloads["n1"], "the files are reported as downloaded"
    # The master on this node places it from now on.
    c.submit("n1", SubmitCommand(command=PlaceInstance(command_id=CommandId("p"), model_id=ModelId(card.model_id))))
    c.settle(until=c.now + 10.0)
    assert c.completed["p"].result.status == "accepted", c.completed["p"].result


def test_memory_reaches_the_worker_only_through_info_observed() -> None:
    """Regression (issue 16): the node used to set ``worker.memory`` itself; now the worker takes it as an input."""
    node = CoreNode(NodeId("n1"), CoreConfig(), cards={})
    node.handle(0.0, Boot())
    assert node.worker.memory is None
    reading = MemoryInfo(ram_total=Memory(in_bytes=64 * 2**30), ram_available=Memory(in_bytes=48 * 2**30))
    node.handle(1.0, InfoObserved(memory=reading))
    assert node.worker.memory == reading
