"""Effects: what the core asks its driver to do, as plain data.

The asyncio runtime turns them into zenoh puts, asyncio timers, disk writes
and subprocesses; the simulator turns them into simpy events. A driver carries
effects out in list order and never decides anything about them.
"""

from __future__ import annotations

from typing import Literal

from skulk.core.commands import CommandResult
from skulk.core.events import IndexedEvent
from skulk.core.ids import CommandId, NodeId, RunnerId, TaskId
from skulk.core.instances import RunnerSpec
from skulk.core.messages import Message, Snapshot
from skulk.core.records import Record, TaggedRecord
from skulk.core.session import Session
from skulk.core.tasks import Task, TokenChunk

__all__ = [
    "Send",
    "SetTimer",
    "CancelTimer",
    "PersistNode",
    "NodeRecord",
    "AppendLog",
    "WriteSnapshot",
    "StartRunner",
    "StopRunner",
    "DispatchTask",
    "CancelRunnerTask",
    "DeliverChunk",
    "CommandCompleted",
    "SessionChanged",
    "Log",
    "Effect",
]


class Send(TaggedRecord, frozen=True, kw_only=True):
    """Put ``message`` on its topic; ``to`` None means every peer."""

    message: Message
    to: NodeId | None = None


class SetTimer(TaggedRecord, frozen=True, kw_only=True):
    """Fire ``TimerFired(key)`` at absolute time ``at`` (replaces a timer of the same key)."""

    key: str
    at: float


class CancelTimer(TaggedRecord, frozen=True, kw_only=True):
    key: str


class NodeRecord(Record, frozen=True, kw_only=True):
    """What a node persists so a restart is the same node, never going back in time.

    ``state`` is the node's last replicated state (encoded); a node that becomes
    master after a restart seeds its session from it.
    """

    node_id: NodeId
    election_clock: int
    state: bytes | None = None
    # Restarts so far (each boot persists the next number; see session.Incarnation).
    incarnation: int = 0


class PersistNode(TaggedRecord, frozen=True, kw_only=True):
    record: NodeRecord


class AppendLog(TaggedRecord, frozen=True, kw_only=True):
    """Master only: append an indexed event to the session's on-disk log."""

    session: Session
    indexed: IndexedEvent


class WriteSnapshot(TaggedRecord, frozen=True, kw_only=True):
    """Master only: persist a snapshot; earlier archives beyond retention may go."""

    snapshot: Snapshot


class StartRunner(TaggedRecord, frozen=True, kw_only=True):
    spec: RunnerSpec


class StopRunner(TaggedRecord, frozen=True, kw_only=True):
    runner_id: RunnerId
    reason: str = ""


class DispatchTask(TaggedRecord, frozen=True, kw_only=True):
    runner_id: RunnerId
    task: Task


class CancelRunnerTask(TaggedRecord, frozen=True, kw_only=True):
    runner_id: RunnerId
    task_id: TaskId


class DeliverChunk(TaggedRecord, frozen=True, kw_only=True):
    """Hand a chunk to the local API request waiting on ``chunk.command_id``."""

    chunk: TokenChunk


class CommandCompleted(TaggedRecord, frozen=True, kw_only=True):
    """The outcome of a command this node submitted (for the API)."""

    command_id: CommandId
    result: CommandResult


class SessionChanged(TaggedRecord, frozen=True, kw_only=True):
    session: Session
    is_master: bool


class Log(TaggedRecord, frozen=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error", "critical"]
    message: str


Effect = (
    Send
    | SetTimer
    | CancelTimer
    | PersistNode
    | AppendLog
    | WriteSnapshot
    | StartRunner
    | StopRunner
    | DispatchTask
    | CancelRunnerTask
    | DeliverChunk
    | CommandCompleted
    | SessionChanged
    | Log
)
