"""The weight format a runner computes with, chosen per device after loading.

Theory of operation
-------------------
A model directory stores weights the way they travel best: quantized (MLX
affine, as imported from GGUF or converted by mlx-lm) with float16 scales.
What computes fastest depends on the device:

- **Metal** (Apple GPUs): quantized matmuls are MLX's fast path and decode is
  bound by memory bandwidth, so fewer bytes per weight is faster. Weights stay
  as stored (``as-stored``).
- **CPU** (Linux, MLX's CPU build): measured on SmolLM2-135M (docs/engine.md,
  "Serving format on CPU"), MLX's CPU quantized matmul runs on one thread
  without BLAS and is 2.5-4x slower per matrix than a float32 matmul routed to
  OpenBLAS (``skulk.engine.accel``); float16 scales also pull the activations
  down to float16, which the CPU computes slower still and less exactly. So
  on CPU the runner dequantizes every affine-quantized layer to float32 once
  at load and casts float16/bfloat16 parameters to float32 (``float32``).
  Dequantization is exact: the float32 weights equal what the quantized
  kernel would have used, so the answers are those of the stored model
  computed in float32.

``SKULK_CPU_WEIGHTS`` overrides the CPU choice (``float32`` or ``as-stored``;
Metal always keeps what is stored). ``prepare_weights`` runs after a shard is
loaded (after tensor sharding, on the slices this rank holds) and before the
first forward pass; it only touches modules the shard kept.

Invariant: after ``prepare_weights(model, "float32")`` no parameter is
float16, bfloat16 or packed, and ``model(tokens)`` equals the stored model's
forward with its weights dequantized in float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

__all__ = ["CPU_WEIGHTS_ENV", "FORMATS", "default_format", "prepare_weights"]

CPU_WEIGHTS_ENV = "SKULK_CPU_WEIGHTS"
FORMATS = ("float32", "as-stored")


def default_format(device: Any | None = None) -> str:
    """``as-stored`` on a GPU; on CPU ``SKULK_CPU_WEIGHTS`` (default ``float32``)."""
    device = device if device is not None else mx.default_device()
    if device.type == mx.DeviceType.gpu:
        return "as-stored"
    value = (os.environ.get(CPU_WEIGHTS_ENV) or "float32").strip().lower()
    if value not in FORMATS:
        raise ValueError(f"{CPU_WEIGHTS_ENV}={value!r}: expected one of {', '.join(FORMATS)}")
    return value


# Quantized linear layers and the float layer each becomes (tensor-parallel slices keep their group).
_LINEAR_KINDS: dict[type, str] = {
    nn.QuantizedLinear: "local",
    nn.QuantizedAllToShardedLinear: "all-to-sharded",
    nn.QuantizedShardedToAllLinear: "sharded-to-all",
}


def _dequantized(module: Any) -> Any:
    scales = module.scales.astype(mx.float32)
    biases = None if module.biases is None else module.biases.astype(mx.float32)
    return mx.dequantize(
        module.weight, scales, biases, group_size=module.group_size, bits=module.bits, mode=module.mode
    ).astype(mx.float32)


def prepare_weights(model: Any, fmt: str | None = None, *, only: Callable[[str], bool] | None = None) -> dict[str, int]:
    """Convert ``model``'s weights in place to ``fmt`` (default: ``default_format()``).

    ``only(path)`` limits the conversion to the modules and parameters whose
    dotted path it accepts (a pipeline stage converts its own layers, not the
    lazy, never-read weights of the others).

    Output: counts of what changed (``dequantized_linear``,
    ``dequantized_embedding``, ``cast``), for the runner's log. ``as-stored``
    changes nothing. Quantization modes other than affine are left quantized
    (MLX's microscaling kernels have no float equivalent worth the memory).
    """
    fmt = fmt or default_format()
    assert fmt in FORMATS, fmt
    counts = {"dequantized_linear": 0, "dequantized_embedding": 0, "cast": 0}
    if fmt == "as-stored":
        return counts
    replacements: list[tuple[str, Any]] = []
    for path, module in model.named_modules():
        if not path or (only is not None and not only(path)):
            continue
        linear_kind = _LINEAR_KINDS.get(type(module))  # exact types: a subclass may compute differently
        if linear_kind is not None and module.mode == "affine":
            weight = _dequantized(module)
            out_dims, in_dims = int(weight.shape[0]), int(weight.shape[1])
            has_bias = "bias" in module
            if linear_kind == "local":
                linear = nn.Linear(in_dims, out_dims, bias=has_bias)
            elif linear_kind == "all-to-sharded":  # this rank holds out_dims of out_dims * N rows
                linear = nn.AllToShardedLinear(in_dims, out_dims * module.group.size(), has_bias, module.group)
            else:  # sharded-to-all: in_dims of in_dims * N columns
                linear = nn.ShardedToAllLinear(in_dims * module.group.size(), out_dims, has_bias, module.group)
            linear.weight = weight
            if has_bias:
                linear.bias = module.bias.astype(mx.float32)
            replacements.append((path, linear))
            counts["dequantized_linear"] += 1
        elif type(module) is nn.QuantizedEmbedding and module.mode == "affine":
            weight = _dequantized(module)
            embedding = nn.Embedding(int(weight.shape[0]), int(weight.shape[1]))
            embedding.weight = weight
            replacements.append((path, embedding))
            counts["dequantized_embedding"] += 1
    if replacements:
        model.update_modules(tree_unflatten(replacements))

    def cast(path: str, a: mx.array) -> mx.array:
        if a.dtype in (mx.float16, mx.bfloat16) and (only is None or only(path)):
            counts["cast"] += 1
            return a.astype(mx.float32)
        return a

    model.update(tree_map_with_path(cast, model.parameters()))
    mx.eval([v for k, v in tree_flatten(model.parameters()) if only is None or only(k)])
    return counts
