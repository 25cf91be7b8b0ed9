"""Events: facts in the past tense, indexed into the log by the master only.

Workers raise *local* events (telemetry, runner statuses, task completions);
the master validates them, drops task events for tasks it does not know (the
ingest cap that stops event storms), and indexes the rest into the session's
global log. ``apply`` (skulk.core.state) folds global events into state.

Event 0 of every session is ``SessionStarted``, which carries the new master's
last replicated instances, downloads and connectivity (failover carryover).
"""

from __future__ import annotations

from skulk.core.cards import ModelCard
from skulk.core.files import DiskInfo, ModelCopy
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId, TaskId
from skulk.core.instances import Instance, KvUse, RunnerStatus
from skulk.core.telemetry import MemoryInfo, NetworkInfo, NodeIdentity, SystemInfo
from skulk.core.topology import Connection
from skulk.core.records import Record, TaggedRecord
from skulk.core.session import Incarnation, Session
from skulk.core.tasks import Task

__all__ = [
    "Carryover",
    "SessionStarted",
    "NodeGatheredInfo",
    "NodeTimedOut",
    "ConnectionObserved",
    "ConnectionLost",
    "DownloadCompleted",
    "InstanceCreated",
    "InstanceDeleted",
    "InstanceStillHosted",
    "RunnerStatusUpdated",
    "RunnerDeleted",
    "TaskCreated",
    "TaskStatusUpdated",
    "TaskFailed",
    "TaskDeleted",
    "ModelCopyUpdated",
    "ModelCopyRemoved",
    "ModelEvictionRequested",
    "StoreDownloadRequested",
    "ModelCardAdded",
    "Event",
    "LOCAL_EVENT_TYPES",
    "IndexedEvent",
]


class Carryover(Record, frozen=True, kw_only=True):
    instances: dict[InstanceId, Instance] = {}
    downloads: dict[NodeId, tuple[ModelId, ...]] = {}
    connections: tuple[Connection, ...] = ()
    next_port_offset: int = 0
    # Which node holds which model files (re-reported by each node too), and the cards added at run time.
    model_copies: dict[NodeId, dict[ModelId, ModelCopy]] = {}
    model_cards: dict[ModelId, ModelCard] = {}


class SessionStarted(TaggedRecord, frozen=True, kw_only=True):
    session: Session
    carryover: Carryover


class NodeGatheredInfo(TaggedRecord, frozen=True, kw_only=True):
    """Telemetry from ``node_id``; any field left None is unchanged."""

    node_id: NodeId
    identity: NodeIdentity | None = None
    memory: MemoryInfo | None = None
    network: NetworkInfo | None = None
    system: SystemInfo | None = None
    disk: DiskInfo | None = None
    # The KV ledgers of the node's rank-0 runners (replaces the node's previous map).
    runner_kv: dict[RunnerId, KvUse] | None = None


class NodeTimedOut(TaggedRecord, frozen=True, kw_only=True):
    node_id: NodeId


class ConnectionObserved(TaggedRecord, frozen=True, kw_only=True):
    connection: Connection


class ConnectionLost(TaggedRecord, frozen=True, kw_only=True):
    connection: Connection


class DownloadCompleted(TaggedRecord, frozen=True, kw_only=True):
    node_id: NodeId
    model_id: ModelId


class InstanceCreated(TaggedRecord, frozen=True, kw_only=True):
    instance: Instance
    # The command that asked for it (None for re-placements and re-reports).
    command_id: CommandId | None = None


class InstanceDeleted(TaggedRecord, frozen=True, kw_only=True):
    instance_id: InstanceId
    reason: str = ""


class InstanceStillHosted(TaggedRecord, frozen=True, kw_only=True):
    """Local only: a worker still runs a runner for ``instance`` after a failover.

    The master re-creates the instance if it lost it (a lagging new master) and
    it still fits; this is how invariant 5 (no placement lost) holds even when
    the new master had not applied the instance's creation.
    """

    instance: Instance


class RunnerStatusUpdated(TaggedRecord, frozen=True, kw_only=True):
    runner_id: RunnerId
    node_id: NodeId
    instance_id: InstanceId
    status: RunnerStatus


