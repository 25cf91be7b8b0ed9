"""Instances, shards, runner specs and runner statuses.

An *instance* is one placed copy of a model: a set of runners, one per hosting
node, each holding a shard. The master creates instances (placement); every
worker reads its own shard from the replicated state and starts a runner for it
from a ``RunnerSpec``. Wire shapes follow Skulk's published API:
``{"MlxRingInstance": {"shardAssignments": {"modelId", "nodeToRunner",
"runnerToShard": {runnerId: {"PipelineShardMetadata": {...}}}}}}``.
"""

from __future__ import annotations

from typing import Literal

from skulk.core.ids import InstanceId, ModelId, NodeId, RunnerId
from skulk.core.records import Record, TaggedRecord

__all__ = [
    "LinkKind",
    "PipelineShardMetadata",
    "TensorShardMetadata",
    "ShardMetadata",
    "ShardAssignments",
    "RingHop",
    "MlxRingInstance",
    "MlxJacclInstance",
    "Instance",
    "SpeculationConfig",
    "RunnerSpec",
    "KvUse",
    "RunnerIdle",
    "RunnerConnecting",
    "RunnerConnected",
    "RunnerLoading",
    "RunnerLoaded",
    "RunnerWarmingUp",
    "RunnerReady",
    "RunnerRunning",
    "RunnerShuttingDown",
    "RunnerShutdown",
    "RunnerFailed",
    "GROUP_CONNECT_TIMEOUT",
    "RunnerStatus",
    "RUNNER_SERVING",
    "RUNNER_TERMINAL",
]

LinkKind = Literal["thunderbolt", "ethernet", "wifi", "unknown", "vpn"]


class PipelineShardMetadata(TaggedRecord, frozen=True, kw_only=True):
    """Rank ``device_rank`` holds layers ``[start_layer, end_layer)`` of ``n_layers``."""

    model_id: ModelId
    device_rank: int
    world_size: int
    start_layer: int
    end_layer: int
    n_layers: int


class TensorShardMetadata(TaggedRecord, frozen=True, kw_only=True):
    """Rank ``device_rank`` holds a 1/``world_size`` slice of every layer."""

    model_id: ModelId
    device_rank: int
    world_size: int
    n_layers: int


ShardMetadata = PipelineShardMetadata | TensorShardMetadata


class ShardAssignments(Record, frozen=True, kw_only=True):
    model_id: ModelId
    runner_to_shard: dict[RunnerId, ShardMetadata]
    node_to_runner: dict[NodeId, RunnerId]


class RingHop(Record, frozen=True, kw_only=True):
    """How rank ``rank`` is reached from its ring predecessor.

    ``address`` is the ``ip:port`` the rank listens on for the MLX ring
    backend; ``kind`` is the interconnect the core chose for that hop.
    """

    rank: int
    node_id: NodeId
    address: str
    kind: LinkKind


class SpeculationConfig(Record, frozen=True, kw_only=True):
    """Speculative decoding for an instance (see docs/speculative-decoding.md)."""

    drafter: Literal["none", "draft_model", "mtp", "prompt_lookup"] = "none"
    depth: int = 0
    draft_model_id: ModelId | None = None


class _InstanceBody(TaggedRecord, frozen=True, kw_only=True):
    instance_id: InstanceId
    shard_assignments: ShardAssignments
    # Ring order: ring[i] describes rank i. Empty for a single-node instance.
    ring: tuple[RingHop, ...] = ()
    ephemeral_port: int = 0
    # Usable context ceiling stamped at placement from static inputs only;
    # every rank enforces exactly this number (invariant 7).
    context_ceiling: int = 0
    # Bytes each hosting node is expected to use for this instance.
    memory_by_node: dict[NodeId, int] = {}
    # Of those, the KV-cache bytes (the runner's KV budget: skulk.core.kv_budget).
    kv_bytes_by_node: dict[NodeId, int] = {}
    speculation: SpeculationConfig = SpeculationConfig()
    # Incremented on each re-placement of the same request (fresh port, fresh ring).
    generation: int = 0


