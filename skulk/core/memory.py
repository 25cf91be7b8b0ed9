"""The one memory model: what a node can hold and what a shard needs.

Theory of operation
-------------------
Placement (master) and the pre-spawn guard (worker) size shards with exactly
these functions and constants, so they can never disagree about arithmetic.

- **Usable memory** of a node is ``min(available, 0.75 x total RAM)``, where
  *available* is GPU-wireable memory on macOS (available memory on Linux).
- **A shard's footprint** is ``weights x share x 1.30 + KV bytes for 8,192
  tokens x share + 256 MiB``. The 30 % covers activations, MLX buffers and
  fragmentation; the 256 MiB floor covers the runner process itself.
- **KV bytes per token** for the whole model are ``2 (K and V) x layers x KV
  heads x head dim x 2 bytes (fp16)``, unless the card states its own figure
  (latent-attention models cache a compressed latent instead).

All arithmetic is exact (integers and ``Fraction``): a share of 7/32 layers is
7/32, never 0.21875000000000003, and byte counts are rounded up once, so the
master and every worker get the same bytes on every platform.

Accounting for instances already placed (no double booking)
-----------------------------------------------------------
Telemetry's *available* memory drops only once a runner has loaded its
weights, while a freshly placed instance's runner has not loaded anything yet.
Counting neither would double-book a node; counting both would refuse
placements that fit. So, per node, placement may use::

    free = min(available - reserved, 0.75 x total - committed)

- ``reserved``: the part of the footprint of every placed instance whose runner
  on this node has not loaded yet (no status, idle, connecting, connected,
  failed; a loading runner reserves the share of layers it has still to load),
  because telemetry does not show that memory yet;
- ``committed``: the full footprint of every instance placed on the node, so
  that whatever the staleness of telemetry, the footprints on a node never add
  up to more than 0.75 x its total RAM.

A loaded runner (loaded, warming up, ready, running, shutting down) is counted
by telemetry and not reserved again. Invariant 4 follows: a new instance's
footprint on each node is at most ``free <= usable``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction

from skulk.core.cards import ModelCard
from skulk.core.ids import InstanceId, NodeId
from skulk.core.instances import (
    Instance,
    PipelineShardMetadata,
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerShuttingDown,
    RunnerWarmingUp,
    ShardMetadata,
    TensorShardMetadata,
)
from skulk.core.telemetry import MemoryInfo
from skulk.core.records import Record
from skulk.core.state import State

__all__ = [
    "USABLE_FRACTION_OF_TOTAL",
    "WEIGHT_OVERHEAD_FACTOR",
    "REFERENCE_CONTEXT_TOKENS",
    "RUNNER_FLOOR_BYTES",
    "KV_BYTES_PER_ELEMENT",
    "LOADED_STATUSES",
    "Share",
    "Footprint",
    "NodeBudget",
    "as_share",
    "shard_share",
    "usable_bytes",
    "static_capacity_bytes",
    "kv_bytes_per_token",
    "shard_footprint",
    "shard_footprint_bytes",
    "node_budget",
    "reserved_bytes",
    "format_gb",
    "describe_footprint",
    "describe_shortfall",
]

# --- the constants (the only copy) ------------------------------------------

USABLE_FRACTION_OF_TOTAL = Fraction(3, 4)  # never plan on more than 75 % of RAM
WEIGHT_OVERHEAD_FACTOR = Fraction(13, 10)  # weights x 1.30: activations, buffers, fragmentation
REFERENCE_CONTEXT_TOKENS = 8_192  # KV cache reserved per instance at placement
RUNNER_FLOOR_BYTES = 256 * 1024 * 1024  # the runner process itself: 256 MiB
KV_BYTES_PER_ELEMENT = 2  # fp16 keys and values

# Runner statuses whose memory telemetry already shows (see module docstring).
LOADED_STATUSES: tuple[type, ...] = (
    RunnerLoaded,
    RunnerWarmingUp,
    RunnerReady,
    RunnerRunning,
    RunnerShuttingDown,
)

Share = Fraction | float | int


def as_share(share: Share) -> Fraction:
    """``share`` as an exact fraction in (0, 1]; floats convert exactly."""
    out = share if isinstance(share, Fraction) else Fraction(share)
    assert 0 < out <= 1, f"share must be in (0, 1], got {share!r}"
    return out


def shard_share(shard: ShardMetadata) -> Fraction:
    """The fraction of the model's weights (and KV cache) a shard holds.

    Pipeline: its layers over all layers. Tensor: one over the world size
    (every rank holds a slice of every layer).
    """
    if isinstance(shard, PipelineShardMetadata):
        layers = shard.end_layer - shard.start_layer
        assert 0 < layers <= shard.n_layers, shard
        return Fraction(layers, shard.n_layers)
    assert isinstance(shard, TensorShardMetadata), shard
    assert shard.world_size >= 1, shard
    return Fraction(1, shard.world_size)


def static_capacity_bytes(mem: MemoryInfo) -> int:
    """0.75 x total RAM, rounded down: the most any node ever plans to use."""
    total = mem.ram_total.in_bytes
    assert total >= 0, mem
    return math.floor(total * USABLE_FRACTION_OF_TOTAL)


def usable_bytes(mem: MemoryInfo) -> int:
    """``min(available, 0.75 x total)``: what a node can give a new shard right now."""
    available = mem.ram_available.in_bytes
    assert available >= 0, mem
    return min(available, static_capacity_bytes(mem))


def kv_bytes_per_token(card: ModelCard) -> int:
    """KV-cache bytes one token costs across the whole model (all layers)."""
    if card.kv_bytes_per_token:
        return card.kv_bytes_per_token
    per_token = 2 * card.n_layers * card.num_kv_heads * card.head_dim * KV_BYTES_PER_ELEMENT
    assert per_token > 0, card
    return per_token


class Footprint(Record, frozen=True, kw_only=True):
    """What one shard needs, broken down for humans.

    ``weights_bytes`` is the raw weight share; ``overhead_bytes`` the 30 % on
    top of it; ``kv_bytes`` the KV cache for ``kv_tokens`` tokens of this
    shard; ``floor_bytes`` the runner floor. ``total_bytes`` is their sum.
    """

    weights_bytes: int
    overhead_bytes: int
    kv_bytes: int
    kv_tokens: int
    floor_bytes: int
    total_bytes: int

    @property
    def headroom_bytes(self) -> int:
        """Everything that is neither weights nor KV: overhead plus floor."""
        return self.overhead_bytes + self.floor_bytes


def shard_footprint(card: ModelCard, share: Share, *, kv_tokens: int = REFERENCE_CONTEXT_TOKENS) -> Footprint:
    """The footprint of a shard holding ``share`` of ``card`` (see module docstring)."""
    frac = as_share(share)
    assert kv_tokens >= 0, kv_tokens
    num, den = frac.numerator, frac.denominator
    over_num, over_den = WEIGHT_OVERHEAD_FACTOR.numerator, WEIGHT_OVERHEAD_FACTOR.denominator
    # Exact ceilings in integer arithmetic (placement evaluates many subsets).
    weights = -(-card.weight_bytes * num // den)
    weights_with_overhead = -(-card.weight_bytes * num * over_num // (den * over_den))
    kv = -(-kv_bytes_per_token(card) * kv_tokens * num // den)
    total = weights_with_overhead + kv + RUNNER_FLOOR_BYTES
    assert weights_with_overhead >= weights and total > weights
    return Footprint(
        weights_bytes=weights,
        overhead_bytes=weights_with_overhead - weights,
        kv_bytes=kv,
        kv_tokens=kv_tokens,
        floor_bytes=RUNNER_FLOOR_BYTES,
        total_bytes=total,
    )


def shard_footprint_bytes(card: ModelCard, share: Share) -> int:
    """Total bytes of ``shard_footprint(card, share)``."""
    return shard_footprint(card, share).total_bytes


# --- node accounting ----------------------------------------------------------


def _instance_reservation(state: State, instance: Instance, node_id: NodeId) -> int:
    """Bytes of ``instance``'s footprint on ``node_id`` that telemetry does not show yet."""
    need = instance.memory_by_node.get(node_id, 0)
    runner_id = instance.shard_assignments.node_to_runner.get(node_id)
    status = state.runners.get(runner_id) if runner_id is not None else None
    if isinstance(status, LOADED_STATUSES):
        return 0
    if isinstance(status, RunnerLoading) and 0 < status.layers_loaded <= status.layers_total:
        # A loading runner has already taken (roughly) its loaded share.
        return math.ceil(Fraction(need * (status.layers_total - status.layers_loaded), status.layers_total))
    return need


