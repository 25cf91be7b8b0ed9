"""The master (DESIGN.md section 2, "Event log (master side)", "Failover carryover"):
the single writer of a session's log, its ingest cap, its own policy
(auto-placement, re-placement after a failed group connect).

Most tests drive real core nodes by hand (``sim.manual.ManualCluster``); the
re-placement tests drive a ``Master`` directly.
"""

from __future__ import annotations

from typing import get_args

from sim.manual import ManualCluster
from skulk.cards import load_cards
from skulk.core import placement
from skulk.core.commands import Command, DeleteInstance, PlaceInstance, SubmitTask
from skulk.core.config import CoreConfig
from skulk.core.events import (
    LOCAL_EVENT_TYPES,
    InstanceCreated,
    RunnerStatusUpdated,
    SessionStarted,
    TaskCreated,
    TaskDeleted,
)
from skulk.core.ids import CommandId, ModelId, NodeId
from skulk.core.inputs import AbandonRequest, SubmitCommand
from skulk.core.instances import GROUP_CONNECT_TIMEOUT, RunnerFailed
from skulk.core.ingest import INGEST_RULES
from skulk.core.master import COMMAND_RULES, Master
from skulk.core.messages import LocalEventMessage
from skulk.core.session import Incarnation
from skulk.core.state import apply, digest
from skulk.core.tasks import ChatMessage, GenerationParams
from tests.core.builders import (
    CONFIG,
    GB,
    apply_events,
    build_state,
    cards_of,
    full_mesh,
    make_card,
    mem,
)


def _settled(n: int, **config) -> ManualCluster:
    c = ManualCluster(n, cards=load_cards(), config=CoreConfig(**config))
    c.boot_all()
    c.settle(until=10.0)
    return c


def _same_state_everywhere(c: ManualCluster) -> None:
    assert len({digest(c.node(n).state) for n in c.alive()}) == 1


def test_indices_are_dense_from_zero_and_every_follower_applies_the_masters_log() -> None:
    c = _settled(3)
    c.settle(until=c.now + 30.0)  # telemetry keeps indexing events
    master = c.node(c.masters()[0]).master
    assert [e.index for e in master._log] == list(range(master.next_index))
    for n in c.alive():
        assert c.node(n).state.last_index == master.next_index - 1
    _same_state_everywhere(c)


def test_duplicate_commands_are_executed_once() -> None:
    c = _settled(2)
    from skulk.core.commands import PlaceInstance

    place = PlaceInstance(command_id="p", model_id="skulk/tiny-qwen2")
    c.submit("n1", SubmitCommand(command=place))
    c.settle(until=c.now + 5.0)
    master = c.node(c.masters()[0]).master
    count = master.next_index
    # The same command arriving again (a retry) is answered from the dedupe cache.
    effects = master.on_command(c.now, "n1", place).effects
    assert master.next_index == count and len(effects) == 1
    assert len(c.node("n1").state.instances) == 1


def test_a_cancel_that_overtakes_its_submit_still_cancels_it() -> None:
    c = _settled(2)
    master = c.node(c.masters()[0]).master
    from skulk.core.commands import CancelTask, PlaceInstance

    c.submit("n1", SubmitCommand(command=PlaceInstance(command_id="p", model_id="skulk/tiny-qwen2")))
    c.settle(until=c.now + 5.0)
    master.on_command(c.now, "n1", CancelTask(command_id="c", target="late"))
    params = GenerationParams(messages=(ChatMessage(role="user", content="x"),))
    effects = master.on_command(c.now, "n1", SubmitTask(command_id="late", model_id="skulk/tiny-qwen2", params=params)).effects
    (reply,) = [e for e in effects if hasattr(e, "message") and hasattr(e.message, "result")]
    assert reply.message.result.status == "rejected" and reply.message.result.code == "cancelled"


