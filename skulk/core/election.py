"""Master election: a sans-I/O state machine.

Theory of operation
-------------------
Each node keeps an election ``clock`` (the highest seen) and the ``session``
it follows, ``(clock, master)``. A *campaign* runs at one clock: every
participant broadcasts its vote (candidate plus the session it follows),
gossips the votes it has learnt, and when the campaign ends picks the highest
candidate by ``(clock, seniority, commands seen, node id)``.

- A campaign starts only when the set of connected peers *really* changes: a
  change arms a short settle timer, and when it fires the current set is
  compared with the set at the last campaign. A connection that flaps (or a
  multi-homed peer losing one of two links) leaves the set unchanged, so it
  cannot livelock the cluster.
- A *fast* campaign (started by a membership change) ends as soon as every
  connected peer has voted; the campaign timeout is only the fallback. A
  *slow* campaign (started to resolve a disagreement) always waits for the
  timeout, giving vote gossip time to reach every node of the component.
- A sitting master that wins again keeps its session (nothing is torn down),
  provided every voter follows that session or none.
- Settled nodes send heartbeats. A fresh node adopts the session a heartbeat
  announces; two settled nodes that disagree at the same clock, or a settled
  node that hears a higher clock, start a slow campaign.

The election never calls back into the node. What it needs to know about the
rest of the node (its seniority, a master's log length) comes in with every
input as a ``Standing``; what the node must do comes back in the ``Output``:
``persist`` when the clock moved (the node writes its record before the votes
go out), ``session`` when the node must follow a new session. After following
a session that concluded a campaign, the node calls ``announce`` so the peers
hear the result at once.

Invariants kept: ``clock`` never decreases; a node's session only moves to a
session with a greater clock; ``is_master`` implies ``session.master`` is this
node.
"""

from __future__ import annotations

from skulk.core.config import CoreConfig
from skulk.core.effects import Effect, Log, Send
from skulk.core.ids import NodeId
from skulk.core.messages import Candidate, ElectionMessage, Vote
from skulk.core.output import Output, SessionChange
from skulk.core.records import Record
from skulk.core.session import Session
from skulk.core.timers import CampaignTimer, HeartbeatTimer, SettleTimer, set_timer

__all__ = ["Election", "Standing", "FORCE_MASTER_SENIORITY"]

FORCE_MASTER_SENIORITY = 1_000_000_000


class Standing(Record, frozen=True, kw_only=True):
    """What the rest of the node tells the election with each input."""

    seniority: int = 0  # a sitting master's grows with the nodes it serves
    log_next: int | None = None  # while this node acts as master: its log length (for heartbeats)


def _vote_order(vote: Vote) -> tuple[tuple[int, int, int, str], tuple[int, str]]:
    """Total order of one node's votes in one campaign: a node's rank and session only grow."""
    return (vote.candidate.rank(), vote.session.key() if vote.session is not None else (-1, ""))


class _Campaign:
    __slots__ = ("clock", "fast", "votes", "peers")

    def __init__(self, clock: int, fast: bool, peers: frozenset[NodeId]) -> None:
        self.clock = clock
        self.fast = fast
        self.votes: dict[NodeId, Vote] = {}
        self.peers = peers


