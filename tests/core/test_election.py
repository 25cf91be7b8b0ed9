"""Election rules (DESIGN.md section 2, "Election"), on real core nodes.

Each test names the rule it checks. The cluster is hand-stepped
(sim.manual.ManualCluster): nothing happens until the test delivers messages
or fires timers.
"""

from __future__ import annotations

from sim.manual import ManualCluster
from skulk.core.config import CoreConfig
from skulk.core.effects import Send
from skulk.core.election import Election, Standing
from skulk.core.ids import NodeId
from skulk.core.messages import Candidate, ElectionMessage, Vote
from skulk.core.session import Session


def _settled(n: int = 3, **kw) -> ManualCluster:
    c = ManualCluster(n, **kw)
    c.boot_all()
    c.settle(until=10.0)
    return c


def test_one_master_is_elected_and_everyone_follows_it() -> None:
    c = _settled(3)
    masters = c.masters()
    assert len(masters) == 1
    sessions = {c.node(n).session for n in c.alive()}
    assert len(sessions) == 1
    (session,) = sessions
    assert session is not None and session.master == masters[0]


def test_candidates_are_ordered_by_clock_seniority_commands_then_node_id() -> None:
    # With equal clocks, seniority and commands, the highest node id wins.
    c = _settled(3)
    assert c.masters() == ["n3"]


def test_force_master_wins_regardless_of_node_id() -> None:
    c = ManualCluster(3)
    c.boot("n1")
    c.hosts["n1"].node.config = CoreConfig(force_master=True)  # type: ignore[union-attr]
    c.hosts["n1"].node.election.config = CoreConfig(force_master=True)  # type: ignore[union-attr]
    c.boot("n2")
    c.boot("n3")
    c.settle(until=10.0)
    assert c.masters() == ["n1"]


def test_sitting_master_that_wins_again_keeps_its_session() -> None:
    c = _settled(3)
    before = c.node("n3").session
    c.crash("n1")  # a follower leaves: everyone campaigns, the master wins again
    c.settle(until=c.now + 10.0)
    assert c.node("n3").session == before
    assert c.node("n2").session == before
    assert c.node("n3").election.clock > before.clock  # a campaign did run


def test_master_crash_elects_a_new_master_with_a_higher_clock() -> None:
    c = _settled(3)
    old = c.node("n3").session
    c.crash("n3")
    c.settle(until=c.now + 10.0)
    assert c.masters() == ["n2"]
    new = c.node("n1").session
    assert new is not None and new.master == "n2" and new.clock > old.clock


def test_connection_flap_does_not_start_a_campaign() -> None:
    # A connection that drops and comes back within the settle delay leaves the
    # peer set unchanged: no campaign, so a flapping link cannot livelock us.
    c = _settled(3)
    clocks = {n: c.node(n).election.clock for n in c.alive()}
    for _ in range(20):
        c.partition(["n1"], ["n2", "n3"])
        c.heal()
        c.settle(until=c.now + 0.05)
    c.settle(until=c.now + 5.0)
    assert {n: c.node(n).election.clock for n in c.alive()} == clocks


def test_failover_is_fast_when_every_peer_votes() -> None:
    # A membership-triggered campaign ends as soon as all connected peers voted,
    # long before the campaign timeout.
    c = _settled(3)
    c.crash("n3")
    start = c.now
    while not c.masters() or c.masters() == []:
        assert c.fire_next_timer() or c.inflight
        while c.inflight:
            c.deliver(0)
    assert c.now - start < c.config.campaign_timeout_s


def test_partition_heal_converges_on_one_session() -> None:
    c = _settled(4)
    c.partition(["n1", "n2"], ["n3", "n4"])
    c.settle(until=c.now + 10.0)
    assert len(c.masters()) == 2  # one per side: availability over a split
    c.heal()
    c.settle(until=c.now + 20.0)
    assert len(c.masters()) == 1
    assert len({c.node(n).session for n in c.alive()}) == 1


def test_clock_survives_a_restart() -> None:
    c = _settled(2)
    clock = c.node("n1").election.clock
    c.crash("n1")
    c.settle(until=c.now + 5.0)
    c.boot("n1")
    assert c.node("n1").election.clock >= clock
    c.settle(until=c.now + 10.0)
    assert len(c.masters()) == 1


NOBODY = Standing()  # a node that is no sitting master: seniority 0, no log


def _bare_election(name: str) -> Election:
    node = NodeId(name)
    return Election(node, CoreConfig(), clock=0)


def test_commands_seen_during_a_campaign_do_not_split_the_vote() -> None:
    """Regression: a node gossips the same vote it counts for itself.

    Found by the simulator (``python -m chaos bench``, master_failover seed 559
    with the master crashed): clients kept sending commands during the campaigns
    that followed, so every node's ``commands_seen`` grew mid-campaign. A node
    counted its own vote as it was when the campaign started but gossiped a
    fresh one (more commands seen). Two close candidates each saw the other's
    fresher, higher vote against their own older one and elected each other:
    "n3 chose n4, n4 chose n3", a session disagreement, another campaign, for
    thirty seconds. A node now gossips the vote it recorded for itself when the
    campaign started, so every participant ranks the same votes.
    """
    a, b = _bare_election("n3"), _bare_election("n4")
    a.on_peers_changed(0.0, frozenset({NodeId("n4")}), NOBODY)
    b.on_peers_changed(0.0, frozenset({NodeId("n3")}), NOBODY)
    queue: list[tuple[Election, NodeId, ElectionMessage]] = []

    def post(sender: Election, effects: list) -> None:
        other = b if sender is a else a
        for e in effects:
            if isinstance(e, Send) and isinstance(e.message, ElectionMessage):
                queue.append((other, sender.node_id, e.message))

    post(a, a.on_boot(0.0, NOBODY).effects)  # both start a slow campaign at clock 1
    post(b, b.on_boot(0.0, NOBODY).effects)
    for _ in range(3):  # commands keep arriving while the campaign runs
        a.on_command_seen()
        b.on_command_seen()
    steps = 0
    while queue:
        steps += 1
        assert steps < 100, "gossip did not settle"
        to, sender, msg = queue.pop(0)
        post(to, to.on_message(0.5, sender, msg, NOBODY).effects)
    a.on_campaign_timeout(3.0, NOBODY)
    b.on_campaign_timeout(3.0, NOBODY)
    assert a.session is not None and a.session == b.session, f"split vote: {a.session} vs {b.session}"