def test_the_master_refuses_task_parameters_that_could_not_be_replicated() -> None:
    # A seed beyond 64 bits once took an index, could not be encoded for the
    # followers and stalled the whole cluster's log behind it.
    c = _settled(2)
    from skulk.core.commands import PlaceInstance

    c.submit("n1", SubmitCommand(command=PlaceInstance(command_id="p", model_id="skulk/tiny-qwen2")))
    c.settle(until=c.now + 5.0)
    master = c.node(c.masters()[0]).master
    before = master.next_index
    for bad in (
        GenerationParams(messages=(ChatMessage(role="user", content="x"),), seed=2**70),
        GenerationParams(messages=(ChatMessage(role="user", content="x"),), max_tokens=0),
        GenerationParams(messages=(ChatMessage(role="user", content="x"),), top_p=float("nan")),
        GenerationParams(messages=()),
    ):
        effects = master.on_command(c.now, "n1", SubmitTask(command_id=f"bad-{bad.seed}-{bad.max_tokens}-{len(bad.messages or ())}-{bad.top_p}", model_id="skulk/tiny-qwen2", params=bad)).effects
        (reply,) = [e for e in effects if hasattr(e, "message") and hasattr(e.message, "result")]
        assert reply.message.result.status == "rejected" and reply.message.result.code == "invalid_request"
    assert master.next_index == before


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


def test_abandoned_requests_against_a_loading_model_index_at_most_two_events_each() -> None:
    c = ManualCluster(3, cards=load_cards(), runner_load_s=1_000.0)  # the model never finishes loading
    c.boot_all()
    c.settle(until=10.0)
    _place(c, "n1", min_nodes=1)
    master = c.masters()[0]
    start = c.node(master).master.next_index
    n = 50
    for i in range(n):
        _chat(c, "n2", f"storm-{i}")
    c.settle(until=c.now + 2.0)
    for i in range(n):
        c.submit("n2", AbandonRequest(command_id=f"storm-{i}"))
    c.settle(until=c.now + 30.0)
    log = c.node(master).master._log
    task_events = [e for e in log if e.index >= start and isinstance(e.event, (TaskCreated, TaskDeleted))]
    assert len(task_events) <= 2 * n
    assert not c.node(master).state.tasks, "abandoned tasks leaked"
    assert len({s for _, _, s in c.session_changes if s.is_master}) == 1, "the storm caused an election"


def test_every_session_starts_with_session_started_at_index_zero() -> None:
    c = _cluster(3)
    master = c.masters()[0]
    first = c.node(master).master._log[0]
    assert first.index == 0 and isinstance(first.event, SessionStarted)


def test_a_lone_node_places_its_auto_place_model_as_soon_as_it_knows_its_memory() -> None:
    c = ManualCluster(1, cards=load_cards(), config=CoreConfig(auto_place=(MODEL,)))
    c.boot_all()
    c.settle(until=10.0)
    (inst,) = c.node("n1").state.instances.values()
    assert inst.shard_assignments.model_id == MODEL


def test_every_node_asking_for_auto_place_still_yields_one_instance() -> None:
    c = ManualCluster(3, cards=load_cards(), config=CoreConfig(auto_place=(MODEL,)))
    c.boot_all()
    c.settle(until=30.0)
    models = [i.shard_assignments.model_id for i in c.node("n1").state.instances.values()]
    assert models == [MODEL]


def test_a_deleted_auto_placed_instance_is_not_re_placed_in_the_same_session() -> None:
    c = ManualCluster(1, cards=load_cards(), config=CoreConfig(auto_place=(MODEL,)))
    c.boot_all()
    c.settle(until=10.0)
    (iid,) = c.node("n1").state.instances
    c.submit("n1", SubmitCommand(command=DeleteInstance(command_id="del", instance_id=iid)))
    c.settle(until=c.now + 30.0)
    assert not c.node("n1").state.instances


def test_an_unknown_auto_place_model_is_reported_once_and_nothing_is_placed() -> None:
    c = ManualCluster(1, cards=load_cards(), config=CoreConfig(auto_place=("no/such-model",)))
    c.boot_all()
    c.settle(until=20.0)
    assert not c.node("n1").state.instances
    assert sum("cannot auto-place no/such-model" in m for _, _, m in c.log) == 1


