"""Measurements of one process's BLAS, for the benchmark and the tests.

Run as ``python -m skulk.engine.accel.probe '<json request>'``: the process
first calls ``enable_fast_blas()`` (so ``SKULK_FAST_BLAS`` in its environment
picks the BLAS), then runs what the request asks and prints one JSON object on
stdout. Fast BLAS must be chosen before ``import mlx.core``, so every
with/without comparison runs two such processes side by side.

Request keys (all optional):

- ``matmul_sizes``: square f32 sizes to time, reported as ``gflops`` per size
  (and ``numpy_gflops``, the same product in numpy, for a ceiling);
- ``matmul_check``: when true, report ``matmul_errors``, the max relative
  error of mlx f32/f64 matmuls against numpy float64 on awkward shapes;
- ``model``: a qwen2 config overlay for ``build_qwen2`` plus ``seed``;
- ``greedy``: ``{"prompt_tokens": P, "steps": N}``: report ``tokens`` (greedy)
  and ``first_logits`` (the prefill's last-position logits, first 64);
- ``prefill``: ``{"prompt_tokens": P, "runs": R}``: report ``prefill_tps``
  (best of R) and ``decode_tps`` over ``decode_steps`` steps.

The reply always holds ``status`` (the BlasStatus as a dict) and
``shim_calls`` (gemm calls the shim forwarded, 0 when inactive).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from skulk.engine.accel.route import enable_fast_blas, fast_blas_calls

__all__ = ["QWEN2_10M", "QWEN2_TINY", "build_qwen2", "run_request"]

# A ~10M-parameter qwen2 (tied embeddings): 8192*256 + 8 * ~984k.
QWEN2_10M: dict[str, Any] = {
    "model_type": "qwen2",
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "intermediate_size": 1024,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": 8192,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
# Small enough for tests (~0.23M parameters), wide enough that its matmuls
# are real gemms with k > 1. An untied head keeps random-weight greedy output
# varied instead of repeating one token, so a token comparison means something.
QWEN2_TINY: dict[str, Any] = {
    **QWEN2_10M,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 192,
    "vocab_size": 1024,
    "tie_word_embeddings": False,
}


def build_qwen2(config: dict[str, Any], seed: int) -> tuple[Any, int]:
    """A randomly initialised mlx-lm qwen2 model and its parameter count.

    The same (config, seed) yields the same weights in any process: mlx's
    generator is seeded before construction and initialisation uses no BLAS.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.eval()
    mx.eval(model.parameters())
    params = sum(int(v.size) for _, v in tree_flatten(model.parameters()))
    assert params > 0
    return model, params


def _prompt(vocab: int, length: int, seed: int) -> list[int]:
    """A deterministic pseudo-random prompt (no BLAS, no mlx RNG state)."""
    assert 0 < length and 1 < vocab
    state, out = seed * 2654435761 + 12345, []
    for _ in range(length):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append(int(state >> 33) % vocab)
    return out


def _greedy(model: Any, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[:, -1, :]
    first = [float(x) for x in logits[0, :64].tolist()]
    tokens: list[int] = []
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1)
        tokens.append(int(token.item()))
        logits = model(token[:, None], cache=cache)[:, -1, :]
    return tokens, first


def _time_prefill(model: Any, prompt: list[int], runs: int, decode_steps: int) -> tuple[float, float]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    best_s = float("inf")
    for run in range(runs + 1):  # run 0 warms up (allocations, kernels)
        cache = make_prompt_cache(model)
        start = time.perf_counter()
        logits = model(mx.array([prompt]), cache=cache)
        mx.eval(logits)
        if run > 0:
            best_s = min(best_s, time.perf_counter() - start)
    token = mx.argmax(logits[:, -1, :], axis=-1)
    start = time.perf_counter()
    for _ in range(decode_steps):
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(token)
    decode_s = time.perf_counter() - start
    return len(prompt) / best_s, (decode_steps / decode_s if decode_steps else 0.0)