def _campaigning_election() -> Election:
    e = Election(NodeId("n1"), CoreConfig(), clock=0)
    e.on_peers_changed(0.0, frozenset({NodeId("n2"), NodeId("n3"), NodeId("n4")}), NOBODY)
    e.on_settle(0.2, NOBODY)  # a fast campaign at clock 1; n4 never votes, so it stays open
    assert e.campaigning and e.clock == 1
    return e


def _vote(node: str, session: Session | None, commands: int = 0) -> Vote:
    return Vote(candidate=Candidate(clock=1, seniority=0, commands_seen=commands, node_id=NodeId(node)), session=session)


def _gossip(sender_vote: Vote, *others: Vote) -> ElectionMessage:
    return ElectionMessage(clock=1, campaigning=True, votes=(sender_vote, *others))


def test_stale_gossip_of_an_equal_rank_vote_is_ignored_and_not_rebroadcast() -> None:
    """Regression: stale vote gossip must not flip a newer vote back (election vote storm).

    Found by the simulator (``python -m chaos run membership_churn --seed 2``): a
    restarted node voted in a fast campaign with no session, then adopted the
    cluster's session from a heartbeat and voted again with it, at the same rank.
    Both versions of its vote were being gossiped. ``_record_votes`` accepted any
    vote of equal rank as "newer", so every peer flipped the vote back and forth
    on each copy it received and re-broadcast each flip: 200,000 election
    messages within a millisecond of simulated time, while a paused peer kept the
    fast campaign from concluding. A vote now supersedes another of the same node
    only when it is strictly later in (rank, session).
    """
    e = _campaigning_election()
    adopted = Session(clock=0, master=NodeId("n9"))
    newer = e.on_message(0.3, NodeId("n3"), _gossip(_vote("n3", None), _vote("n2", adopted)), NOBODY).effects
    assert any(isinstance(x, Send) for x in newer), "a newly learnt vote is gossiped on"
    assert e._campaign is not None and e._campaign.votes[NodeId("n2")].session == adopted
    # An older copy of n2's vote (before it adopted the session) arrives late.
    stale = e.on_message(0.4, NodeId("n3"), _gossip(_vote("n3", None), _vote("n2", None)), NOBODY).effects
    assert not any(isinstance(x, Send) for x in stale), "stale gossip must not be re-broadcast"
    assert e._campaign.votes[NodeId("n2")].session == adopted, "the newer vote stays"


def test_a_strictly_later_vote_still_supersedes() -> None:
    """Regression: stale vote gossip must not flip a newer vote back (election vote storm).

    Found by the simulator (``python -m chaos run membership_churn --seed 2``): a
    restarted node voted in a fast campaign with no session, then adopted the
    cluster's session from a heartbeat and voted again with it, at the same rank.
    Both versions of its vote were being gossiped. ``_record_votes`` accepted any
    vote of equal rank as "newer", so every peer flipped the vote back and forth
    on each copy it received and re-broadcast each flip: 200,000 election
    messages within a millisecond of simulated time, while a paused peer kept the
    fast campaign from concluding. A vote now supersedes another of the same node
    only when it is strictly later in (rank, session).
    """
    e = _campaigning_election()
    e.on_message(0.3, NodeId("n2"), _gossip(_vote("n2", None)), NOBODY)
    later = e.on_message(0.4, NodeId("n2"), _gossip(_vote("n2", None, commands=3)), NOBODY).effects
    assert any(isinstance(x, Send) for x in later)
    assert e._campaign is not None and e._campaign.votes[NodeId("n2")].candidate.commands_seen == 3
    # A lower-ranked copy arriving afterwards changes nothing.
    assert not any(isinstance(x, Send) for x in e.on_message(0.5, NodeId("n2"), _gossip(_vote("n2", None)), NOBODY).effects)
    assert e._campaign.votes[NodeId("n2")].candidate.commands_seen == 3


def test_the_election_holds_no_callbacks_and_returns_its_session_change() -> None:
    """Issue 16: the election used to call back into the node (four callbacks, two set after construction)."""
    e = Election(NodeId("n1"), CoreConfig(), clock=0)
    assert not [name for name, value in vars(e).items() if callable(value)]
    out = e.on_boot(0.0, NOBODY)
    assert out.persist and out.session is None, "the clock moved: persisted before the vote goes out"
    out = e.on_campaign_timeout(3.0, Standing(seniority=0))
    assert out.session is not None and out.session.old is None and out.session.new.master == "n1"
    assert out.session.announce and e.announce(out.session, NOBODY) == [], "alone: nobody to tell"
