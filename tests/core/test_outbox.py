"""The outbox: a worker's local events to the master, numbered, retried, resent on a gap.
"""

from __future__ import annotations

from sim.manual import GIB, ManualCluster
from skulk.core.ids import NodeId
from skulk.core.inputs import InfoObserved
from skulk.core.messages import LocalEventAck, LocalEventMessage
from skulk.core.telemetry import Memory, MemoryInfo


def _telemetry(available_gib: int) -> InfoObserved:
    return InfoObserved(memory=MemoryInfo(ram_total=Memory(in_bytes=64 * GIB), ram_available=Memory(in_bytes=available_gib * GIB)))


def _local_events(c: ManualCluster, origin: str) -> list[int]:
    return [i for i, m in enumerate(c.inflight) if isinstance(m.message, LocalEventMessage) and m.sender == origin]


def test_a_gap_is_reported_and_filled_before_any_retry_timer() -> None:
    """Regression: one lost local event no longer holds a node's later events (its telemetry) for tens of seconds.

    Found by issue 3's chaos scenarios at about 4 % message loss
    (``crash_loop --seed 186 --set loss_probability=0.0377357``,
    ``context_admission --seed 195 --set loss_probability=0.0425003``,
    ``interconnect_selection --seed 42``): the master handles each node's local
    events in order, so when one was lost, every later one, telemetry included,
    waited behind it until the outbox's retry (after 5, 10, 20 s) got through.
    Three losses in a row outlasted ``node_timeout_s`` (30 s) and the master
    pruned a live node for "no telemetry", with its instances. The master now
    reports the gap as soon as later events arrive, and the node resends at once.
    """
    c = ManualCluster(2)
    c.boot_all()
    c.settle(until=10.0)
    master = c.node("n1").master_id
    follower = "n2" if master == "n1" else "n1"
    assert master is not None
    state = lambda: c.node(master).state  # noqa: E731
    before = state().node_memory[NodeId(follower)].ram_available.in_bytes
    # Two telemetry events from the follower; the first is lost on the wire.
    c.submit(follower, _telemetry(40))
    (first,) = _local_events(c, follower)
    c.drop(first)
    c.submit(follower, _telemetry(30))
    (second,) = _local_events(c, follower)
    c.deliver(second)
    # The master holds the second and reports the gap at once.
    nacks = [m.message for m in c.inflight if isinstance(m.message, LocalEventAck)]
    assert len(nacks) == 1 and nacks[0].gap and nacks[0].origin == follower
    assert state().node_memory[NodeId(follower)].ram_available.in_bytes == before
    # Deliver what is in flight without firing a single timer: the follower resends,
    # the master applies both, in order, with no retry backoff involved.
    now = c.now
    while c.inflight:
        c.deliver(0)
    assert c.now == now
    assert state().node_memory[NodeId(follower)].ram_available.in_bytes == 30 * GIB
    assert c.node(follower).outbox.pending_count == 0


def test_duplicates_of_held_events_do_not_repeat_the_report() -> None:
    """Regression: one lost local event no longer holds a node's later events (its telemetry) for tens of seconds.

    Found by issue 3's chaos scenarios at about 4 % message loss
    (``crash_loop --seed 186 --set loss_probability=0.0377357``,
    ``context_admission --seed 195 --set loss_probability=0.0425003``,
    ``interconnect_selection --seed 42``): the master handles each node's local
    events in order, so when one was lost, every later one, telemetry included,
    waited behind it until the outbox's retry (after 5, 10, 20 s) got through.
    Three losses in a row outlasted ``node_timeout_s`` (30 s) and the master
    pruned a live node for "no telemetry", with its instances. The master now
    reports the gap as soon as later events arrive, and the node resends at once.
    """
    c = ManualCluster(2)
    c.boot_all()
    c.settle(until=10.0)
    master = c.node("n1").master_id
    follower = "n2" if master == "n1" else "n1"
    c.submit(follower, _telemetry(40))
    (first,) = _local_events(c, follower)
    c.drop(first)
    c.submit(follower, _telemetry(30))
    (second,) = _local_events(c, follower)
    c.duplicate(second)
    c.duplicate(second)
    for i in sorted(_local_events(c, follower), reverse=True):
        c.deliver(i)
    # One report for one newly held event, none for its copies.
    assert sum(1 for m in c.inflight if isinstance(m.message, LocalEventAck) and m.message.gap) == 1


def test_a_second_hole_is_reported_as_soon_as_the_first_fills() -> None:
    """Regression: a second lost event waited for the node's 5 s retry once the first gap filled.

    Found by the simulator's efficiency invariant E5 (issue 17): the master
    reported a gap only when a later event arrived (at 1, 2, 4, 8... held), so
    with two holes in one burst, filling the first left the second to the
    outbox's retry, 5 s or more, with every later event (telemetry) behind it.
    """
    c = ManualCluster(2)
    c.boot_all()
    c.settle(until=10.0)
    master = c.node("n1").master_id
    follower = "n2" if master == "n1" else "n1"
    assert master is not None
    state = lambda: c.node(master).state  # noqa: E731
    # Four telemetry events; the first and the third are lost on the wire.
    for gib in (40, 35, 30, 25):
        c.submit(follower, _telemetry(gib))
    sent = _local_events(c, follower)
    assert len(sent) == 4
    lost = [c.inflight[sent[0]], c.inflight[sent[2]]]
    c.inflight = [m for m in c.inflight if m not in lost]
    # Deliver only what is in flight, firing no timer: both holes are asked for and filled.
    now = c.now
    while c.inflight:
        c.deliver(0)
    assert c.now == now
    assert state().node_memory[NodeId(follower)].ram_available.in_bytes == 25 * GIB
    assert c.node(follower).outbox.pending_count == 0