class RunnerDeleted(TaggedRecord, frozen=True, kw_only=True):
    runner_id: RunnerId


class TaskCreated(TaggedRecord, frozen=True, kw_only=True):
    task: Task


class TaskStatusUpdated(TaggedRecord, frozen=True, kw_only=True):
    task_id: TaskId
    status: str  # "running"


class TaskFailed(TaggedRecord, frozen=True, kw_only=True):
    task_id: TaskId
    error_message: str
    # The runner's own error when it refused or failed the task in-band (e.g.
    # code "context_length_exceeded", type "invalid_request_error"). The origin
    # answers the client with it whichever reaches it first, this event or the
    # runner's error chunk. None: the cluster failed the task (a runner died,
    # its instance went), answered as "task_failed", a server error.
    code: str | None = None
    error_type: str | None = None
    # With code "kv_budget_exhausted": seconds after which a retry may succeed.
    retry_after_s: int | None = None


class TaskDeleted(TaggedRecord, frozen=True, kw_only=True):
    """The task ended (completed, cancelled or failed) and leaves the state."""

    task_id: TaskId
    outcome: str = "completed"


class ModelCopyUpdated(TaggedRecord, frozen=True, kw_only=True):
    """Local: ``node_id``'s copy of ``model_id`` is now ``copy`` (its status, coverage, progress).

    ``copy.since`` and ``copy.last_used_at`` are the master's to set; ``apply`` ignores the worker's.
    """

    node_id: NodeId
    model_id: ModelId
    copy: ModelCopy


class ModelCopyRemoved(TaggedRecord, frozen=True, kw_only=True):
    """Local: ``node_id`` holds no file of ``model_id`` any more (evicted, or deleted by hand)."""

    node_id: NodeId
    model_id: ModelId


class ModelEvictionRequested(TaggedRecord, frozen=True, kw_only=True):
    """Master: ``node_id`` is to delete its copy of ``model_id`` (no instance there uses it)."""

    node_id: NodeId
    model_id: ModelId
    reason: str = ""


class StoreDownloadRequested(TaggedRecord, frozen=True, kw_only=True):
    """Master: the store node ``node_id`` is asked to download the whole of ``model_id`` from the hub."""

    node_id: NodeId
    model_id: ModelId
    n_layers: int = 0  # from the model's card; 0 when no card is known yet


class ModelCardAdded(TaggedRecord, frozen=True, kw_only=True):
    """Master: a card added at run time (``POST /models/add``); every node may place it from now on."""

    card: ModelCard


Event = (
    SessionStarted
    | NodeGatheredInfo
    | NodeTimedOut
    | ConnectionObserved
    | ConnectionLost
    | DownloadCompleted
    | InstanceCreated
    | InstanceDeleted
    | InstanceStillHosted
    | RunnerStatusUpdated
    | RunnerDeleted
    | TaskCreated
    | TaskStatusUpdated
    | TaskFailed
    | TaskDeleted
    | ModelCopyUpdated
    | ModelCopyRemoved
    | ModelEvictionRequested
    | StoreDownloadRequested
    | ModelCardAdded
)

# Events a worker may raise; anything else arriving as a local event is dropped.
# Each has an ingest rule in ``skulk.core.ingest.INGEST_RULES`` (checked at import).
LOCAL_EVENT_TYPES: tuple[type, ...] = (
    NodeGatheredInfo,
    ConnectionObserved,
    ConnectionLost,
    DownloadCompleted,
    InstanceStillHosted,
    RunnerStatusUpdated,
    RunnerDeleted,
    TaskStatusUpdated,
    TaskFailed,
    TaskDeleted,
    ModelCopyUpdated,
    ModelCopyRemoved,
)


class IndexedEvent(Record, frozen=True, kw_only=True):
    """An event at ``index`` in ``session``'s log, stamped with the master's clock.

    ``origin``/``origin_idx`` identify the local event it came from (None for
    events the master raised itself), which is how a worker learns that its
    local event was indexed.
    """

    index: int
    event: Event
    at: float
    origin: NodeId | None = None
    origin_idx: int | None = None
    origin_incarnation: Incarnation | None = None