def _hosted(state: State, node_id: NodeId, ignore: frozenset[InstanceId]) -> list[Instance]:
    return [
        state.instances[iid]
        for iid in sorted(state.instances)
        if iid not in ignore and node_id in state.instances[iid].shard_assignments.node_to_runner
    ]


def reserved_bytes(state: State, node_id: NodeId, *, ignore: Iterable[InstanceId] = ()) -> int:
    """Sum of not-yet-loaded footprints on ``node_id`` (instances in ``ignore`` left out)."""
    skip = frozenset(ignore)
    return sum(_instance_reservation(state, inst, node_id) for inst in _hosted(state, node_id, skip))


class NodeBudget(Record, frozen=True, kw_only=True):
    """A node's memory as placement sees it (all bytes).

    ``free_bytes = min(usable - reserved, capacity - committed)``, never
    negative; see the module docstring for why both terms.
    """

    node_id: NodeId
    total_bytes: int
    usable_bytes: int
    capacity_bytes: int
    reserved_bytes: int
    committed_bytes: int
    free_bytes: int


def node_budget(state: State, node_id: NodeId, *, ignore: Iterable[InstanceId] = ()) -> NodeBudget | None:
    """What a new shard may use on ``node_id``; None when the node has not reported memory.

    ``ignore`` leaves instances out of the accounting (an instance being
    re-placed gives its memory back).
    """
    mem = state.node_memory.get(node_id)
    if mem is None:
        return None
    skip = frozenset(ignore)
    hosted = _hosted(state, node_id, skip)
    reserved = sum(_instance_reservation(state, inst, node_id) for inst in hosted)
    committed = sum(inst.memory_by_node.get(node_id, 0) for inst in hosted)
    assert 0 <= reserved <= committed, (node_id, reserved, committed)
    usable = usable_bytes(mem)
    capacity = static_capacity_bytes(mem)
    free = max(0, min(usable - reserved, capacity - committed))
    assert free <= usable
    return NodeBudget(
        node_id=node_id,
        total_bytes=mem.ram_total.in_bytes,
        usable_bytes=usable,
        capacity_bytes=capacity,
        reserved_bytes=reserved,
        committed_bytes=committed,
        free_bytes=free,
    )


