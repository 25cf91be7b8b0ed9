"""Multi-token-prediction (MTP) heads: the module, loading it from a checkpoint, saving it.

Theory of operation
-------------------
DeepSeek-V3 and Qwen3-Next checkpoints carry small extra modules trained to
predict the token *after next*. mlx-lm drops those weights when it loads a
model, so Skulk loads them itself. One MTP module computes, for a position i
whose target hidden state is ``h_i`` and whose next token is ``t_{i+1}``::

    x_i   = fc([norm_e(embed(t_{i+1})); norm_h(h_i)])      # 2H -> H
    g_i   = block(x_i)            # one (or more) decoder blocks, causal, own KV cache
    logits_{i+2} = head(norm(g_i))                  # the target's output head

Chained drafting feeds ``g_i`` back in place of a target hidden state to guess
one more token (``g`` of a chained step never enters the cache for good: the
drafter trims it after the round).

``h_i`` is the target's final hidden state *after* its final norm (what
mlx-lm's ``model.model(...)`` returns); ``embed`` and ``head`` are the
target's own (tied or not), unless a DeepSeek checkpoint ships its own
``shared_head.head``.

Weight layouts understood (``load_mtp``):

- Qwen3-Next: ``mtp.fc``, ``mtp.pre_fc_norm_embedding``,
  ``mtp.pre_fc_norm_hidden``, ``mtp.layers.<j>.<block>``, ``mtp.norm``;
- DeepSeek-V3: ``model.layers.<n + i>.{eh_proj, enorm, hnorm,
  shared_head.norm, shared_head.head, <block>}`` for ``i`` in
  ``range(num_nextn_predict_layers)``, ``n`` the number of decoder layers;

found in the checkpoint's weight files (via ``model.safetensors.index.json``)
or in a sidecar ``mtp.safetensors``. Skulk's generated models use the sidecar
so that mlx-lm, which loads every ``model*.safetensors`` strictly, still
loads the checkpoint unchanged. The block is built from the target's own
decoder-block class, so the MTP layer has exactly the target's block shape.

Invariants: a loaded head has the target's hidden size and vocabulary; the
module never owns the embedding or head weights it borrows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

__all__ = [
    "MTP_SIDECAR",
    "MtpUnsupported",
    "MtpModule",
    "MtpHeads",
    "block_class_of",
    "new_mtp_heads",
    "find_mtp_weights",
    "load_mtp",
    "save_mtp",
    "shard_mtp",
]

MTP_SIDECAR = "mtp.safetensors"
_QWEN_PREFIX = "mtp."
_DEEPSEEK_RENAMES = {
    "eh_proj": "fc",
    "enorm": "pre_fc_norm_embedding",
    "hnorm": "pre_fc_norm_hidden",
    "shared_head.norm": "norm",
    "shared_head.head": "head",
}


class MtpUnsupported(ValueError):
    """The checkpoint has no MTP weights, or the model's layout cannot host them."""


