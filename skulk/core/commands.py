"""Commands: imperative requests any node may send; only the master acts on them.

A command carries a ``command_id`` chosen by the node that accepted it (the
API), so retries and duplicates are recognised. The master answers every
command with a ``CommandResult`` sent to the origin node.
"""

from __future__ import annotations

from typing import Literal

from skulk.core.cards import ModelCard
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId
from skulk.core.records import Record, TaggedRecord
from skulk.core.tasks import GenerationParams, TaskKind

__all__ = [
    "Sharding",
    "InstanceMeta",
    "PlaceInstance",
    "DeleteInstance",
    "SubmitTask",
    "CancelTask",
    "EvictModel",
    "RequestStoreDownload",
    "AddModelCard",
    "Command",
    "ResultStatus",
    "CommandResult",
]

Sharding = Literal["Pipeline", "Tensor"]
InstanceMeta = Literal["MlxRing", "MlxJaccl"]


class PlaceInstance(TaggedRecord, frozen=True, kw_only=True):
    command_id: CommandId
    model_id: ModelId
    sharding: Sharding = "Pipeline"
    instance_meta: InstanceMeta = "MlxRing"
    min_nodes: int = 1
    excluded_nodes: tuple[NodeId, ...] = ()


class DeleteInstance(TaggedRecord, frozen=True, kw_only=True):
    command_id: CommandId
    instance_id: InstanceId


class SubmitTask(TaggedRecord, frozen=True, kw_only=True):
    """Run a generation on an instance of ``model_id`` (or exactly ``instance_id``)."""

    command_id: CommandId
    model_id: ModelId
    kind: TaskKind = "chat"
    params: GenerationParams
    instance_id: InstanceId | None = None


class CancelTask(TaggedRecord, frozen=True, kw_only=True):
    """Cancel the task created by ``target`` (the client went away or asked to stop)."""

    command_id: CommandId
    target: CommandId


class EvictModel(TaggedRecord, frozen=True, kw_only=True):
    """Delete the copies of ``model_id`` on ``node_id`` (None: every node holding one).

    Refused (``model_in_use``) while an instance placed on such a node uses it.
    """

    command_id: CommandId
    model_id: ModelId
    node_id: NodeId | None = None


class RequestStoreDownload(TaggedRecord, frozen=True, kw_only=True):
    """Ask the store node ``node_id`` to download the whole of ``model_id`` from the hub."""

    command_id: CommandId
    model_id: ModelId
    node_id: NodeId


class AddModelCard(TaggedRecord, frozen=True, kw_only=True):
    """Make ``card`` known to every node (``POST /models/add``); a built-in or operator card wins."""

    command_id: CommandId
    card: ModelCard


Command = PlaceInstance | DeleteInstance | SubmitTask | CancelTask | EvictModel | RequestStoreDownload | AddModelCard

# accepted: done (or already done); rejected: impossible, do not retry (HTTP 400/404);
# pending: information still missing, the origin may retry until its deadline (then 503).
ResultStatus = Literal["accepted", "rejected", "pending"]


class CommandResult(Record, frozen=True, kw_only=True):
    command_id: CommandId
    status: ResultStatus
    message: str = ""
    # An error code for the API: e.g. "model_not_found", "insufficient_memory".
    code: str | None = None
    instance_id: InstanceId | None = None
    # For an accepted task: an index of the log at which its task exists (its
    # ``TaskCreated``). A follower that catches up from a later snapshot without
    # the task knows the task ended in between (``Requests.on_state_jumped``).
    task_index: int | None = None