def _master_with_instance(links, names=("a", "b")):
    state = build_state({n: mem(64 * GB) for n in names}, links)
    card = make_card(weight_bytes=GB)
    cmd = PlaceInstance(command_id=CommandId("p"), model_id=ModelId("test/model"), min_nodes=len(names))
    inst = placement.place(state, cmd, cards_of(card), CONFIG)
    assert isinstance(inst, placement.Placed)
    state = apply_events(state, [InstanceCreated(instance=inst.instance)])
    session = state.session
    assert session is not None
    holder = {"state": state}

    def apply_own(indexed):
        holder["state"] = apply(holder["state"], indexed)
        return holder["state"]

    master = Master(NodeId(session.master), CONFIG, session, cards_of(card), apply_own)
    master.state = state
    master.next_index = state.last_index + 1
    return master, inst.instance, holder


def _fail_connect(master: Master, inst, reporter: str, unreachable_rank: int | None = None):
    runner = inst.shard_assignments.node_to_runner[reporter]
    failed = RunnerFailed(
        error_message="group connect timed out", code=GROUP_CONNECT_TIMEOUT, unreachable_rank=unreachable_rank
    )
    event = RunnerStatusUpdated(runner_id=runner, node_id=NodeId(reporter), instance_id=inst.instance_id, status=failed)
    msg = LocalEventMessage(
        origin=NodeId(reporter),
        session=master.session,
        origin_idx=0,
        event=event,
        incarnation=Incarnation(number=1, boot_at=0.0),
    )
    return master.on_local_event(0.0, msg)


def test_a_failed_hop_is_avoided_when_another_link_exists() -> None:
    links = full_mesh(["a", "b"], "thunderbolt", "169.254.0") + full_mesh(["a", "b"], "ethernet", "192.168.1")
    master, inst, holder = _master_with_instance(links)
    assert {h.kind for h in inst.ring} == {"thunderbolt"}
    _fail_connect(master, inst, reporter=inst.ring[0].node_id)
    state = holder["state"]
    assert inst.instance_id not in state.instances
    (new,) = state.instances.values()
    assert new.generation == inst.generation + 1 and new.ephemeral_port != inst.ephemeral_port
    hop_to_rank1 = new.ring[1]
    # The hop that failed (rank 0 -> rank 1 over thunderbolt) now runs over ethernet.
    assert hop_to_rank1.kind == "ethernet", new.ring


def test_the_rank_the_runner_names_decides_the_avoided_link_whoever_reports_first() -> None:
    # ring_deadline seed 457: rank 2 reported first, and the master avoided rank
    # 2's own hop instead of the dead one into rank 1 the runner had named.
    names = ("a", "b", "c")
    links = full_mesh(list(names), "thunderbolt", "169.254.0") + full_mesh(list(names), "ethernet", "192.168.1")
    master, inst, holder = _master_with_instance(links, names)
    assert [h.kind for h in inst.ring] == ["thunderbolt"] * 3
    dead = {inst.ring[0].node_id, inst.ring[1].node_id}
    _fail_connect(master, inst, reporter=inst.ring[2].node_id, unreachable_rank=1)
    (new,) = holder["state"].instances.values()
    pairs = [({new.ring[h.rank - 1].node_id, h.node_id}, h.kind) for h in new.ring]
    # Neither direction of the dead thunderbolt pair is used; the other hops keep thunderbolt.
    assert all(kind == "ethernet" for pair, kind in pairs if pair == dead), new.ring
    assert all(kind == "thunderbolt" for pair, kind in pairs if pair != dead), new.ring


def test_when_the_failed_link_is_the_only_one_a_fresh_port_alone_is_tried() -> None:
    master, inst, holder = _master_with_instance(full_mesh(["a", "b"], "ethernet", "192.168.1"))
    _fail_connect(master, inst, reporter=inst.ring[0].node_id)
    (new,) = holder["state"].instances.values()
    assert new.generation == inst.generation + 1 and new.ephemeral_port != inst.ephemeral_port
    assert {h.kind for h in new.ring} == {"ethernet"}


def test_every_command_and_local_event_type_has_one_rule() -> None:
    assert set(COMMAND_RULES) == set(get_args(Command))
    assert set(INGEST_RULES) == set(LOCAL_EVENT_TYPES)
