"""Loading a model shard and running its forward passes.

Theory of operation
-------------------
A *shard* is the part of a model one runner holds, and the forward passes it
runs. Three kinds share one small interface (``new_cache``, ``prefill``,
``decode``):

- ``LocalShard`` (world of one): the whole mlx-lm model, called exactly as
  ``mlx_lm.generate`` calls it. Its forwards stay lazy so the engine can
  overlap one step's computation with the previous step's bookkeeping.
- ``TensorShard``: every rank holds a 1/N slice of every layer (mlx-lm's
  ``model.shard(group)``); all ranks run the same forward and the all-sums
  inside the sharded layers combine them. Forwards are evaluated eagerly, in
  the same order on every rank, so collectives pair up.
- ``PipelineShard``: rank r holds layers ``[start, end)`` of the placement; the
  stages are chained in rank order over the ring: rank 0 embeds and runs the
  first layers, each rank sends its hidden state to the next, and for a decode
  step the last rank sends the final hidden state back to rank 0, which holds
  the final norm and the output head (the embedding matrix when tied) and
  samples. Only ring neighbours ever talk (0 -> 1 -> ... -> N-1 -> 0).

Pipeline stages need the llama-style layout mlx-lm uses for qwen2, qwen3,
llama and mistral (``model.model.embed_tokens``, ``.layers``, ``.norm`` and a
tied embedding or ``lm_head``); ``load_shard`` refuses other layouts clearly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import load_model, load_tokenizer

from skulk.core.instances import PipelineShardMetadata, ShardMetadata, TensorShardMetadata

__all__ = ["Shard", "LocalShard", "TensorShard", "PipelineShard", "LoadedShard", "load_shard", "partial_weights"]


class Shard:
    """The forward-pass interface the engine drives (see module docstring).

    ``eager`` shards evaluate inside ``prefill``/``decode`` (distributed
    shards must, so that every rank issues collectives in the same order);
    lazy shards return graphs the engine evaluates asynchronously.
    """

    rank: int = 0
    world_size: int = 1
    eager: bool = False

    def new_cache(self) -> list[Any]:
        raise NotImplementedError

    def prefill(self, tokens: mx.array, cache: list[Any]) -> list[Any]:
        """Run ``tokens`` (1, L) through the shard, filling ``cache``.

        Returns the arrays that must be evaluated for the cache to be complete
        (empty for eager shards, which evaluated already). No logits.
        """
        raise NotImplementedError

    def decode(self, inputs: mx.array, cache: list[Any]) -> mx.array | None:
        """One decode step for a batch: ``inputs`` (B,) -> logits (B, V) on rank 0.

        Other ranks return None (they have no head or need no logits).
        """
        raise NotImplementedError


class LocalShard(Shard):
    """The whole model in one process, called exactly like ``mlx_lm.generate``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.n_layers = len(model.layers)

    def new_cache(self) -> list[Any]:
        if hasattr(self.model, "make_cache"):
            return self.model.make_cache()
        return [KVCache() for _ in range(self.n_layers)]

    def prefill(self, tokens: mx.array, cache: list[Any]) -> list[Any]:
        self.model(tokens, cache=cache)
        return [c.state for c in cache]

    def decode(self, inputs: mx.array, cache: list[Any]) -> mx.array | None:
        return self.model(inputs[:, None], cache=cache)[:, -1, :]


class TensorShard(LocalShard):
    """A tensor-parallel slice; every rank runs the same forward, eagerly."""

    eager = True

    def __init__(self, model: Any, group: Any) -> None:
        super().__init__(model)
        self.group = group
        self.rank = group.rank()
        self.world_size = group.size()

    def prefill(self, tokens: mx.array, cache: list[Any]) -> list[Any]:
        self.model(tokens, cache=cache)
        mx.eval([c.state for c in cache])
        return []

    def decode(self, inputs: mx.array, cache: list[Any]) -> mx.array | None:
        logits = self.model(inputs[:, None], cache=cache)[:, -1, :]
        # Every rank evaluates the same graph so the all-sums pair up; only
        # rank 0 uses the logits.
        mx.eval(logits)
        return logits if self.rank == 0 else None


