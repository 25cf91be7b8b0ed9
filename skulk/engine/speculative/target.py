"""The target model as speculation sees it: multi-token forwards with hidden states.

Theory of operation
-------------------
Verifying ``k`` drafts needs one forward pass over ``k + 1`` tokens that
returns logits for every position, and, for MTP drafting, the target's final
hidden states too. The engine's shards (``skulk.engine.shard``) expose a
one-token ``decode``; ``TargetView`` adds the multi-token forward on top of
the same weights and KV caches, for each kind of shard:

- a whole model (``LocalShard`` or a bare mlx-lm model): ``model.model`` gives
  the post-norm hidden states, the tied embedding or ``lm_head`` the logits;
- ``TensorShard``: the same forward on every rank, evaluated eagerly so the
  all-sums pair up; every rank gets the hidden states and logits;
- ``PipelineShard``: the stages chained over the ring as for a decode step,
  with the final hidden state sent back to rank 0, which alone gets logits.

Models without the llama-style layout still verify (through ``model(...)``)
but offer no hidden states, so MTP is unavailable for them.

Invariants: ``forward`` appends exactly ``L`` positions to every layer's
cache on every rank; ``trim`` removes the same count everywhere it is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

__all__ = ["TargetView", "trim_cache", "cache_length"]


def trim_cache(cache: list[Any], n: int) -> None:
    """Drop the last ``n`` positions of every layer's cache (mlx-lm caches trim in place)."""
    assert n >= 0, n
    if n == 0:
        return
    for c in cache:
        if isinstance(c, list):
            trim_cache(c, n)
            continue
        assert c.is_trimmable(), f"{type(c).__name__} cannot be trimmed; speculation needs trimmable caches"
        trimmed = c.trim(n)
        assert trimmed == n, (trimmed, n)


def cache_length(cache: list[Any]) -> int:
    """Positions held by the first layer's cache (all layers hold the same count)."""
    first = cache[0]
    if isinstance(first, list):
        return cache_length(first)
    return int(first.size())


class TargetView:
    """Multi-token forwards over a shard (or a bare mlx-lm model); see the module docstring.

    ``rank``/``world_size``/``kind`` describe the placement ("local",
    "tensor" or "pipeline"). ``has_logits`` is True where ``forward`` returns
    logits (every rank but pipeline followers). ``supports_hidden`` is True
    when the layout exposes hidden states (needed by MTP).
    """

    def __init__(self, shard_or_model: Any) -> None:
        from skulk.engine.shard import LocalShard, PipelineShard, TensorShard

        self.shard = shard_or_model
        self.rank = 0
        self.world_size = 1
        self.kind = "local"
        self._pipeline: PipelineShard | None = None
        if isinstance(shard_or_model, PipelineShard):
            self._pipeline = shard_or_model
            self.kind = "pipeline"
            self.rank, self.world_size = shard_or_model.rank, shard_or_model.world_size
            self.model = shard_or_model.model
            self._embed = shard_or_model.embed_tokens
            self._norm = shard_or_model.norm
            self._head: Callable[[mx.array], mx.array] = shard_or_model.head
            self.supports_hidden = True
            self.vocab_size = int(self._embed.weight.shape[0])
            self.hidden_size = int(shard_or_model.hidden_size)
            return
        if isinstance(shard_or_model, TensorShard):
            self.kind = "tensor"
            self.rank, self.world_size = shard_or_model.rank, shard_or_model.world_size
            self.model = shard_or_model.model
        elif isinstance(shard_or_model, LocalShard):
            self.model = shard_or_model.model
        else:
            self.model = shard_or_model
        inner = getattr(self.model, "model", None)
        self.supports_hidden = inner is not None and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm"))
        if self.supports_hidden:
            self._embed = inner.embed_tokens
            tied = getattr(getattr(self.model, "args", None), "tie_word_embeddings", not hasattr(self.model, "lm_head"))
            self._head = inner.embed_tokens.as_linear if tied or not hasattr(self.model, "lm_head") else self.model.lm_head
            self.vocab_size = int(inner.embed_tokens.weight.shape[0])
            self.hidden_size = int(inner.embed_tokens.weight.shape[1])
        else:
            self.vocab_size = int(getattr(getattr(self.model, "args", None), "vocab_size", 0))
            self.hidden_size = 0

    @property
    def eager(self) -> bool:
        """Distributed forwards evaluate inside ``forward`` (collectives must pair up)."""
        return self.world_size > 1

    @property
    def has_logits(self) -> bool:
        return self.kind != "pipeline" or self.rank == 0

    def embed(self, tokens: mx.array) -> mx.array:
        assert self.supports_hidden, "this model exposes no embedding"
        return self._embed(tokens)

    def head(self, hidden: mx.array) -> mx.array:
        assert self.supports_hidden, "this model exposes no output head"
        return self._head(hidden)

    def forward(self, tokens: mx.array, cache: list[Any], *, want_hidden: bool = False) -> tuple[mx.array | None, mx.array | None]:
        """Run ``tokens`` (L,) through the target, appending L positions to ``cache``.

        Returns (logits (L, V), hidden (L, H) or None). Logits are None on
        pipeline followers; hidden is None unless asked for (and on pipeline
        followers). Local forwards stay lazy; distributed ones are evaluated.
        """
        assert tokens.ndim == 1 and tokens.shape[0] >= 1, tokens.shape
        length = int(tokens.shape[0])
        if self._pipeline is not None:
            final = self._pipeline._stage(tokens[None] if self.rank == 0 else None, (1, length), cache, back=True)
            if self.rank != 0:
                return None, None
            assert final is not None
            hidden = self._norm(final)
            logits = self._head(hidden)
            return logits[0], hidden[0] if want_hidden else None
        if want_hidden or self.supports_hidden:
            if not self.supports_hidden:
                raise ValueError("this model's layout exposes no hidden states")
            hidden = self.model.model(tokens[None], cache=cache)
            logits = self._head(hidden)
        else:
            hidden = None
            logits = self.model(tokens[None], cache=cache)
        if self.eager:
            mx.eval(logits, hidden if hidden is not None else [])
        return logits[0], (hidden[0] if (want_hidden and hidden is not None) else None)
