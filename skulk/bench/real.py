"""The real default model in ``python -m skulk.bench engine``: sections ``real`` and ``profile``.

``real``: SmolLM2-135M-Instruct, as every engine would run it on this
machine, measured in one run:

- the Skulk runner (a real runner subprocess over the IPC protocol) on the
  imported directory, computing in the CPU serving format
  (``skulk.engine.weights``: float32 on CPU);
- plain mlx-lm on the same directory, as stored (``stream_generate``, the
  loop behind ``mlx_lm.generate``, for one stream; its ``BatchGenerator``,
  the engine behind ``mlx_lm.batch_generate`` and ``mlx_lm.server``, for
  several);
- llama.cpp on the very GGUF file the directory was imported from
  (``skulk.bench.llamacpp`` in a subprocess; needs the ``bench`` extra).

For 1 and 8 streams (all submitted at once, distinct prompts of the same
length, greedy, the same number of tokens each): time to first token, prefill
tokens/s, decode tokens/s per stream and aggregate tokens/s, then the ratios
the issue states targets for (Skulk / mlx-lm decode at one stream >= 1.0;
Skulk / llama.cpp, stretch 0.5).

``profile``: where a decode step's time goes, per layer and per op, on the
real model in each serving format: every module of one layer timed with an
evaluation after it (so the parts add up to more than a step: each sync costs
a little), the output head, and a whole step for comparison.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from skulk.bench.engine import Run, _spawn_runner, _task, section
from skulk.engine.models import DEFAULT_MODEL_ID, ensure_model, packaged_file

__all__ = ["real_prompts"]

_TEXT = (
    "The river runs north through the valley, past the old mill, under the stone bridge and into the lake. "
    "In the morning the market opens, the baker lights the oven, and the smell of fresh bread fills the street. "
)


def real_prompts(tokenizer: Any, n: int, length: int) -> list[str]:
    """``n`` distinct prompts of exactly ``length`` tokens each (by ``tokenizer``)."""
    out = []
    for i in range(n):
        text = f"Story {i + 1}. "
        while len(tokenizer.encode(text)) < length + 8:
            text += _TEXT
        out.append(tokenizer.decode(tokenizer.encode(text)[:length]))
    return out


# --- the Skulk runner ----------------------------------------------------------------------


def _runner_streams(runner: Any, prompts: list[str], n_tokens: int, tag: str) -> dict[str, float]:
    """Submit every prompt at once; per-task first-token and last-token times from the event pipe."""
    from skulk.engine.protocol import Chunk

    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    started = time.perf_counter()
    for task_id, prompt in zip(ids, prompts):
        runner.submit(_task(task_id, prompt=prompt, max_tokens=n_tokens, temperature=0.0))
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {t: 0 for t in ids}
    finished: set[str] = set()
    prompt_tokens = 0
    while len(finished) < len(ids):
        msg = runner.recv(timeout=600)
        assert msg is not None, "the runner went quiet"
        if not isinstance(msg, Chunk) or msg.chunk.task_id not in counts:
            continue
        c = msg.chunk
        now = time.perf_counter()
        assert c.error is None, c.error
        if c.token_ids:
            first.setdefault(c.task_id, now)
            last[c.task_id] = now
            counts[c.task_id] += len(c.token_ids)
        if c.finish_reason is not None:
            finished.add(c.task_id)
            assert c.usage is not None
            prompt_tokens += c.usage.prompt_tokens
    end = max(last.values())
    ttfts = [first[t] - started for t in ids]
    return {
        "ttft_s": statistics.median(ttfts),
        "prompt_tokens": prompt_tokens,
        "prefill_tps": prompt_tokens / max(ttfts),
        "decode_tps_per_stream": statistics.median((counts[t] - 1) / (last[t] - first[t]) for t in ids),
        "aggregate_tps": sum(counts.values()) / (end - started),
        "tokens": sum(counts.values()),
    }


# --- plain mlx-lm --------------------------------------------------------------------------


def _mlx_single(model: Any, tokenizer: Any, prompt: str, n_tokens: int) -> dict[str, float]:
    from mlx_lm import stream_generate

    started = time.perf_counter()
    times = []
    response = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=n_tokens):
        times.append(time.perf_counter())
    assert response is not None
    ttft = times[0] - started
    return {
        "ttft_s": ttft,
        "prompt_tokens": response.prompt_tokens,
        "prefill_tps": response.prompt_tokens / ttft,
        "decode_tps_per_stream": (len(times) - 1) / (times[-1] - times[0]),
        "aggregate_tps": len(times) / (times[-1] - started),
        "tokens": len(times),
    }


def _mlx_batched(model: Any, tokenizer: Any, prompts: list[str], n_tokens: int) -> dict[str, float]:
    from mlx_lm.generate import BatchGenerator

    ids = [tokenizer.encode(p) for p in prompts]
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids])
    started = time.perf_counter()
    uids = gen.insert(ids, [n_tokens] * len(ids))
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    counts = {u: 0 for u in uids}
    while responses := gen.next_generated():
        now = time.perf_counter()
        for r in responses:
            if r.finish_reason != "stop":
                first.setdefault(r.uid, now)
                last[r.uid] = now
                counts[r.uid] += 1
    gen.close()
    ttfts = [first[u] - started for u in uids]
    return {
        "ttft_s": statistics.median(ttfts),
        "prompt_tokens": sum(len(i) for i in ids),
        "prefill_tps": sum(len(i) for i in ids) / max(ttfts),
        "decode_tps_per_stream": statistics.median((counts[u] - 1) / (last[u] - first[u]) for u in uids),
        "aggregate_tps": sum(counts.values()) / (max(last.values()) - started),
        "tokens": sum(counts.values()),
    }


# --- llama.cpp -----------------------------------------------------------------------------


def _llamacpp(gguf: Path, prompts: list[str], n_tokens: int, streams: list[int], rounds: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "skulk.bench.llamacpp", "--gguf", str(gguf), "--prompts-json", f.name,
             "--tokens", str(n_tokens), "--streams", ",".join(map(str, streams)), "--rounds", str(rounds)],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median_row(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def _real_flags(group: Any) -> None:
    group.add_argument("--real-model", default=DEFAULT_MODEL_ID, help="the packaged model to measure")
    group.add_argument("--real-streams", default="1,8", help="concurrent stream counts for the real model")
    group.add_argument("--real-prompt-tokens", type=int, default=0, help="prompt tokens per stream (default 128)")
    group.add_argument("--real-tokens", type=int, default=0, help="tokens generated per stream (default 128)")


@section("real", "the real default model: Skulk runner vs plain mlx-lm vs llama.cpp on the same GGUF", _real_flags)
def _real(run: Run) -> None:
    from mlx_lm import load as mlx_load

    args = run.args
    model_id = args.real_model
    streams = [int(s) for s in args.real_streams.split(",") if s]
    prompt_len = args.real_prompt_tokens or (64 if args.quick else 128)
    n_tokens = args.real_tokens or (64 if args.quick else 128)
    path = ensure_model(model_id)
    gguf = packaged_file(model_id)
    model, tokenizer = mlx_load(str(path))
    prompts = real_prompts(tokenizer, max(streams), prompt_len)
    print(f"Real model {model_id} (imported from {gguf.name}): {prompt_len}-token prompts, {n_tokens} tokens per "
          f"stream, greedy, all streams submitted at once; medians of {run.rounds} round(s)")  # fmt: skip
    results: dict[str, dict[int, dict[str, float]]] = {"skulk": {}, "mlx": {}, "llama": {}}
    runner = _spawn_runner(model_id, path, len(model.layers), max_concurrent=max(streams))
    try:
        _runner_streams(runner, prompts[:1], 8, "warm")
        _mlx_single(model, tokenizer, prompts[0], 8)
        for n in streams:
            sk, ml = [], []
            for r in range(run.rounds):
                sk.append(_runner_streams(runner, prompts[:n], n_tokens, f"real{n}-{r}"))
                ml.append(_mlx_single(model, tokenizer, prompts[0], n_tokens) if n == 1
                          else _mlx_batched(model, tokenizer, prompts[:n], n_tokens))  # fmt: skip
            results["skulk"][n], results["mlx"][n] = _median_row(sk), _median_row(ml)
        from skulk.bench.engine import _mib, _vm_hwm_bytes

        run.memory.append(f"  {model_id}: runner RSS high-water {_mib(_vm_hwm_bytes(runner.pid))}")
    finally:
        runner.shutdown()
    llama = _llamacpp(gguf, prompts, n_tokens, streams, run.rounds)
    if "error" in llama:
        print(f"  llama.cpp: not measured: {llama['error']}")
    else:
        for n in streams:
            rows = llama["rows"][str(n)]
            if n > 1:
                results["llama"][n] = _median_row(rows)
            else:
                results["llama"][n] = _median_row([{**r, "decode_tps_per_stream": r["decode_tps"],
                                                    "aggregate_tps": r["tokens"] / (r["ttft_s"] + (r["tokens"] - 1) / r["decode_tps"])}
                                                   for r in rows])  # fmt: skip
    names = {"skulk": "Skulk runner (float32 on CPU)", "mlx": "plain mlx-lm (same dir, as stored)",
             "llama": f"llama.cpp {llama.get('version', '')} (same GGUF, {llama.get('threads', '?')} threads)"}  # fmt: skip
    print(f"{'streams':>7}  {'engine':44} {'TTFT ms':>8} {'prefill tok/s':>14} {'decode tok/s/stream':>20} {'aggregate tok/s':>16}")
    for n in streams:
        for key in ("skulk", "mlx", "llama"):
            row = results[key].get(n)
            if row is None:
                continue
            print(f"{n:>7}  {names[key]:44} {row['ttft_s'] * 1000:>8.0f} {row['prefill_tps']:>14.1f} "
                  f"{row['decode_tps_per_stream']:>20.1f} {row['aggregate_tps']:>16.1f}")  # fmt: skip
    for n in streams:
        sk = results["skulk"][n]
        line = f"  {n} stream(s): Skulk / mlx-lm decode {sk['decode_tps_per_stream'] / results['mlx'][n]['decode_tps_per_stream']:.2f}x"
        line += f", aggregate {sk['aggregate_tps'] / results['mlx'][n]['aggregate_tps']:.2f}x"
        if n in results["llama"]:
            ll = results["llama"][n]
            line += (f"; Skulk / llama.cpp decode {sk['decode_tps_per_stream'] / ll['decode_tps_per_stream']:.2f}x, "
                     f"aggregate {sk['aggregate_tps'] / ll['aggregate_tps']:.2f}x, prefill {sk['prefill_tps'] / ll['prefill_tps']:.2f}x")  # fmt: skip
        print(line)
    print("  targets: Skulk / mlx-lm decode at 1 stream >= 1.0x; Skulk / llama.cpp as close as possible (stretch 0.5x)")
    print()


# --- profile -------------------------------------------------------------------------------


def _timed(fn: Any, reps: int) -> float:
    """Median seconds of ``fn()`` (which returns arrays to evaluate) over ``reps`` runs."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_decode(path: Path, fmt: str, context: int = 64, reps: int = 20) -> dict[str, float]:
    """Milliseconds per decode step spent in each part of the model, in serving format ``fmt``."""
    from mlx_lm.utils import load_model

    from skulk.engine.stages import make_layer_caches
    from skulk.engine.weights import prepare_weights

    model, _ = load_model(path)
    prepare_weights(model, fmt)
    cache = make_layer_caches(model)
    mx.eval(model(mx.array([list(range(100, 100 + context))]), cache=cache))
    inner = model.model
    n_layers = len(inner.layers)
    layer = inner.layers[n_layers // 2]
    # What the projections really see: a normed hidden state (norm weights set its dtype).
    x = layer.input_layernorm(inner.embed_tokens(mx.array([[42]])))
    mx.eval(x)
    attn, mlp = layer.self_attn, layer.mlp
    parts: dict[str, float] = {}
    heads_out = attn.q_proj(x)  # the attention output has the queries' width
    mx.eval(heads_out)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        mod = getattr(attn, name)
        inp = heads_out if name == "o_proj" else x
        parts[f"attention {name}"] = _timed(lambda mod=mod, inp=inp: mod(inp), reps) * n_layers
    h = mlp.gate_proj(x)
    mx.eval(h)
    for name, inp in (("gate_proj", x), ("up_proj", x), ("down_proj", h)):
        mod = getattr(mlp, name)
        parts[f"mlp {name}"] = _timed(lambda mod=mod, inp=inp: mod(inp), reps) * n_layers
    trial = [c for c in make_layer_caches(model)]
    for c, full in zip(trial, cache):
        c.state = full.state  # same context length, its own copy to append to
    parts["attention rope + sdpa + cache (whole block minus projections)"] = max(
        0.0, _timed(lambda: attn(x, None, trial[n_layers // 2]), reps) * n_layers
        - sum(v for k, v in parts.items() if k.startswith("attention ")))  # fmt: skip
    parts["mlp activation (whole MLP minus projections)"] = max(
        0.0, _timed(lambda: mlp(x), reps) * n_layers - sum(v for k, v in parts.items() if k.startswith("mlp ")))
    parts["norms (2 per layer)"] = _timed(lambda: layer.input_layernorm(x), reps) * 2 * n_layers
    parts["output head"] = _timed(lambda: model.model.embed_tokens.as_linear(inner.norm(x))
                                  if not hasattr(model, "lm_head") else model.lm_head(inner.norm(x)), reps)  # fmt: skip
    steps = []
    tok = mx.array([[42]])
    for _ in range(reps):
        t = time.perf_counter()
        out = model(tok, cache=cache)
        tok = mx.argmax(out[:, -1:], axis=-1)
        mx.eval(tok)
        steps.append(time.perf_counter() - t)
    parts["whole decode step"] = statistics.median(steps)
    return {k: v * 1000 for k, v in parts.items()}


@section("profile", "where a decode step's time goes on the real model, per layer and per op, by serving format")
def _profile(run: Run) -> None:
    path = ensure_model(run.args.real_model if hasattr(run.args, "real_model") else DEFAULT_MODEL_ID)
    reps = 10 if run.args.quick else 30
    print(f"Decode-step profile of {path.name} (ms per token, medians of {reps}; one module timed at a time, "
          "times the layer count)")  # fmt: skip
    formats = ("float32", "as-stored")
    prof = {fmt: profile_decode(path, fmt, reps=reps) for fmt in formats}
    print(f"{'part':66} " + " ".join(f"{f:>10}" for f in formats))
    for key in prof[formats[0]]:
        print(f"{key:66} " + " ".join(f"{prof[f][key]:>10.2f}" for f in formats))
    for fmt in formats:
        parts = sum(v for k, v in prof[fmt].items() if k != "whole decode step")
        print(f"  {fmt}: parts add up to {parts:.1f} ms, a whole step takes {prof[fmt]['whole decode step']:.1f} ms")
    print()