# --- messages -------------------------------------------------------------------


def format_gb(n_bytes: int) -> str:
    """Bytes as decimal gigabytes with one decimal: 15_600_000_000 -> '15.6 GB'."""
    return f"{n_bytes / 1e9:.1f} GB"


def describe_footprint(fp: Footprint) -> str:
    """'~15.6 GB (11.2 GB weights + 0.8 GB KV at 8192 tokens + headroom)'."""
    return (
        f"~{format_gb(fp.total_bytes)} ({format_gb(fp.weights_bytes)} weights + "
        f"{format_gb(fp.kv_bytes)} KV at {fp.kv_tokens} tokens + headroom)"
    )


def describe_shortfall(node: str, fp: Footprint, can_use_bytes: int, *, budget: NodeBudget | None = None) -> str:
    """The refusal sentence for one node, with the arithmetic.

    Example: "node B needs ~15.6 GB (11.2 GB weights + 0.8 GB KV at 8192
    tokens + headroom) but can use 12.0 GB". With a ``budget`` whose other
    instances hold memory, the sentence says so.
    """
    text = f"node {node} needs {describe_footprint(fp)} but can use {format_gb(max(0, can_use_bytes))}"
    if budget is not None and budget.committed_bytes > 0:
        text += (
            f" ({format_gb(budget.usable_bytes)} usable now, {format_gb(budget.committed_bytes)} "
            f"already placed there, {format_gb(budget.reserved_bytes)} of it not loaded yet)"
        )
    return text