class Election:
    """One node's view of the election. Drive it through the ``on_*`` methods."""

    def __init__(self, node_id: NodeId, config: CoreConfig, *, clock: int) -> None:
        assert clock >= 0
        self.node_id = node_id
        self.config = config
        self.clock = clock
        self.session: Session | None = None
        self.is_master = False
        self.commands_seen = 0
        self.peers: frozenset[NodeId] = frozenset()
        self._campaign_peers: frozenset[NodeId] | None = None
        self._campaign: _Campaign | None = None

    # --- queries -------------------------------------------------------------

    @property
    def campaigning(self) -> bool:
        return self._campaign is not None

    def my_vote(self, clock: int, standing: Standing) -> Vote:
        seniority = standing.seniority
        if self.config.force_master:
            seniority += FORCE_MASTER_SENIORITY
        return Vote(
            candidate=Candidate(
                clock=clock,
                seniority=seniority,
                commands_seen=self.commands_seen,
                node_id=self.node_id,
            ),
            session=self.session,
        )

    # --- inputs --------------------------------------------------------------

    def on_boot(self, now: float, standing: Standing) -> Output:
        """Start: campaign alone (slow, so discovery has the whole timeout)."""
        out = Output([set_timer(HeartbeatTimer(), now + self.config.heartbeat_interval_s)])
        self._start_campaign(out, now, self.clock + 1, False, standing)
        return out

    def on_command_seen(self) -> None:
        self.commands_seen += 1

    def on_peers_changed(self, now: float, peers: frozenset[NodeId], standing: Standing) -> Output:
        self.peers = peers
        if self._campaign is not None and self._campaign.fast:
            # A voter may have gone; re-check whether everyone left has voted.
            self._campaign.peers = peers
            out = Output()
            self._maybe_conclude_early(out, standing)
            if out:
                return out
        return Output([set_timer(SettleTimer(), now + self.config.settle_delay_s)])

    def on_settle(self, now: float, standing: Standing) -> Output:
        out = Output()
        if self.peers != self._campaign_peers:  # else the set flapped back: nothing really changed
            self._start_campaign(out, now, self.clock + 1, True, standing)
        return out

    def on_campaign_timeout(self, now: float, standing: Standing) -> Output:
        out = Output()
        if self._campaign is not None:
            self._conclude(out, standing)
        return out

    def on_heartbeat(self, now: float, standing: Standing) -> Output:
        out = Output([set_timer(HeartbeatTimer(), now + self.config.heartbeat_interval_s)])
        if self._campaign is None and self.session is not None and self.peers:
            out.effects.append(Send(message=self._heartbeat(standing)))
        return out

    def announce(self, change: SessionChange, standing: Standing) -> list[Effect]:
        """After the node followed ``change``: tell the peers the result of the campaign right away."""
        if not change.announce or not self.peers:
            return []
        return [Send(message=self._heartbeat(standing))]

    def _heartbeat(self, standing: Standing) -> ElectionMessage:
        return ElectionMessage(
            clock=self.clock,
            campaigning=False,
            votes=(self.my_vote(self.clock, standing),),
            log_next=standing.log_next if self.is_master else None,
        )

    def on_message(self, now: float, sender: NodeId, msg: ElectionMessage, standing: Standing) -> Output:
        assert msg.votes and msg.votes[0].candidate.node_id == sender, "first vote is the sender's"
        out = Output()
        if msg.clock > self.clock:
            self._on_higher_clock(out, now, sender, msg, standing)
        elif msg.clock < self.clock:
            # The sender is behind: tell it where we are (it will catch up).
            reply = ElectionMessage(
                clock=self.clock,
                campaigning=self._campaign is not None,
                votes=self._known_votes(self.clock, standing),
                fast=self._campaign.fast if self._campaign else True,
            )
            out.effects.append(Send(message=reply, to=sender))
        elif self._campaign is not None:  # same clock from here on
            self._record_votes(out, msg, standing)
        elif msg.campaigning:
            # It campaigns at a clock we have concluded: give it our vote.
            reply = ElectionMessage(clock=self.clock, campaigning=False, votes=(self.my_vote(self.clock, standing),))
            out.effects.append(Send(message=reply, to=sender))
        elif msg.sender_vote.session != self.session:
            out.effects.append(Log(level="info", message=f"session disagreement with {sender} at clock {self.clock}"))
            self._start_campaign(out, now, self.clock + 1, False, standing)
        return out

    # --- internals (each adds to ``out``) ----------------------------------------------

    def _on_higher_clock(self, out: Output, now: float, sender: NodeId, msg: ElectionMessage, standing: Standing) -> None:
        if msg.campaigning:
            self._start_campaign(out, now, msg.clock, msg.fast, standing)
            self._record_votes(out, msg, standing)
            return
        announced = msg.sender_vote.session
        if self.session is None and self._campaign is not None and not self._campaign.fast and announced is not None:
            # A fresh node hears a settled cluster: join it without disturbing anyone.
            self._campaign = None
            self.clock = msg.clock
            self._campaign_peers = self.peers
            out.persist = True
            self._set_session(out, announced, False, standing)
            return
        # A settled node at a higher clock we did not take part in: resolve by campaigning.
        self._start_campaign(out, now, msg.clock + 1, False, standing)

    def _start_campaign(self, out: Output, now: float, clock: int, fast: bool, standing: Standing) -> None:
        assert clock > self.clock or (clock == self.clock and self._campaign is None), (clock, self.clock)
        self.clock = clock
        campaign = _Campaign(clock, fast, self.peers)
        campaign.votes[self.node_id] = self.my_vote(clock, standing)
        self._campaign = campaign
        self._campaign_peers = self.peers
        out.persist = True  # the clock moved: persisted before the vote goes out
        out.effects.append(
            Send(message=ElectionMessage(clock=clock, campaigning=True, votes=self._known_votes(clock, standing), fast=fast))
        )
        out.effects.append(set_timer(CampaignTimer(), now + self.config.campaign_timeout_s))

    def _known_votes(self, clock: int, standing: Standing) -> tuple[Vote, ...]:
        if self._campaign is None or self._campaign.clock != clock:
            return (self.my_vote(clock, standing),)
        # Gossip the vote this node counts for itself (recorded when the campaign
        # started), never a fresher one: commands seen meanwhile would make peers
        # rank a vote this node does not use, and two close candidates would
        # elect each other.
        mine = self._campaign.votes[self.node_id]
        others = tuple(v for n, v in sorted(self._campaign.votes.items()) if n != self.node_id)
        return (mine, *others)

    def _record_votes(self, out: Output, msg: ElectionMessage, standing: Standing) -> None:
        campaign = self._campaign
        assert campaign is not None and campaign.clock == msg.clock
        if not msg.fast and campaign.fast:
            campaign.fast = False
        learnt = False
        for vote in msg.votes:
            node = vote.candidate.node_id
            if node == self.node_id:
                continue
            known = campaign.votes.get(node)
            if known != vote:
                # A later vote of the same node supersedes (e.g. it adopted a session).
                # Strictly later only: stale gossip of an equal-rank vote must not
                # flip it back, or two versions ping-pong between peers forever.
                if known is None or _vote_order(vote) > _vote_order(known):
                    campaign.votes[node] = vote
                    learnt = True
        if learnt:
            out.effects.append(
                Send(
                    message=ElectionMessage(
                        clock=campaign.clock,
                        campaigning=True,
                        votes=self._known_votes(campaign.clock, standing),
                        fast=campaign.fast,
                    )
                )
            )
        self._maybe_conclude_early(out, standing)

    def _maybe_conclude_early(self, out: Output, standing: Standing) -> None:
        campaign = self._campaign
        if campaign is None or not campaign.fast or not campaign.peers:
            return
        if all(p in campaign.votes for p in campaign.peers):
            self._conclude(out, standing)

    def _conclude(self, out: Output, standing: Standing) -> None:
        campaign = self._campaign
        assert campaign is not None
        self._campaign = None
        votes = campaign.votes
        winner_vote = max(votes.values(), key=lambda v: v.candidate.rank())
        winner = winner_vote.candidate.node_id
        sitting = winner_vote.session
        keep = (
            sitting is not None
            and sitting.master == winner
            and all(v.session in (None, sitting) for v in votes.values())
        )
        new_session = sitting if keep and sitting is not None else Session(clock=campaign.clock, master=winner)
        out.effects.append(
            Log(
                level="info",
                message=(
                    f"campaign at clock {campaign.clock} chose {winner} "
                    f"({'kept' if keep else 'new'} session {new_session}) from {len(votes)} votes"
                ),
            )
        )
        # The node follows the session, then ``announce`` tells the peers the
        # result right away (a heartbeat), so stragglers converge.
        self._set_session(out, new_session, True, standing)

    def _set_session(self, out: Output, session: Session, announce: bool, standing: Standing) -> None:
        old = self.session
        if old is not None and session != old:
            assert session.clock > old.clock or (session.clock == old.clock and session == old), (old, session)
        self.session = session
        self.is_master = session.master == self.node_id
        assert out.session is None, "one session change per input"
        if session != old:
            out.session = SessionChange(old=old, new=session, announce=announce)
        elif announce and self.peers:
            # A campaign kept the session: nothing for the node to follow, but
            # the peers still hear the result at once.
            out.effects.append(Send(message=self._heartbeat(standing)))
