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

from __future__ import annotations

from skulk.core.config import CoreConfig
from skulk.core.effects import NodeRecord, PersistNode, Send
from skulk.core.election import Election
from skulk.core.ids import NodeId
from skulk.core.messages import Candidate, ElectionMessage, Vote
from skulk.core.session import Session


def _election() -> Election:
    e = Election(
        NodeId("n1"),
        CoreConfig(),
        clock=0,
        seniority=lambda: 0,
        persist=lambda c: PersistNode(record=NodeRecord(node_id=NodeId("n1"), election_clock=c)),
    )
    e.on_peers_changed(0.0, frozenset({NodeId("n2"), NodeId("n3"), NodeId("n4")}))
    e.on_settle(0.2)  # a fast campaign at clock 1; n4 never votes, so it stays open
    assert e.campaigning and e.clock == 1
    return e


def _vote(node: str, session: Session | None, commands: int = 0) -> Vote:
    return Vote(candidate=Candidate(clock=1, seniority=0, commands_seen=commands, node_id=NodeId(node)), session=session)


def _gossip(sender_vote: Vote, *others: Vote) -> ElectionMessage:
    return ElectionMessage(clock=1, campaigning=True, votes=(sender_vote, *others))


def test_stale_gossip_of_an_equal_rank_vote_is_ignored_and_not_rebroadcast() -> None:
    e = _election()
    adopted = Session(clock=0, master=NodeId("n9"))
    newer = e.on_message(0.3, NodeId("n3"), _gossip(_vote("n3", None), _vote("n2", adopted)))
    assert any(isinstance(x, Send) for x in newer), "a newly learnt vote is gossiped on"
    assert e._campaign is not None and e._campaign.votes[NodeId("n2")].session == adopted
    # An older copy of n2's vote (before it adopted the session) arrives late.
    stale = e.on_message(0.4, NodeId("n3"), _gossip(_vote("n3", None), _vote("n2", None)))
    assert not any(isinstance(x, Send) for x in stale), "stale gossip must not be re-broadcast"
    assert e._campaign.votes[NodeId("n2")].session == adopted, "the newer vote stays"


def test_a_strictly_later_vote_still_supersedes() -> None:
    e = _election()
    e.on_message(0.3, NodeId("n2"), _gossip(_vote("n2", None)))
    later = e.on_message(0.4, NodeId("n2"), _gossip(_vote("n2", None, commands=3)))
    assert any(isinstance(x, Send) for x in later)
    assert e._campaign is not None and e._campaign.votes[NodeId("n2")].candidate.commands_seen == 3
    # A lower-ranked copy arriving afterwards changes nothing.
    assert not any(isinstance(x, Send) for x in e.on_message(0.5, NodeId("n2"), _gossip(_vote("n2", None))))
    assert e._campaign.votes[NodeId("n2")].candidate.commands_seen == 3
