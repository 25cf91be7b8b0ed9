"""The replica, every node's follower log (DESIGN.md section 2, "Event log (follower side)"):
only the session's master, strict order, buffering, NACKs, bootstrap from a snapshot.
"""

from __future__ import annotations

from sim.manual import ManualCluster
from skulk.cards import load_cards
from skulk.core.config import CoreConfig
from skulk.core.effects import Send
from skulk.core.events import Carryover, IndexedEvent, NodeGatheredInfo, SessionStarted
from skulk.core.ids import NodeId
from skulk.core.messages import GlobalEvent, SyncRequest, SyncResponse
from skulk.core.replica import Replica
from skulk.core.session import Session
from skulk.core.state import EMPTY_STATE, digest


def _settled(n: int, **config) -> ManualCluster:
    c = ManualCluster(n, cards=load_cards(), config=CoreConfig(**config))
    c.boot_all()
    c.settle(until=10.0)
    return c


def _same_state_everywhere(c: ManualCluster) -> None:
    assert len({digest(c.node(n).state) for n in c.alive()}) == 1


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
    effects = replica.on_global_event(c.now, master_id, GlobalEvent(session=session, indexed=real)).effects
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
    effects = c.node(follower).replica.on_sync_response(c.now, master_id, bad).effects
    assert any("corrupt snapshot" in getattr(e, "message", "") for e in effects)


MASTER = NodeId("m")


SESSION = Session(clock=1, master=MASTER)


def _event(i: int) -> GlobalEvent:
    body = SessionStarted(session=SESSION, carryover=Carryover()) if i == 0 else NodeGatheredInfo(node_id=MASTER)
    return GlobalEvent(session=SESSION, indexed=IndexedEvent(index=i, event=body, at=float(i)))


def _follower(delivered: list[int]) -> Replica:
    r = Replica(NodeId("f"), CoreConfig(), EMPTY_STATE)
    r.follow(0.0, SESSION)
    for i in delivered:
        r.on_global_event(0.1, MASTER, _event(i))
    return r


def _nack(r: Replica) -> SyncRequest:
    sends = [e.message for e in r.on_nack_timer(5.0).effects if isinstance(e, Send)]
    assert len(sends) == 1 and isinstance(sends[0], SyncRequest)
    return sends[0]


def test_several_gaps_are_asked_for_in_one_request() -> None:
    """Regression: a follower with several gaps fills them all in one NACK round trip.

    Found by the simulator (``python -m chaos run event_storm --seed 4``, 4 %
    message loss): during an abandonment storm a follower's buffer held a
    thousand events with a gap every few dozen, and each NACK asked only for the
    first gap, then waited its backoff before the next. It fixed about two gaps a
    second while the storm opened more, and was still 500 events behind 90 s
    after the storm ended. A NACK now asks for everything from the first missing
    index when the buffer has more than one gap (the master bounds the batch),
    and only for the gap itself when a single gap precedes a contiguous run.
    """
    r = _follower([0, 1, 3, 4, 6, 7, 9])
    assert r.next_index == 2
    req = _nack(r)
    assert (req.from_index, req.to_index) == (2, None)


def test_one_gap_before_a_contiguous_run_asks_for_the_gap_only() -> None:
    """Regression: a follower with several gaps fills them all in one NACK round trip.

    Found by the simulator (``python -m chaos run event_storm --seed 4``, 4 %
    message loss): during an abandonment storm a follower's buffer held a
    thousand events with a gap every few dozen, and each NACK asked only for the
    first gap, then waited its backoff before the next. It fixed about two gaps a
    second while the storm opened more, and was still 500 events behind 90 s
    after the storm ended. A NACK now asks for everything from the first missing
    index when the buffer has more than one gap (the master bounds the batch),
    and only for the gap itself when a single gap precedes a contiguous run.
    """
    r = _follower([0, 1, 4, 5, 6])
    req = _nack(r)
    assert (req.from_index, req.to_index) == (2, 4)


