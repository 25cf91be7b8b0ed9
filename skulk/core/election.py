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

Invariants kept: ``clock`` never decreases; a node's session only moves to a
session with a greater clock; ``is_master`` implies ``session.master`` is this
node.
"""

from __future__ import annotations

from collections.abc import Callable

from skulk.core.config import CoreConfig
from skulk.core.effects import Effect, Log, PersistNode, Send, SetTimer
from skulk.core.ids import NodeId
from skulk.core.messages import Candidate, ElectionMessage, Vote
from skulk.core.session import Session

__all__ = ["Election", "CAMPAIGN_TIMER", "SETTLE_TIMER", "HEARTBEAT_TIMER", "FORCE_MASTER_SENIORITY"]

CAMPAIGN_TIMER = "election.campaign"
SETTLE_TIMER = "election.settle"
HEARTBEAT_TIMER = "election.heartbeat"
FORCE_MASTER_SENIORITY = 1_000_000_000


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
    """One node's view of the election. Drive it through the ``on_*`` methods.

    ``seniority`` is a callback so the node can say how senior it is right now
    (a sitting master's seniority grows with the nodes it serves).
    ``persist`` builds the record to persist when the clock moves.
    """

    def __init__(
        self,
        node_id: NodeId,
        config: CoreConfig,
        *,
        clock: int,
        seniority: Callable[[], int],
        persist: Callable[[int], PersistNode],
    ) -> None:
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
        self._seniority = seniority
        self._persist = persist
        # A settled master puts its log length in heartbeats (see replica.py).
        self.log_next: Callable[[], int | None] = lambda: None
        # Set by the node to learn about a session change without polling.
        self.on_session_change: Callable[[float, Session | None, Session], list[Effect]] | None = None

    # --- queries -------------------------------------------------------------

    @property
    def campaigning(self) -> bool:
        return self._campaign is not None

    def my_vote(self, clock: int) -> Vote:
        seniority = self._seniority()
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

    def on_boot(self, now: float) -> list[Effect]:
        """Start: campaign alone (slow, so discovery has the whole timeout)."""
        effects: list[Effect] = [SetTimer(key=HEARTBEAT_TIMER, at=now + self.config.heartbeat_interval_s)]
        effects += self._start_campaign(now, clock=self.clock + 1, fast=False)
        return effects

    def on_command_seen(self) -> None:
        self.commands_seen += 1

    def on_peers_changed(self, now: float, peers: frozenset[NodeId]) -> list[Effect]:
        self.peers = peers
        if self._campaign is not None and self._campaign.fast:
            # A voter may have gone; re-check whether everyone left has voted.
            self._campaign.peers = peers
            done = self._maybe_conclude_early(now)
            if done:
                return done
        return [SetTimer(key=SETTLE_TIMER, at=now + self.config.settle_delay_s)]

    def on_settle(self, now: float) -> list[Effect]:
        if self.peers == self._campaign_peers:
            return []  # the set flapped back: nothing really changed
        return self._start_campaign(now, clock=self.clock + 1, fast=True)

    def on_campaign_timeout(self, now: float) -> list[Effect]:
        if self._campaign is None:
            return []
        return self._conclude(now)

    def on_heartbeat(self, now: float) -> list[Effect]:
        effects: list[Effect] = [SetTimer(key=HEARTBEAT_TIMER, at=now + self.config.heartbeat_interval_s)]
        if self._campaign is None and self.session is not None and self.peers:
            effects.append(Send(message=self._heartbeat()))
        return effects

    def _heartbeat(self) -> ElectionMessage:
        return ElectionMessage(
            clock=self.clock,
            campaigning=False,
            votes=(self.my_vote(self.clock),),
            log_next=self.log_next() if self.is_master else None,
        )

    def on_message(self, now: float, sender: NodeId, msg: ElectionMessage) -> list[Effect]:
        assert msg.votes and msg.votes[0].candidate.node_id == sender, "first vote is the sender's"
        if msg.clock > self.clock:
            return self._on_higher_clock(now, sender, msg)
        if msg.clock < self.clock:
            # The sender is behind: tell it where we are (it will catch up).
            reply = ElectionMessage(
                clock=self.clock,
                campaigning=self._campaign is not None,
                votes=self._known_votes(self.clock),
                fast=self._campaign.fast if self._campaign else True,
            )
            return [Send(message=reply, to=sender)]
        # Same clock.
        if self._campaign is not None:
            return self._record_votes(now, msg)
        if msg.campaigning:
            # It campaigns at a clock we have concluded: give it our vote.
            reply = ElectionMessage(clock=self.clock, campaigning=False, votes=(self.my_vote(self.clock),))
            return [Send(message=reply, to=sender)]
        if msg.sender_vote.session != self.session:
            return [
                Log(level="info", message=f"session disagreement with {sender} at clock {self.clock}"),
                *self._start_campaign(now, clock=self.clock + 1, fast=False),
            ]
        return []

    # --- internals -------------------------------------------------------------

    def _on_higher_clock(self, now: float, sender: NodeId, msg: ElectionMessage) -> list[Effect]:
        if msg.campaigning:
            effects = self._start_campaign(now, clock=msg.clock, fast=msg.fast)
            effects += self._record_votes(now, msg)
            return effects
        announced = msg.sender_vote.session
        if self.session is None and self._campaign is not None and not self._campaign.fast and announced is not None:
            # A fresh node hears a settled cluster: join it without disturbing anyone.
            self._campaign = None
            self.clock = msg.clock
            self._campaign_peers = self.peers
            effects: list[Effect] = [self._persist(self.clock)]
            effects += self._set_session(now, announced)
            return effects
        # A settled node at a higher clock we did not take part in: resolve by campaigning.
        return self._start_campaign(now, clock=msg.clock + 1, fast=False)

    def _start_campaign(self, now: float, *, clock: int, fast: bool) -> list[Effect]:
        assert clock > self.clock or (clock == self.clock and self._campaign is None), (clock, self.clock)
        self.clock = clock
        campaign = _Campaign(clock, fast, self.peers)
        campaign.votes[self.node_id] = self.my_vote(clock)
        self._campaign = campaign
        self._campaign_peers = self.peers
        effects: list[Effect] = [
            self._persist(clock),
            Send(message=ElectionMessage(clock=clock, campaigning=True, votes=self._known_votes(clock), fast=fast)),
            SetTimer(key=CAMPAIGN_TIMER, at=now + self.config.campaign_timeout_s),
        ]
        return effects

    def _known_votes(self, clock: int) -> tuple[Vote, ...]:
        if self._campaign is None or self._campaign.clock != clock:
            return (self.my_vote(clock),)
        # Gossip the vote this node counts for itself (recorded when the campaign
        # started), never a fresher one: commands seen meanwhile would make peers
        # rank a vote this node does not use, and two close candidates would
        # elect each other.
        mine = self._campaign.votes[self.node_id]
        others = tuple(v for n, v in sorted(self._campaign.votes.items()) if n != self.node_id)
        return (mine, *others)

    def _record_votes(self, now: float, msg: ElectionMessage) -> list[Effect]:
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
        effects: list[Effect] = []
        if learnt:
            effects.append(
                Send(
                    message=ElectionMessage(
                        clock=campaign.clock, campaigning=True, votes=self._known_votes(campaign.clock), fast=campaign.fast
                    )
                )
            )
        effects += self._maybe_conclude_early(now)
        return effects

    def _maybe_conclude_early(self, now: float) -> list[Effect]:
        campaign = self._campaign
        if campaign is None or not campaign.fast or not campaign.peers:
            return []
        if all(p in campaign.votes for p in campaign.peers):
            return self._conclude(now)
        return []

    def _conclude(self, now: float) -> list[Effect]:
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
        effects: list[Effect] = [
            Log(
                level="info",
                message=(
                    f"campaign at clock {campaign.clock} chose {winner} "
                    f"({'kept' if keep else 'new'} session {new_session}) from {len(votes)} votes"
                ),
            )
        ]
        # Tell our peers the result right away (a heartbeat), so stragglers converge.
        effects += self._set_session(now, new_session)
        if self.peers:
            effects.append(Send(message=self._heartbeat()))
        return effects

    def _set_session(self, now: float, session: Session) -> list[Effect]:
        old = self.session
        if old is not None and session != old:
            assert session.clock > old.clock or (session.clock == old.clock and session == old), (old, session)
        self.session = session
        self.is_master = session.master == self.node_id
        if session == old:
            return []
        if self.on_session_change is None:
            return []
        return self.on_session_change(now, old, session)
