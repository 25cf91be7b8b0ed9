"""The replicated event log (DESIGN.md section 2, "Event log" master and follower sides)."""

from __future__ import annotations

from sim.manual import ManualCluster
from skulk.core.commands import SubmitTask
from skulk.core.config import CoreConfig
from skulk.core.events import IndexedEvent, NodeGatheredInfo
from skulk.core.inputs import SubmitCommand
from skulk.core.messages import GlobalEvent, SyncResponse
from skulk.core.state import digest
from skulk.core.tasks import ChatMessage, GenerationParams
from skulk.modelcards import load_cards


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


def test_a_lost_tail_is_fetched_after_the_masters_heartbeat_even_when_idle() -> None:
    c = _settled(3, telemetry_interval_s=1_000.0)
    master_id = c.masters()[0]
    follower = next(n for n in c.alive() if n != master_id)
    # Make the master index one event and lose it on the way to one follower.
    before = c.node(follower).state.last_index
    effects = c.node(master_id)._raise(c.now, [NodeGatheredInfo(node_id=master_id)])
    c._carry_out(master_id, effects)
    c.inflight = [m for m in c.inflight if not (m.to == follower and isinstance(m.message, GlobalEvent))]
    c.settle(until=c.now + 0.1)
    assert c.node(follower).state.last_index == before, "the follower should have missed the event"
    c.settle(until=c.now + 10.0)  # heartbeat announces log_next -> NACK -> replay
    _same_state_everywhere(c)


def test_a_conflicting_buffered_event_is_dropped_and_re_requested() -> None:
    c = _settled(2)
    master_id = c.masters()[0]
    follower = next(n for n in c.alive() if n != master_id)
    replica = c.node(follower).replica
    session = replica.session
    nxt = replica.next_index
    bogus = IndexedEvent(index=nxt + 1, event=NodeGatheredInfo(node_id="bogus"), at=0.0)
    real = IndexedEvent(index=nxt + 1, event=NodeGatheredInfo(node_id=master_id), at=1.0)
    replica.on_global_event(c.now, master_id, GlobalEvent(session=session, indexed=bogus))
    effects = replica.on_global_event(c.now, master_id, GlobalEvent(session=session, indexed=real))
    assert any("conflicting event" in getattr(e, "message", "") for e in effects)
    assert replica._buffer == {nxt + 1: real}


def test_events_from_anyone_but_the_session_master_are_ignored() -> None:
    c = _settled(3)
    master_id = c.masters()[0]
    other, target = [n for n in c.alive() if n != master_id][:2]
    replica = c.node(target).replica
    before = replica.next_index
    forged = IndexedEvent(index=before, event=NodeGatheredInfo(node_id=other), at=0.0)
    replica.on_global_event(c.now, other, GlobalEvent(session=replica.session, indexed=forged))
    assert replica.next_index == before and not replica._buffer


def test_a_late_joiner_bootstraps_from_a_snapshot_plus_the_retained_tail() -> None:
    c = ManualCluster(3, cards=load_cards(), config=CoreConfig(snapshot_every=20, retain_before_snapshot=5, telemetry_interval_s=0.5))
    c.boot("n1")
    c.boot("n3")
    c.settle(until=40.0)
    master = c.node(c.masters()[0]).master
    assert master.next_index > 40 and master._log_base > 0, "the log should have been trimmed"
    c.boot("n2")
    c.settle(until=c.now + 10.0)
    assert c.node("n2").session == c.node("n1").session
    _same_state_everywhere(c)


def test_snapshot_responses_with_a_wrong_digest_are_rejected() -> None:
    c = ManualCluster(2, cards=load_cards(), config=CoreConfig(snapshot_every=10, retain_before_snapshot=2, telemetry_interval_s=0.5))
    c.boot_all()
    c.settle(until=30.0)
    master_id = c.masters()[0]
    master = c.node(master_id).master
    follower = next(n for n in c.alive() if n != master_id)
    snap = master._snapshot
    assert snap is not None
    bad = SyncResponse(session=snap.session, snapshot=snap.__class__(session=snap.session, index=snap.index + 1000, state=snap.state, digest="0" * 64))
    effects = c.node(follower).replica.on_sync_response(c.now, master_id, bad)
    assert any("corrupt snapshot" in getattr(e, "message", "") for e in effects)


def test_duplicate_commands_are_executed_once() -> None:
    c = _settled(2)
    from skulk.core.commands import PlaceInstance

    place = PlaceInstance(command_id="p", model_id="skulk/tiny-qwen2")
    c.submit("n1", SubmitCommand(command=place))
    c.settle(until=c.now + 5.0)
    master = c.node(c.masters()[0]).master
    count = master.next_index
    # The same command arriving again (a retry) is answered from the dedupe cache.
    effects = master.on_command(c.now, "n1", place)
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
    effects = master.on_command(c.now, "n1", SubmitTask(command_id="late", model_id="skulk/tiny-qwen2", params=params))
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
        effects = master.on_command(c.now, "n1", SubmitTask(command_id=f"bad-{bad.seed}-{bad.max_tokens}-{len(bad.messages or ())}-{bad.top_p}", model_id="skulk/tiny-qwen2", params=bad))
        (reply,) = [e for e in effects if hasattr(e, "message") and hasattr(e.message, "result")]
        assert reply.message.result.status == "rejected" and reply.message.result.code == "invalid_request"
    assert master.next_index == before