class PipelineShard(Shard):
    """Layers ``[start, end)`` of a pipeline chained over the ring in rank order."""

    eager = True

    def __init__(self, model: Any, group: Any, start: int, end: int) -> None:
        inner = model.model
        self.model = model
        self.group = group
        self.rank = group.rank()
        self.world_size = group.size()
        self.start, self.end = start, end
        self.layers = list(inner.layers[start:end])
        self.embed_tokens = inner.embed_tokens
        self.norm = inner.norm
        tied = getattr(getattr(model, "args", None), "tie_word_embeddings", not hasattr(model, "lm_head"))
        self.head: Callable[[mx.array], mx.array] = (
            inner.embed_tokens.as_linear if tied or not hasattr(model, "lm_head") else model.lm_head
        )
        # Not from the embedding weight: quantized embeddings pack it as uint32.
        self.hidden_size = int(getattr(model, "args", inner).hidden_size)
        self.dtype = inner.norm.weight.dtype
        assert 0 <= start < end, (start, end)

    def new_cache(self) -> list[Any]:
        return [KVCache() for _ in self.layers]

    def _stage(self, tokens: mx.array | None, shape: tuple[int, int], cache: list[Any], back: bool) -> mx.array | None:
        batch, length = shape
        last = self.rank == self.world_size - 1
        if self.rank == 0:
            assert tokens is not None
            h = self.embed_tokens(tokens)
        else:
            h = mx.distributed.recv((batch, length, self.hidden_size), self.dtype, self.rank - 1, group=self.group)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        if not last or back:
            sent = mx.distributed.send(h, (self.rank + 1) % self.world_size, group=self.group)
            mx.eval(sent, [c.state for c in cache])
        else:
            mx.eval(h, [c.state for c in cache])
        if self.rank == 0 and back:
            final = mx.distributed.recv(
                (batch, length, self.hidden_size), self.dtype, self.world_size - 1, group=self.group
            )
            mx.eval(final)
            return final
        return None

    def prefill(self, tokens: mx.array, cache: list[Any]) -> list[Any]:
        self._stage(tokens if self.rank == 0 else None, (1, int(tokens.shape[1])), cache, back=False)
        return []

    def decode(self, inputs: mx.array, cache: list[Any]) -> mx.array | None:
        final = self._stage(inputs[:, None] if self.rank == 0 else None, (int(inputs.shape[0]), 1), cache, back=True)
        if self.rank != 0:
            return None
        assert final is not None
        return self.head(self.norm(final))[:, -1, :]


@dataclass
class LoadedShard:
    shard: Shard
    tokenizer: Any
    config: dict[str, Any]
    n_layers: int


