"""Model files as the cluster sees them: copies, coverage in layers, disk.

Theory of operation
-------------------
The core never sees a file. It reasons about *coverage*: which layers of a
model a node holds verified (runs ``[start, end)``), whether it holds the
tensors outside the layers (embedding, final norm, output head: the *head*),
and how many bytes that takes. The runtime maps files to coverage through the
model's safetensors index; the simulator models coverage directly.

A node's copy of a model (``ModelCopy``, replicated state) moves through a
lifecycle::

    requested -> downloading -> verified          (a transfer, from the hub or a peer)
    staged -> verified                            (files found on disk, then hashed)
    any -> failed (with the reason)               (a transfer that cannot complete)
    verified -> evicting -> (removed)             (by request, or over the disk budget)

``coverage`` always describes what is verified *now*: a copy downloading
layers 4-7 while holding 0-3 verified has status ``downloading`` and covers
0-3. Only verified coverage counts for starting a runner or serving a peer.

What a runner needs (``Need``): a pipeline rank its layer range, plus the
head on rank 0 (the rank that embeds and samples); a tensor rank, or a world
of one, the whole model.

Invariants kept: coverage runs are sorted, disjoint, non-adjacent and inside
``[0, n_layers)``; a ``Need`` is never empty.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from skulk.core.instances import PipelineShardMetadata, ShardMetadata
from skulk.core.records import Record

__all__ = [
    "CopyStatus",
    "COPY_STATUSES",
    "Need",
    "need_of",
    "whole",
    "Coverage",
    "merge_runs",
    "covers",
    "missing_layers",
    "ModelCopy",
    "DiskInfo",
    "fetch_bytes",
]

CopyStatus = Literal["requested", "downloading", "staged", "verified", "evicting", "failed"]
COPY_STATUSES: tuple[str, ...] = ("requested", "downloading", "staged", "verified", "evicting", "failed")


class Need(Record, frozen=True, kw_only=True):
    """The part of a model one runner reads: layers ``[start, end)`` of ``n_layers``, and the head or not."""

    start: int
    end: int
    n_layers: int
    head: bool

    def __post_init__(self) -> None:
        assert 0 <= self.start < self.end <= self.n_layers, self

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.end == self.n_layers and self.head


def whole(n_layers: int) -> Need:
    return Need(start=0, end=n_layers, n_layers=n_layers, head=True)


def need_of(shard: ShardMetadata) -> Need:
    """What the runner of ``shard`` reads (``skulk.engine.shard.partial_weights`` checks the same)."""
    if isinstance(shard, PipelineShardMetadata) and shard.world_size > 1:
        return Need(start=shard.start_layer, end=shard.end_layer, n_layers=shard.n_layers,
                    head=shard.device_rank == 0)
    return whole(shard.n_layers)


def merge_runs(runs: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint, non-adjacent runs covering the same layers."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in runs if r[0] < r[1]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return tuple(out)


class Coverage(Record, frozen=True, kw_only=True):
    """What a copy holds verified: layer runs and the head, of an ``n_layers`` model (0: not known yet)."""

    n_layers: int
    layers: tuple[tuple[int, int], ...] = ()
    head: bool = False

    def __post_init__(self) -> None:
        assert self.layers == merge_runs(self.layers), self
        assert all(0 <= s < e <= self.n_layers for s, e in self.layers), self

    @property
    def complete(self) -> bool:
        return self.head and self.layers == ((0, self.n_layers),)

    def union(self, other: Coverage) -> Coverage:
        assert other.n_layers == self.n_layers, (self, other)
        return Coverage(n_layers=self.n_layers, layers=merge_runs(self.layers + other.layers),
                        head=self.head or other.head)

    def layer_count(self) -> int:
        return sum(e - s for s, e in self.layers)


def missing_layers(coverage: Coverage | None, need: Need) -> int:
    """How many of ``need``'s layers ``coverage`` lacks."""
    if coverage is None or coverage.n_layers != need.n_layers:
        return need.end - need.start
    held = 0
    for s, e in coverage.layers:
        held += max(0, min(e, need.end) - max(s, need.start))
    return need.end - need.start - held


def covers(coverage: Coverage | None, need: Need) -> bool:
    """Whether ``coverage`` holds everything ``need`` reads."""
    if coverage is None or coverage.n_layers != need.n_layers:
        return False
    return missing_layers(coverage, need) == 0 and (coverage.head or not need.head)


def fetch_bytes(coverage: Coverage | None, need: Need, weight_bytes: int) -> int:
    """Bytes a node must fetch for ``need``: the missing layers' share of ``weight_bytes``.

    The head's tensors are counted as one more layer's worth (an estimate: the
    runtime checks real file sizes before writing and refuses what does not
    fit; placement uses this to prefer nodes with the files and to count disk
    like memory).
    """
    same = coverage is not None and coverage.n_layers == need.n_layers
    head_missing = need.head and not (same and coverage is not None and coverage.head)
    units_missing = missing_layers(coverage, need) + (1 if head_missing else 0)
    return weight_bytes * units_missing // (need.n_layers + 1)


class ModelCopy(Record, frozen=True, kw_only=True):
    """One node's copy of one model, as the replicated state knows it.

    ``done_bytes``/``total_bytes``/``rate_bps``/``eta_s`` describe the transfer
    in flight (zeros otherwise); ``source`` is where the files come or came
    from (``hub``, ``peer:<node>``, ``store`` while waiting for the store node,
    ``local``); ``error`` says why a copy failed. ``since`` (when the status
    last changed) and ``last_used_at`` (the last time an instance using it was
    created or deleted: the LRU clock) are the master's times, set by ``apply``.
    """

    status: CopyStatus
    coverage: Coverage
    bytes: int = 0  # verified bytes on disk
    files: tuple[str, ...] = ()  # verified files (the store registry lists them)
    source: str = ""
    error: str = ""
    done_bytes: int = 0
    total_bytes: int = 0
    rate_bps: int = 0
    eta_s: int | None = None
    since: float = 0.0
    last_used_at: float = 0.0

    @property
    def usable(self) -> Coverage | None:
        """The coverage that counts: verified bytes are usable unless the copy is being evicted."""
        return None if self.status == "evicting" else self.coverage


class DiskInfo(Record, frozen=True, kw_only=True):
    """A node's models disk: ``models_bytes`` used by model copies, ``budget_bytes`` 0 = no budget."""

    total_bytes: int
    free_bytes: int
    models_bytes: int = 0
    budget_bytes: int = 0
    path: str = ""  # the models directory, as the node names it (the store's health shows it)
