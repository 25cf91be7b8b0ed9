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

from __future__ import annotations

from skulk.core.config import CoreConfig
from skulk.core.effects import NodeRecord, PersistNode, Send
from skulk.core.election import Election
from skulk.core.ids import NodeId
from skulk.core.messages import ElectionMessage


def _election(name: str) -> Election:
    node = NodeId(name)
    return Election(
        node,
        CoreConfig(),
        clock=0,
        seniority=lambda: 0,
        persist=lambda c: PersistNode(record=NodeRecord(node_id=node, election_clock=c)),
    )


def test_commands_seen_during_a_campaign_do_not_split_the_vote() -> None:
    a, b = _election("n3"), _election("n4")
    a.on_peers_changed(0.0, frozenset({NodeId("n4")}))
    b.on_peers_changed(0.0, frozenset({NodeId("n3")}))
    queue: list[tuple[Election, NodeId, ElectionMessage]] = []

    def post(sender: Election, effects: list) -> None:
        other = b if sender is a else a
        for e in effects:
            if isinstance(e, Send) and isinstance(e.message, ElectionMessage):
                queue.append((other, sender.node_id, e.message))

    post(a, a.on_boot(0.0))  # both start a slow campaign at clock 1
    post(b, b.on_boot(0.0))
    for _ in range(3):  # commands keep arriving while the campaign runs
        a.on_command_seen()
        b.on_command_seen()
    steps = 0
    while queue:
        steps += 1
        assert steps < 100, "gossip did not settle"
        to, sender, msg = queue.pop(0)
        post(to, to.on_message(0.5, sender, msg))
    a.on_campaign_timeout(3.0)
    b.on_campaign_timeout(3.0)
    assert a.session is not None and a.session == b.session, f"split vote: {a.session} vs {b.session}"