def _eval_with_progress(
    layer_groups: list[Any], rest: list[Any], on_progress: Callable[[int, int], None] | None
) -> None:
    """Evaluate (read from disk) one layer at a time, reporting about ten times."""
    total = len(layer_groups)
    every = max(1, total // 10)
    for i, params in enumerate(layer_groups):
        mx.eval(params)
        if on_progress is not None and ((i + 1) % every == 0 or i + 1 == total):
            on_progress(i + 1, total)
    mx.eval(rest)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def partial_weights(path: Path, shard_meta: ShardMetadata | None) -> bool:
    """Whether ``path`` holds only some of the model's weight files, enough for ``shard_meta``.

    A node fetches only the weight files its pipeline stage needs (the layers
    it holds, plus the embedding and head on rank 0), so other ranks' files may
    be absent. Returns False when every indexed file is present (a normal,
    strict load), True when the absent ones are not this shard's. Raises
    ``ValueError`` naming the files when this shard needs one that is absent:
    the runner must never start on a partial model it would fill with random
    weights.
    """
    index_file = path / "model.safetensors.index.json"
    if not index_file.is_file():
        return False
    weight_map = json.loads(index_file.read_text(encoding="utf-8")).get("weight_map") or {}
    missing = {f for f in set(weight_map.values()) if not (path / f).is_file()}
    if not missing:
        return False
    if not isinstance(shard_meta, PipelineShardMetadata) or shard_meta.world_size == 1:
        raise ValueError(f"{path} lacks weight files {sorted(missing)[:3]}; this runner needs every layer")
    start, end, head = shard_meta.start_layer, shard_meta.end_layer, shard_meta.device_rank == 0
    lacking: set[str] = set()
    for tensor, file in weight_map.items():
        m = _LAYER.search(tensor)
        wanted = (head if m is None else start <= int(m.group(1)) < end)
        if wanted and file in missing:
            lacking.add(file)
    if lacking:
        what = f"layers {start}-{end - 1}" + (" and the embedding and head" if head else "")
        raise ValueError(f"{path} lacks {sorted(lacking)}, which hold {what} of this shard")
    return True


def load_shard(
    model_path: str | Path,
    shard_meta: ShardMetadata | None,
    group: Any | None,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> LoadedShard:
    """Load the part of the model at ``model_path`` that ``shard_meta`` assigns.

    ``group`` is the ``mx.distributed`` group (None for a world of one).
    Only the weights this rank needs are read from disk. ``on_progress(done,
    total)`` reports layers loaded. Raises ``ValueError`` when the model cannot
    be sharded as asked.
    """
    path = Path(model_path)
    # Other ranks' weight files may be absent (a node fetches only its stage's);
    # then the load is not strict, and partial_weights has checked this rank's are here.
    model, config = load_model(path, lazy=True, strict=not partial_weights(path, shard_meta))
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    n_layers = len(model.layers)
    world = 1 if shard_meta is None else shard_meta.world_size
    if shard_meta is not None:
        if shard_meta.n_layers != n_layers:
            raise ValueError(
                f"placement says the model has {shard_meta.n_layers} layers but {path} has {n_layers}"
            )
        if world > 1 and (group is None or group.size() != world):
            raise ValueError(f"shard expects world size {world} but the group has {None if group is None else group.size()}")
    if world == 1:
        _eval_with_progress([layer.parameters() for layer in model.layers], [model.parameters()], on_progress)
        return LoadedShard(LocalShard(model), tokenizer, config, n_layers)
    assert group is not None
    if isinstance(shard_meta, TensorShardMetadata):
        if not hasattr(model, "shard"):
            raise ValueError(f"model type {config.get('model_type')!r} does not support tensor sharding in mlx-lm")
        model.shard(group)
        _eval_with_progress([layer.parameters() for layer in model.layers], [model.parameters()], on_progress)
        return LoadedShard(TensorShard(model, group), tokenizer, config, n_layers)
    assert isinstance(shard_meta, PipelineShardMetadata), shard_meta
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        raise ValueError(
            f"model type {config.get('model_type')!r} lacks the llama-style layout pipeline stages need"
        )
    start, end = shard_meta.start_layer, shard_meta.end_layer
    if not (0 <= start < end <= n_layers):
        raise ValueError(f"bad layer range [{start}, {end}) for a {n_layers}-layer model")
    shard = PipelineShard(model, group, start, end)
    head_params: list[Any] = []
    if shard.rank == 0:
        head_params = [inner.embed_tokens.parameters(), inner.norm.parameters()]
        if hasattr(model, "lm_head"):
            head_params.append(model.lm_head.parameters())
    # Drop references to other ranks' layers so their lazy weights are never read.
    inner.layers = list(shard.layers)
    _eval_with_progress([layer.parameters() for layer in shard.layers], head_params, on_progress)
    return LoadedShard(shard, tokenizer, config, n_layers)
