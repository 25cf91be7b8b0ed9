"""What a pipeline stage needs from a model, per architecture: embed, per-layer masks, a layer call, the head.

Theory of operation
-------------------
A pipeline stage runs a contiguous range of a model's decoder layers; rank 0
also embeds the tokens and, after the last stage sends the final hidden state
back, applies the final norm and the output head. mlx-lm's models do all of
that in one ``__call__``, with details that differ by architecture and that a
stage must reproduce exactly:

- *where the language model lives*: ``model.model`` (llama, qwen, gpt-oss,
  DeepSeek) or ``model.language_model.model`` (Gemma 3 and 4, whose wrappers
  also carry a vision tower mlx-lm does not load);
- *the embedding*: Gemma scales it by ``sqrt(hidden)`` (Gemma 3 rounds that
  factor through bfloat16 first);
- *the masks*: models with sliding-window layers (Gemma, gpt-oss, llama with
  ``layer_types``) give those layers a windowed mask and the others a causal
  one, and pick each from a cache *by index in the full model* (``cache[0]``,
  ``cache[pattern - 1]``), which is wrong for a stage that starts mid-pattern.
  A stage therefore builds each layer's mask from that layer's own cache, as
  the model would (a ``RotatingKVCache`` of ``max_size`` W means a window of
  W); DeepSeek-V3 wants its mask as an array;
- *the layer call*: ``layer(h, mask, cache)``, except Gemma 4's, which also
  threads shared keys and values and returns a triple;
- *the head*: a separate ``lm_head`` or the tied embedding, and Gemma 4's
  final logit soft-capping.

``stage_model(model)`` returns the ``StageModel`` for a loaded model, or
raises ``PipelineUnsupported`` naming why it cannot be split (Gemma 4's
KV-shared layers and per-layer inputs tie layers to each other and to the
tokens across the whole depth). Placement refuses those before a runner
starts (``skulk.core.cards.ModelCard.pipeline_refusal``); this is the load-time
backstop that names the same reason.

Invariant (tested for every carded architecture, tests/engine/test_arch_ranks.py):
running ``embed``, every layer with its ``layer_mask``, and ``head`` gives the
logits of ``model(tokens, cache)`` with the model's own caches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache

__all__ = ["PipelineUnsupported", "StageModel", "stage_model", "make_layer_caches", "fresh_cache"]


class PipelineUnsupported(ValueError):
    """The model cannot be split into pipeline stages; the message says why."""


def make_layer_caches(model: Any) -> list[Any]:
    """The model's own per-layer caches (``model.make_cache()``), else one ``KVCache`` per layer.

    This is the one place a runner constructs caches: sliding-window layers
    get the model's ``RotatingKVCache``, latent-attention and recurrent layers
    their own types. A prefix cache builds on it.
    """
    if hasattr(model, "make_cache"):
        return list(model.make_cache())
    return [KVCache() for _ in model.layers]


def fresh_cache(template: Any) -> Any:
    """A new, empty cache of the same type and settings as ``template`` (itself empty)."""
    assert getattr(template, "offset", 0) == 0 and getattr(template, "keys", None) is None, "template in use"
    return copy.deepcopy(template)


@dataclass
class StageModel:
    """The parts of a model a pipeline stage calls; see the module docstring."""

    model: Any  # the loaded mlx-lm Model
    text: Any  # the language model: ``model`` or ``model.language_model``
    inner: Any  # ``text.model``: embed_tokens, layers, norm
    family: str
    embed_scale: float | None  # Gemma's sqrt(hidden), already rounded as the model rounds it
    mask_array: bool  # DeepSeek-V3 builds array masks
    gemma4_layers: bool  # layer(h, mask, cache, per_layer_input, shared_kv, offset) -> (h, kv, offset)
    softcap: float | None

    @property
    def hidden_size(self) -> int:
        args = getattr(self.text, "args", None)
        return int(getattr(args, "hidden_size", None) or self.inner.norm.weight.shape[-1])

    def embed(self, tokens: mx.array) -> mx.array:
        h = self.inner.embed_tokens(tokens)
        if self.family == "gemma3":  # as gemma3_text: the factor is rounded to bfloat16 first
            assert self.embed_scale is not None
            h = h * mx.array(self.embed_scale, mx.bfloat16).astype(h.dtype)
        elif self.embed_scale is not None:
            h = h * self.embed_scale
        return h

    def layer_mask(self, h: mx.array, cache: Any) -> Any:
        """The mask the model gives a layer whose cache is ``cache`` (windowed for a rotating cache)."""
        window = cache.max_size if isinstance(cache, RotatingKVCache) else None
        if self.mask_array:
            return create_attention_mask(h, cache, window_size=window, return_array=True)
        return create_attention_mask(h, cache, window_size=window)

    def run_layer(self, layer: Any, h: mx.array, mask: Any, cache: Any) -> mx.array:
        if self.gemma4_layers:
            out, _, _ = layer(h, mask, cache, per_layer_input=None, shared_kv=None, offset=None)
            return out
        return layer(h, mask, cache)

    def project(self, normed: mx.array) -> mx.array:
        """Output projection of normed hidden states (``lm_head``, else the tied embedding), soft-capped."""
        # mlx-lm models have an lm_head exactly when the output is not tied (Gemma 3 drops its own at load).
        lm_head = getattr(self.text, "lm_head", None)
        out = lm_head(normed) if lm_head is not None else self.inner.embed_tokens.as_linear(normed)
        if self.softcap is not None:
            from mlx_lm.models.gemma4_text import logit_softcap

            out = logit_softcap(self.softcap, out)
        return out

    def head(self, h: mx.array) -> mx.array:
        """Final norm, then ``project``: the logits of the model's last hidden state ``h``."""
        return self.project(self.inner.norm(h))


def stage_model(model: Any, config: dict[str, Any]) -> StageModel:
    """The ``StageModel`` of a loaded mlx-lm model; raises ``PipelineUnsupported`` with the reason."""
    family = str(config.get("model_type", ""))
    text = getattr(model, "language_model", model)
    inner = getattr(text, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        raise PipelineUnsupported(f"model type {family!r} lacks the decoder layout pipeline stages need")
    args = getattr(text, "args", None)
    embed_scale: float | None = None
    gemma4 = family in ("gemma4", "gemma4_text")
    if family in ("gemma3", "gemma3_text"):
        family = "gemma3"
        embed_scale = float(args.hidden_size) ** 0.5
    elif gemma4:
        family = "gemma4"
        if getattr(args, "num_kv_shared_layers", 0):
            raise PipelineUnsupported(
                f"gemma4 with {args.num_kv_shared_layers} KV-shared layers: they reuse earlier layers' keys and "
                f"values, which another pipeline stage holds"
            )
        if getattr(args, "hidden_size_per_layer_input", 0):
            raise PipelineUnsupported("gemma4 with per-layer input embeddings: every layer needs the tokens")
        embed_scale = float(inner.embed_scale)
    softcap = getattr(text, "final_logit_softcapping", None) if gemma4 else None
    return StageModel(
        model=model,
        text=text,
        inner=inner,
        family=family,
        embed_scale=embed_scale,
        mask_array=family == "deepseek_v3",
        gemma4_layers=gemma4,
        softcap=float(softcap) if softcap else None,
    )
