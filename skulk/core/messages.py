"""Messages between nodes, one record type per topic.

Every message travels on a topic named by ``topic_of``; the transport maps
topics to key expressions (zenoh) or simulated links. Messages are the only
thing nodes exchange; the ordered event log is carried by ``GlobalEvent`` and
``SyncResponse``, tokens by ``ChunkMessage`` on the data topic.
"""

from __future__ import annotations

from skulk.core.commands import Command, CommandResult
from skulk.core.events import Event, IndexedEvent
from skulk.core.ids import NodeId
from skulk.core.records import Record, TaggedRecord
from skulk.core.session import Incarnation, Session
from skulk.core.tasks import TokenChunk

__all__ = [
    "Candidate",
    "Vote",
    "ElectionMessage",
    "CommandMessage",
    "CommandResultMessage",
    "LocalEventMessage",
    "LocalEventAck",
    "GlobalEvent",
    "Snapshot",
    "SyncRequest",
    "SyncResponse",
    "ChunkMessage",
    "Message",
    "TOPICS",
    "topic_of",
]


class Candidate(Record, frozen=True, kw_only=True, order=True):
    """A node's claim in an election; compared by ``rank()``, highest wins."""

    clock: int
    seniority: int
    commands_seen: int
    node_id: NodeId

    def rank(self) -> tuple[int, int, int, str]:
        return (self.clock, self.seniority, self.commands_seen, self.node_id)


class Vote(Record, frozen=True, kw_only=True):
    """A candidate and the session it currently follows (None before any)."""

    candidate: Candidate
    session: Session | None = None


class ElectionMessage(TaggedRecord, frozen=True, kw_only=True):
    """A campaign vote, or (``campaigning`` False) a settled node's heartbeat.

    ``votes`` holds the sender's own vote first, then every other vote it knows
    for ``clock`` (gossiped, so nodes without a direct link still learn each
    other's candidates). ``fast`` campaigns may conclude as soon as every
    connected peer has voted; slow ones always wait for the campaign timeout.
    """

    clock: int
    campaigning: bool
    votes: tuple[Vote, ...]
    fast: bool = True
    # A settled master's heartbeat carries its log length so a follower that
    # missed the tail notices and asks for it, even when the cluster is idle.
    log_next: int | None = None

    @property
    def sender_vote(self) -> Vote:
        return self.votes[0]


class CommandMessage(TaggedRecord, frozen=True, kw_only=True):
    origin: NodeId
    command: Command


class CommandResultMessage(TaggedRecord, frozen=True, kw_only=True):
    session: Session
    result: CommandResult


class LocalEventMessage(TaggedRecord, frozen=True, kw_only=True):
    """A worker's event for ``session``'s master; ``origin_idx`` is dense per
    session and incarnation of the origin (a restarted node counts from 0 again)."""

    origin: NodeId
    session: Session
    origin_idx: int
    event: Event
    incarnation: Incarnation


class LocalEventAck(TaggedRecord, frozen=True, kw_only=True):
    """The master has processed ``origin``'s local events below ``next_idx``.

    ``gap``: the master also holds later events and lacks ``next_idx`` (lost on
    the way), so the origin sends it again at once instead of after its backoff.
    """

    session: Session
    origin: NodeId
    next_idx: int
    incarnation: Incarnation
    gap: bool = False


class GlobalEvent(TaggedRecord, frozen=True, kw_only=True):
    session: Session
    indexed: IndexedEvent


class Snapshot(Record, frozen=True, kw_only=True):
    """The encoded state after applying index ``index`` of ``session``."""

    session: Session
    index: int
    state: bytes
    digest: str


class SyncRequest(TaggedRecord, frozen=True, kw_only=True):
    """Ask the master for indices ``[from_index, to_index)`` (to_index None: all)."""

    session: Session
    requester: NodeId
    from_index: int
    to_index: int | None = None


class SyncResponse(TaggedRecord, frozen=True, kw_only=True):
    session: Session
    snapshot: Snapshot | None = None
    events: tuple[IndexedEvent, ...] = ()


class ChunkMessage(TaggedRecord, frozen=True, kw_only=True):
    """Tokens on the data topic, from the runner's node to the request's origin."""

    destination: NodeId
    chunk: TokenChunk
    # The sender's incarnation: a restarted node streams a re-run task from
    # seq 0 again, and the origin must tell that from a duplicate.
    incarnation: Incarnation


Message = (
    ElectionMessage
    | CommandMessage
    | CommandResultMessage
    | LocalEventMessage
    | LocalEventAck
    | GlobalEvent
    | SyncRequest
    | SyncResponse
    | ChunkMessage
)

TOPICS: dict[type, str] = {
    ElectionMessage: "election",
    CommandMessage: "commands",
    CommandResultMessage: "command_results",
    LocalEventMessage: "local_events",
    LocalEventAck: "local_events",
    GlobalEvent: "global_events",
    SyncRequest: "state_sync",
    SyncResponse: "state_sync",
    ChunkMessage: "data",
}


def topic_of(message: Message) -> str:
    return TOPICS[type(message)]