class MlxRingInstance(_InstanceBody, frozen=True, kw_only=True):
    """An instance whose ranks talk over MLX's ring backend (TCP)."""


class MlxJacclInstance(_InstanceBody, frozen=True, kw_only=True):
    """An instance whose ranks talk over JACCL (RDMA over Thunderbolt 5)."""


Instance = MlxRingInstance | MlxJacclInstance


class RunnerSpec(Record, frozen=True, kw_only=True):
    """Everything a worker's driver needs to start one runner process.

    ``hosts`` lists the ``ip:port`` of every rank in rank order (empty for a
    world of one); the driver writes it as the MLX hostfile.
    """

    instance_id: InstanceId
    runner_id: RunnerId
    node_id: NodeId
    model_id: ModelId
    shard: ShardMetadata
    hosts: tuple[str, ...] = ()
    context_ceiling: int
    max_concurrent_requests: int = 8
    group_connect_deadline_s: float = 120.0
    warmup_deadline_s: float = 300.0
    speculation: SpeculationConfig = SpeculationConfig()
    # KV bytes placement reserved for this shard (0: unknown; the context ceiling decides).
    kv_reserved_bytes: int = 0


class KvUse(Record, frozen=True, kw_only=True):
    """A runner's KV budget and what holds it, as its rank 0 counts (``skulk.core.kv_budget``).

    Positions are the same on every rank of an instance; ``bytes_per_position``
    is rank 0's (its own layers; 0 until measured). The counters run from the
    runner's start.
    """

    budget_positions: int
    rows_positions: int  # reserved by the requests decoding or prefilling
    cache_positions: int  # held by prefix-cache entries
    cache_entries: int
    bytes_per_position: int
    prefix_hits: int = 0
    prefix_misses: int = 0
    positions_reused: int = 0
    refused: int = 0  # requests refused with kv_budget_exhausted


# --- runner statuses (tagged: {"RunnerReady": {}}) ---------------------------


class RunnerIdle(TaggedRecord, frozen=True, kw_only=True):
    pass


class RunnerConnecting(TaggedRecord, frozen=True, kw_only=True):
    pass


class RunnerConnected(TaggedRecord, frozen=True, kw_only=True):
    pass


class RunnerLoading(TaggedRecord, frozen=True, kw_only=True):
    layers_loaded: int = 0
    layers_total: int = 0


class RunnerLoaded(TaggedRecord, frozen=True, kw_only=True):
    pass


class RunnerWarmingUp(TaggedRecord, frozen=True, kw_only=True):
    pass


class RunnerReady(TaggedRecord, frozen=True, kw_only=True):
    # The context ceiling this runner enforces (invariant 7 compares them).
    context_ceiling: int = 0


class RunnerRunning(TaggedRecord, frozen=True, kw_only=True):
    active_tasks: int = 0


class RunnerShuttingDown(TaggedRecord, frozen=True, kw_only=True):
    pass


class RunnerShutdown(TaggedRecord, frozen=True, kw_only=True):
    pass


class RunnerFailed(TaggedRecord, frozen=True, kw_only=True):
    error_message: str
    # True when the failure is final for this instance (breaker tripped, wedge).
    permanent: bool = False
    # Machine-readable cause; GROUP_CONNECT_TIMEOUT asks the master to re-place
    # the instance on a fresh port.
    code: str | None = None
    # With GROUP_CONNECT_TIMEOUT: the ring rank the runner found unreachable,
    # when it knows, so re-placement avoids the right link (any rank may be
    # the first to report).
    unreachable_rank: int | None = None


GROUP_CONNECT_TIMEOUT = "group_connect_timeout"


RunnerStatus = (
    RunnerIdle
    | RunnerConnecting
    | RunnerConnected
    | RunnerLoading
    | RunnerLoaded
    | RunnerWarmingUp
    | RunnerReady
    | RunnerRunning
    | RunnerShuttingDown
    | RunnerShutdown
    | RunnerFailed
)

RUNNER_SERVING: tuple[type, ...] = (RunnerReady, RunnerRunning)
RUNNER_TERMINAL: tuple[type, ...] = (RunnerShutdown, RunnerFailed)