def block_class_of(model: Any) -> type:
    """The decoder-block class of an mlx-lm model (llama-style layouts)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not layers:
        raise MtpUnsupported(f"{type(model).__module__} has no model.layers; MTP needs a llama-style layout")
    block = next((layer for layer in layers if layer is not None), None)
    if block is None:
        raise MtpUnsupported("this shard holds no decoder block to copy the MTP block's shape from")
    return type(block)


class MtpModule(nn.Module):
    """One MTP module (see the module docstring); ``head`` only for DeepSeek checkpoints."""

    def __init__(self, block_cls: type, args: Any, hidden_size: int, eps: float, n_blocks: int = 1) -> None:
        super().__init__()
        assert n_blocks >= 1, n_blocks
        self.pre_fc_norm_embedding = nn.RMSNorm(hidden_size, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(hidden_size, eps=eps)
        self.fc = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        try:
            self.layers = [block_cls(args) for _ in range(n_blocks)]
        except TypeError as exc:
            raise MtpUnsupported(f"cannot build an MTP block from {block_cls.__name__}(args): {exc}") from None
        self.norm = nn.RMSNorm(hidden_size, eps=eps)

    def __call__(self, hidden: mx.array, embeds: mx.array, cache: list[Any]) -> tuple[mx.array, mx.array]:
        """``hidden`` and ``embeds`` (B, L, H) -> (block output g, its normed form)."""
        assert hidden.shape == embeds.shape, (hidden.shape, embeds.shape)
        x = self.fc(mx.concatenate([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], axis=-1))
        mask = create_attention_mask(x, cache[0])
        for layer, c in zip(self.layers, cache):
            x = layer(x, mask, c)
        return x, self.norm(x)


class MtpHeads(nn.Module):
    """The MTP modules of a checkpoint; step ``j`` of a chain uses ``modules[min(j, n - 1)]``."""

    def __init__(self, modules: list[MtpModule]) -> None:
        super().__init__()
        assert modules, "at least one MTP module"
        self.modules_ = modules

    @property
    def count(self) -> int:
        return len(self.modules_)

    def module_for(self, step: int) -> MtpModule:
        return self.modules_[min(step, len(self.modules_) - 1)]

    def new_cache(self) -> list[list[Any]]:
        return [[KVCache() for _ in m.layers] for m in self.modules_]


def _model_dims(model: Any) -> tuple[Any, int, float]:
    args = getattr(model, "args", None)
    if args is None:
        raise MtpUnsupported("the model has no args to build an MTP block from")
    hidden = int(args.hidden_size)
    eps = float(getattr(args, "rms_norm_eps", 1e-6))
    return args, hidden, eps


def new_mtp_heads(model: Any, n_modules: int = 1, n_blocks: int = 1) -> MtpHeads:
    """Fresh (randomly initialised) MTP heads shaped for ``model``."""
    args, hidden, eps = _model_dims(model)
    block_cls = block_class_of(model)
    return MtpHeads([MtpModule(block_cls, args, hidden, eps, n_blocks) for _ in range(n_modules)])


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("model*.safetensors"))


def find_mtp_weights(model_dir: Path, config: dict[str, Any]) -> dict[str, mx.array]:
    """Collect MTP weights, renamed to ``modules_.<i>.<name>``; empty when none.

    Looks at the sidecar ``mtp.safetensors`` and the checkpoint's weight
    files (Qwen3-Next ``mtp.*`` keys and DeepSeek-V3 layers past the last
    decoder layer). Arrays load lazily from their files.
    """
    model_dir = Path(model_dir)
    text = config.get("text_config", config)
    n_layers = int(text["num_hidden_layers"])
    deepseek = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    found: dict[str, mx.array] = {}
    files = _weight_files(model_dir)
    sidecar = model_dir / MTP_SIDECAR
    if sidecar.is_file():
        files = [sidecar] + files
    for file in files:
        if not file.is_file():
            continue
        for key, value in mx.load(str(file)).items():
            if key.startswith(_QWEN_PREFIX):
                found[f"modules_.0.{key[len(_QWEN_PREFIX):]}"] = value
                continue
            match = deepseek.match(key)
            if match and int(match.group(1)) >= n_layers:
                i, rest = int(match.group(1)) - n_layers, match.group(2)
                if rest.startswith("embed_tokens."):
                    continue  # DeepSeek repeats the shared embedding; the target's is used
                for old, new in _DEEPSEEK_RENAMES.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
                else:
                    rest = "layers.0." + rest
                found[f"modules_.{i}.{rest}"] = value
    return found


def load_mtp(model: Any, model_dir: Path, config: dict[str, Any]) -> MtpHeads:
    """Build and load the MTP heads of the checkpoint at ``model_dir`` for ``model``.

    Raises ``MtpUnsupported`` when the checkpoint carries none, or when they
    do not fit the model (shapes, missing weights, unknown names).
    """
    weights = find_mtp_weights(Path(model_dir), config)
    if not weights:
        raise MtpUnsupported(f"{model_dir} carries no MTP weights (no mtp.* keys, no layers past the last)")
    n_modules = 1 + max(int(k.split(".")[1]) for k in weights)
    n_blocks = 1 + max((int(k.split(".")[3]) for k in weights if k.split(".")[2] == "layers"), default=0)
    heads = new_mtp_heads(model, n_modules=n_modules, n_blocks=n_blocks)
    for i in range(n_modules):
        if f"modules_.{i}.head.weight" in weights:
            heads.modules_[i].head = nn.Linear(*weights[f"modules_.{i}.head.weight"].shape[::-1], bias=False)
    expected = dict(tree_flatten(heads.parameters()))
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing or unknown:
        raise MtpUnsupported(f"MTP weights in {model_dir} do not fit the model: missing {missing[:6]}, unknown {unknown[:6]}")
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(weights[k].shape)]
    if bad:
        raise MtpUnsupported(f"MTP weight shapes differ from the model's: {[(k, weights[k].shape) for k in bad[:4]]}")
    heads.update(tree_unflatten(list(weights.items())))
    mx.eval(heads.parameters())
    return heads


def save_mtp(heads: MtpHeads, model_dir: Path) -> Path:
    """Write ``heads`` as a Qwen3-Next-style sidecar (one module) into ``model_dir``."""
    assert heads.count == 1, "the Qwen3-Next layout holds exactly one MTP module"
    flat = {f"{_QWEN_PREFIX}{k[len('modules_.0.'):]}": v for k, v in tree_flatten(heads.parameters())}
    out = Path(model_dir) / MTP_SIDECAR
    mx.save_safetensors(str(out), flat, metadata={"format": "mlx", "skulk": "mtp"})
    return out


def shard_mtp(heads: MtpHeads, group: Any) -> None:
    """Tensor-shard the MTP blocks over ``group`` the way mlx-lm shards llama-style blocks.

    ``fc``, the norms and any private head stay replicated (they are small
    and their outputs must be whole on every rank). Raises ``MtpUnsupported``
    when the block is not a llama-style attention + MLP block or the head
    counts do not divide.
    """
    n = group.size()
    for module in heads.modules_:
        for block in module.layers:
            attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
            names = ("q_proj", "k_proj", "v_proj", "o_proj")
            if attn is None or mlp is None or not all(hasattr(attn, a) for a in names):
                raise MtpUnsupported(f"cannot tensor-shard an MTP block of type {type(block).__name__}")
            if attn.n_heads % n or attn.n_kv_heads % n:
                raise MtpUnsupported(f"MTP heads ({attn.n_heads}, {attn.n_kv_heads} KV) do not divide by {n}")
            attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
            attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
            attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
            attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
            attn.n_heads //= n
            attn.n_kv_heads //= n
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