def _matmul_gflops(size: int) -> float:
    import mlx.core as mx

    a = mx.random.normal((size, size), key=mx.random.key(1))
    b = mx.random.normal((size, size), key=mx.random.key(2))
    mx.eval(a, b)
    mx.eval(a @ b)
    repeats, elapsed = 0, 0.0
    # At least 3 products and at least 0.3 s, so tiny sizes are not noise.
    while repeats < 3 or elapsed < 0.3:
        start = time.perf_counter()
        mx.eval(a @ b)
        elapsed += time.perf_counter() - start
        repeats += 1
    return 2.0 * size**3 * repeats / elapsed / 1e9


def _numpy_gflops(size: int) -> float:
    """The same product in numpy (its own OpenBLAS): the machine's ceiling."""
    import numpy as np

    rng = np.random.default_rng(1)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b
    repeats, elapsed = 0, 0.0
    while repeats < 3 or elapsed < 0.3:
        start = time.perf_counter()
        a @ b
        elapsed += time.perf_counter() - start
        repeats += 1
    return 2.0 * size**3 * repeats / elapsed / 1e9


def _matmul_errors() -> dict[str, float]:
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(11)
    cases = {
        "square_f32": (rng.standard_normal((128, 128)), rng.standard_normal((128, 128)), mx.float32),
        "tall_f32": (rng.standard_normal((300, 70)), rng.standard_normal((70, 5)), mx.float32),
        "transposed_f32": (rng.standard_normal((90, 40)).T, rng.standard_normal((90, 33)), mx.float32),
        "batched_f32": (rng.standard_normal((4, 16, 48)), rng.standard_normal((4, 48, 24)), mx.float32),
        "row_f32": (rng.standard_normal((1, 256)), rng.standard_normal((256, 512)), mx.float32),
        "square_f64": (rng.standard_normal((64, 64)), rng.standard_normal((64, 64)), mx.float64),
    }
    errors: dict[str, float] = {}
    for name, (a, b, dtype) in cases.items():
        want = a @ b
        got = np.array(mx.matmul(mx.array(a, dtype=dtype), mx.array(b, dtype=dtype), stream=mx.cpu))
        errors[name] = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
    return errors


def run_request(request: dict[str, Any]) -> dict[str, Any]:
    """Enable fast BLAS (per the environment), then measure what is asked."""
    status = enable_fast_blas()
    reply: dict[str, Any] = {
        "status": {
            "active": status.active,
            "backend": status.backend,
            "reason": status.reason,
            "threads": status.threads,
        }
    }
    if request.get("matmul_sizes"):
        reply["gflops"] = {str(n): _matmul_gflops(int(n)) for n in request["matmul_sizes"]}
        reply["numpy_gflops"] = {str(n): _numpy_gflops(int(n)) for n in request["matmul_sizes"]}
    if request.get("matmul_check"):
        reply["matmul_errors"] = _matmul_errors()
    if "model" in request:
        spec = dict(request["model"])
        seed = int(spec.pop("seed", 0))
        model, params = build_qwen2({**QWEN2_10M, **spec}, seed)
        reply["params"] = params
        vocab = int(model.args.vocab_size)
        if "greedy" in request:
            g = request["greedy"]
            prompt = _prompt(vocab, int(g["prompt_tokens"]), seed)
            reply["tokens"], reply["first_logits"] = _greedy(model, prompt, int(g["steps"]))
        if "prefill" in request:
            p = request["prefill"]
            prompt = _prompt(vocab, int(p["prompt_tokens"]), seed + 1)
            reply["prefill_tps"], reply["decode_tps"] = _time_prefill(
                model, prompt, int(p.get("runs", 3)), int(p.get("decode_steps", 0))
            )
    reply["shim_calls"] = fast_blas_calls()
    return reply


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m skulk.engine.accel.probe '<json request>'", file=sys.stderr)
        return 2
    print(json.dumps(run_request(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