def test_a_follower_applies_everything_once_the_range_arrives() -> None:
    """Regression: a follower with several gaps fills them all in one NACK round trip.

    Found by the simulator (``python -m chaos run event_storm --seed 4``, 4 %
    message loss): during an abandonment storm a follower's buffer held a
    thousand events with a gap every few dozen, and each NACK asked only for the
    first gap, then waited its backoff before the next. It fixed about two gaps a
    second while the storm opened more, and was still 500 events behind 90 s
    after the storm ended. A NACK now asks for everything from the first missing
    index when the buffer has more than one gap (the master bounds the batch),
    and only for the gap itself when a single gap precedes a contiguous run.
    """
    r = _follower([0, 1, 3, 4, 6, 7, 9])
    for i in (2, 3, 4, 5, 6, 7, 8, 9):  # the master's answer re-sends buffered events too
        r.on_global_event(0.2, MASTER, _event(i))
    assert r.next_index == 10 and r.state.last_index == 9


def test_a_follower_cut_off_from_its_master_for_days_keeps_asking_at_the_cap() -> None:
    """Three days of unanswered NACKs (about 26,000): the backoff stays at its cap, nothing overflows.

    Regression: the delay was ``min(base x 2^attempt, cap)``, and 2^1024 x a
    float raises ``OverflowError``: after about 1,024 unanswered NACKs (some
    three hours at the 10 s cap) the follower's node crashed.
    """
    c = _settled(2, telemetry_interval_s=1e9, heartbeat_interval_s=3_600.0, node_timeout_s=1e9)
    master_id = c.masters()[0]
    follower = next(n for n in c.alive() if n != master_id)
    # The master indexes an event the follower never gets; its heartbeat then says so.
    effects = c.node(master_id)._raise(c.now, [NodeGatheredInfo(node_id=master_id)])
    c._carry_out(master_id, effects)
    c.inflight = [m for m in c.inflight if not (m.to == follower and isinstance(m.message, GlobalEvent))]
    end = c.now + 3 * 24 * 3_600.0
    asked_at: list[float] = []
    while c.now < end:
        for m in [m for m in c.inflight if isinstance(m.message, SyncRequest) and m.sender == follower]:
            asked_at.append(c.now)
            c.inflight.remove(m)  # the way to the master is cut: it never hears the follower
        if c.inflight:
            c.deliver(0)
        elif not c.fire_next_timer():
            break
    cap = CoreConfig().nack_cap_s
    assert len(asked_at) > 25_000, len(asked_at)  # one every 10 s from the first heartbeat (1 h) on
    gaps = [b - a for a, b in zip(asked_at[-1_000:], asked_at[-999:])]
    assert min(gaps) >= cap - 1e-6 and max(gaps) <= cap + 1e-6, (min(gaps), max(gaps))
    assert c.node(follower).replica.session == c.node(master_id).replica.session


def test_progress_re_arms_the_nack_at_its_base_backoff() -> None:
    """Regression: after a NACK answered on its third try, the next gap waited the old 4 s backoff.

    Found by the simulator's efficiency invariant E3 (issue 17,
    ``master_failover --seed 53``): progress reset the attempt counter but
    left the NACK timer armed at the backoff of the last attempt, and a
    follower that then missed one more event waited for that timer.
    """
    config = CoreConfig()
    master, me = NodeId("m"), NodeId("f")
    session = Session(clock=1, master=master)
    replica = Replica(me, config, EMPTY_STATE)
    replica.follow(0.0, session)
    start = IndexedEvent(index=0, event=SessionStarted(session=session, carryover=Carryover()), at=0.0)
    replica.on_global_event(0.0, master, GlobalEvent(session=session, indexed=start))
    info = lambda i: IndexedEvent(index=i, event=NodeGatheredInfo(node_id=master), at=float(i))  # noqa: E731
    # Event 1 is lost, 2 arrives: a gap. Three NACKs go unanswered (0.5, 1, 2 s), the fourth is armed 4 s out.
    replica.on_global_event(1.0, master, GlobalEvent(session=session, indexed=info(2)))
    now, timers = 1.0, []
    for _ in range(3):
        now += 5.0
        out = replica.on_nack_timer(now)
        timers = [e for e in out.effects if hasattr(e, "at")]
    assert timers and timers[-1].at - now == config.nack_base_s * 2**3
    # The answer arrives: progress. Then event 4 arrives and event 3 is missing: a new gap.
    replica.on_sync_response(now, master, SyncResponse(session=session, snapshot=None, events=(info(1),)))
    out = replica.on_global_event(now, master, GlobalEvent(session=session, indexed=info(4)))
    armed = [e for e in out.effects if hasattr(e, "at")]
    assert armed and armed[-1].at - now == config.nack_base_s, armed
