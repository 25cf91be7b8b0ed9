"""Benchmark: MLX with its bundled reference BLAS vs Skulk's fast BLAS.

Usage::

    python -m skulk.bench blas [--sizes 256,512,1024] [--prompt-tokens 256]
                               [--runs 3] [--decode-steps 64] [--rounds 1]

Each configuration runs in its own subprocess, ``skulk.engine.accel.probe``
(the BLAS must be chosen before ``import mlx.core``): one with
``SKULK_FAST_BLAS=0`` and one with fast BLAS enabled, one after the other,
repeated ``--rounds`` times keeping each figure's best (other load on the
machine only ever slows a run down). It prints f32 matmul GFLOP/s at each
size, prefill and decode tokens/s of a ~10M parameter qwen2 model (random
weights), whether greedy tokens agree, and the fast/reference ratio of each
figure, with numpy's own f32 matmul speed as the machine's ceiling. Nothing is
asserted: figures are for people and for docs/engine-blas.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from skulk.engine.accel.probe import QWEN2_10M

__all__ = ["main", "run_side_by_side"]

_PROBE_TIMEOUT_S = 900.0


def _probe(request: dict[str, Any], fast: bool) -> dict[str, Any]:
    env = dict(os.environ)
    if fast:
        # Keep a backend the user insisted on; otherwise pick automatically.
        if env.get("SKULK_FAST_BLAS", "").strip().lower() in {"", "0", "off", "false", "no"}:
            env["SKULK_FAST_BLAS"] = "auto"
    else:
        env["SKULK_FAST_BLAS"] = "0"
    done = subprocess.run(
        [sys.executable, "-m", "skulk.engine.accel.probe", json.dumps(request)],
        env=env,
        capture_output=True,
        text=True,
        timeout=_PROBE_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"probe ({'fast' if fast else 'reference'}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _best(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Merge two replies of one configuration keeping every figure's maximum."""
    if a is None:
        return b
    merged = dict(b)
    for table in ("gflops", "numpy_gflops"):
        merged[table] = {k: max(a[table][k], b[table][k]) for k in b[table]}
    merged["prefill_tps"] = max(a["prefill_tps"], b["prefill_tps"])
    merged["decode_tps"] = max(a["decode_tps"], b["decode_tps"])
    return merged


def run_side_by_side(
    sizes: list[int], prompt_tokens: int, runs: int, decode_steps: int, rounds: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the reference and the fast probe ``rounds`` times each; best figures."""
    assert sizes and prompt_tokens > 0 and runs > 0 and rounds > 0
    request = {
        "matmul_sizes": sizes,
        "model": {**QWEN2_10M, "seed": 0},
        "greedy": {"prompt_tokens": 64, "steps": 32},
        "prefill": {"prompt_tokens": prompt_tokens, "runs": runs, "decode_steps": decode_steps},
    }
    reference: dict[str, Any] | None = None
    fast: dict[str, Any] | None = None
    for _ in range(rounds):
        reference = _best(reference, _probe(request, fast=False))
        fast = _best(fast, _probe(request, fast=True))
    assert reference is not None and fast is not None
    return reference, fast


def _row(label: str, ref: float, fast: float, unit: str, ceiling: float | None = None) -> str:
    ratio = f"{fast / ref:8.1f}x" if ref > 0 else "      n/a"
    tail = f"{ceiling:>12.1f}" if ceiling is not None else ""
    return f"{label:<34}{ref:>12.1f}{fast:>12.1f}  {unit:<9}{ratio}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skulk.bench blas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512,1024", help="square f32 matmul sizes, comma-separated")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prefill prompt length (tokens)")
    parser.add_argument("--runs", type=int, default=3, help="timed prefills per process (best kept)")
    parser.add_argument("--decode-steps", type=int, default=64, help="greedy decode steps timed after prefill")
    parser.add_argument("--rounds", type=int, default=1, help="reference/fast process pairs (best kept)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    reference, fast = run_side_by_side(sizes, args.prompt_tokens, args.runs, args.decode_steps, args.rounds)
    status = fast["status"]
    print(f"reference: {reference['status']['reason']}")
    print(f"fast:      {status['backend']} active={status['active']}: {status['reason']}")
    if not status["active"]:
        print("fast BLAS is not active here; the two columns measure the same BLAS")
    print(f"model: qwen2, {fast['params'] / 1e6:.1f}M parameters, float32, random weights")
    print()
    print(f"{'':<34}{'reference':>12}{'fast':>12}  {'unit':<9}{'ratio':>9}{'numpy':>12}")
    for size in sizes:
        key = str(size)
        ceiling = max(reference["numpy_gflops"][key], fast["numpy_gflops"][key])
        print(_row(f"matmul f32 {size}x{size}", reference["gflops"][key], fast["gflops"][key], "GFLOP/s", ceiling))
    print(_row(f"prefill ({args.prompt_tokens}-token prompt)", reference["prefill_tps"], fast["prefill_tps"], "tok/s"))
    print(_row(f"decode ({args.decode_steps} steps)", reference["decode_tps"], fast["decode_tps"], "tok/s"))
    same = reference["tokens"] == fast["tokens"]
    drift = max(abs(a - b) for a, b in zip(reference["first_logits"], fast["first_logits"]))
    print()
    print(f"greedy tokens (32 after a 64-token prompt) identical: {'yes' if same else 'NO'}; "
          f"max |logit difference| {drift:.2e}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
