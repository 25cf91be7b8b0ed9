"""Effects: what the core asks its driver to do, as plain data.

The asyncio runtime turns them into zenoh puts, asyncio timers, disk writes
and subprocesses; the simulator turns them into simpy events. A driver carries
effects out in list order and never decides anything about them.

Every driver (``skulk.runtime.driver.Driver``, ``sim.host.SimHost``, the
hand-stepped ``sim.manual.ManualCluster``) subclasses ``EffectCarrier``: one
abstract method per effect type, named ``carry_<snake_case name>``, and one
table (``EFFECT_METHODS``) from type to method that every driver dispatches
through. Adding an effect type is adding its record to this module, to the
``Effect`` union and an abstract method to ``EffectCarrier``; an import-time
check names what is missing, and a driver that cannot carry the new effect
out cannot be constructed until it implements the method.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

from skulk.core.commands import CommandResult
from skulk.core.events import IndexedEvent
from skulk.core.files import Need
from skulk.core.ids import CommandId, ModelId, NodeId, RunnerId, TaskId
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
    "StartTransfer",
    "CancelTransfer",
    "DeleteFiles",
    "Effect",
    "EffectCarrier",
    "EFFECT_METHODS",
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


class StartTransfer(TaggedRecord, frozen=True, kw_only=True):
    """Fetch the files of ``model_id`` that ``need`` reads (None: every file) into this node's models.

    ``source`` None is the hub; otherwise the peer node to copy from, reached at
    ``address`` (the best observed link, ranked as rings rank them). Progress
    comes back as ``TransferProgressed``, the end as ``FilesObserved`` (on
    success) then ``TransferEnded``.
    """

    transfer_id: str
    model_id: ModelId
    need: Need | None = None
    source: NodeId | None = None
    address: str = ""


class CancelTransfer(TaggedRecord, frozen=True, kw_only=True):
    """Stop transfer ``transfer_id`` (its ``TransferEnded`` still comes back; partial bytes are kept)."""

    transfer_id: str


class DeleteFiles(TaggedRecord, frozen=True, kw_only=True):
    """Delete this node's copy of ``model_id`` (no instance here uses it); ``FilesGone`` comes back."""

    model_id: ModelId
    reason: str = ""


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
    | StartTransfer
    | CancelTransfer
    | DeleteFiles
)


# --- the driver's side ------------------------------------------------------------------------


def _method_name(effect_type: type) -> str:
    return "carry_" + re.sub(r"(?<!^)(?=[A-Z])", "_", effect_type.__name__).lower()


EFFECT_METHODS: dict[type, str] = {kind: _method_name(kind) for kind in get_args(Effect)}
"""Each effect type -> the ``EffectCarrier`` method that carries it out (``SetTimer`` -> ``carry_set_timer``)."""


class EffectCarrier(abc.ABC):
    """A driver of the core: one method per effect type; ``carry_out`` dispatches through ``EFFECT_METHODS``."""

    def effect_table(self) -> dict[type, Callable[[Any], None]]:
        """This driver's handler for each effect type (bind once, dispatch many)."""
        return {kind: getattr(self, name) for kind, name in EFFECT_METHODS.items()}

    def carry_out(self, effects: Iterable[Effect]) -> None:
        """Carry out ``effects`` in order."""
        table = self.effect_table()
        for effect in effects:
            table[type(effect)](effect)

    @abc.abstractmethod
    def carry_send(self, effect: Send) -> None:
        """Put the message on its topic, to ``effect.to`` or (None) every peer."""

    @abc.abstractmethod
    def carry_set_timer(self, effect: SetTimer) -> None:
        """Feed ``TimerFired(effect.key)`` at ``effect.at``, replacing a pending timer of the same key."""

    @abc.abstractmethod
    def carry_cancel_timer(self, effect: CancelTimer) -> None:
        """Forget the pending timer of ``effect.key``, if any."""

    @abc.abstractmethod
    def carry_persist_node(self, effect: PersistNode) -> None:
        """Replace the node's durable record; on failure feed ``PersistFailed``."""

    @abc.abstractmethod
    def carry_append_log(self, effect: AppendLog) -> None:
        """Append to the master's on-disk log; on failure feed ``PersistFailed``."""

    @abc.abstractmethod
    def carry_write_snapshot(self, effect: WriteSnapshot) -> None:
        """Persist the master's snapshot."""

    @abc.abstractmethod
    def carry_start_runner(self, effect: StartRunner) -> None:
        """Start a runner process for ``effect.spec``; its reports come back as inputs."""

    @abc.abstractmethod
    def carry_stop_runner(self, effect: StopRunner) -> None:
        """Stop a runner (its exit comes back as ``RunnerExited``)."""

    @abc.abstractmethod
    def carry_dispatch_task(self, effect: DispatchTask) -> None:
        """Hand a task to a runner; its chunks come back as ``RunnerOutput``."""

    @abc.abstractmethod
    def carry_cancel_runner_task(self, effect: CancelRunnerTask) -> None:
        """Tell a runner to stop generating a task."""

    @abc.abstractmethod
    def carry_deliver_chunk(self, effect: DeliverChunk) -> None:
        """Hand a chunk to the local API request waiting on its command id."""

    @abc.abstractmethod
    def carry_command_completed(self, effect: CommandCompleted) -> None:
        """Hand a command's outcome to the local API request that submitted it."""

    @abc.abstractmethod
    def carry_session_changed(self, effect: SessionChanged) -> None:
        """Tell the listeners (API, observers) about the node's new session."""

    @abc.abstractmethod
    def carry_log(self, effect: Log) -> None:
        """Log the core's message at its level."""

    @abc.abstractmethod
    def carry_start_transfer(self, effect: StartTransfer) -> None:
        """Start fetching model files (hub or peer); progress and the end come back as inputs."""

    @abc.abstractmethod
    def carry_cancel_transfer(self, effect: CancelTransfer) -> None:
        """Stop a transfer; its ``TransferEnded`` still comes back."""

    @abc.abstractmethod
    def carry_delete_files(self, effect: DeleteFiles) -> None:
        """Delete a model's files from this node; ``FilesGone`` comes back."""


_unhandled = sorted(name for name in EFFECT_METHODS.values() if name not in EffectCarrier.__abstractmethods__)
assert not _unhandled, f"EffectCarrier lacks an abstract method for: {_unhandled}"
assert len(EffectCarrier.__abstractmethods__) == len(EFFECT_METHODS), "an EffectCarrier method names no effect type"
del _unhandled
