"""llama.cpp on a GGUF file, measured the way ``skulk.bench.real`` measures Skulk: a subprocess worker.

Run as ``python -m skulk.bench.llamacpp --gguf FILE --prompts-json FILE --tokens N --streams 1,8
--threads T``; prints one JSON object on stdout. Needs ``llama-cpp-python``, which is never a runtime
dependency: ``pip install -e '.[bench]'`` builds it from source (about 6 minutes on 2 cores;
``CMAKE_ARGS=-DGGML_NATIVE=ON`` for this CPU's instructions).

Theory of operation
-------------------
One stream is the binding's ``Llama.create_completion`` streaming greedily:
time to first token, then decode tokens/s over the tokens after the first
(as the runner counts them). Several streams use llama.cpp's own batched
decoding through the low-level API, the way ``llama-server -np N`` serves N
requests that arrive together: one context with N sequences, every prompt
prefilled in one batch, then one ``llama_decode`` per step with one token per
live sequence, greedy (argmax) on each sequence's logits. End-of-sequence is
ignored (its logit masked), so every engine generates the same count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _single(llm: Any, prompt: str, n_tokens: int, eos: int) -> dict[str, float]:
    started = time.perf_counter()
    times: list[float] = []
    for _ in llm.create_completion(prompt, max_tokens=n_tokens, temperature=0.0, stream=True,
                                   logit_bias={eos: -1e9}):  # fmt: skip
        times.append(time.perf_counter())
    prompt_tokens = len(llm.tokenize(prompt.encode(), add_bos=False, special=False))
    ttft = times[0] - started
    return {
        "ttft_s": ttft,
        "prompt_tokens": prompt_tokens,
        "prefill_tps": prompt_tokens / ttft,
        "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
        "tokens": len(times),
    }


def _batched_greedy(llm: Any, prompts: list[str], n_tokens: int, eos: int) -> dict[str, Any]:
    """N sequences decoded together in one context (llama-server's continuous batching, all arriving at once)."""
    import llama_cpp
    import numpy as np

    vocab = llm.n_vocab()
    seqs = [llm.tokenize(p.encode(), add_bos=False, special=False) for p in prompts]
    n = len(seqs)
    batch_cap = int(llm.n_batch)
    # A context with one sequence per stream and a unified KV buffer, as llama-server -np N makes.
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = sum(len(s) for s in seqs) + n * (n_tokens + 8)
    params.n_batch = params.n_ubatch = batch_cap
    params.n_seq_max = n
    params.n_threads = params.n_threads_batch = llm.n_threads
    params.kv_unified = True
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    assert ctx is not None, "llama.cpp could not create a batched context"
    batch = llama_cpp.llama_batch_init(max(batch_cap, n), 0, n)
    try:

        def decode(items: list[tuple[int, int, int, bool]]) -> None:
            batch.n_tokens = len(items)
            for i, (tok, pos, seq, want) in enumerate(items):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if want else 0
            rc = llama_cpp.llama_decode(ctx, batch)
            assert rc == 0, f"llama_decode returned {rc}"

        def pick(index: int) -> int:
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(vocab,)).copy()
            row[eos] = -np.inf
            return int(row.argmax())

        started = time.perf_counter()
        items = [(t, p, s, p == len(toks) - 1) for s, toks in enumerate(seqs) for p, t in enumerate(toks)]
        nxt: dict[int, int] = {}
        for lo in range(0, len(items), batch_cap):
            chunk = items[lo : lo + batch_cap]
            decode(chunk)
            for j, (_, _, seq, want) in enumerate(chunk):
                if want:
                    nxt[seq] = pick(j)
        first_token_s = time.perf_counter() - started
        out = {s: [nxt[s]] for s in range(n)}
        positions = {s: len(seqs[s]) for s in range(n)}
        step_started = time.perf_counter()
        for _ in range(n_tokens - 1):
            decode([(out[s][-1], positions[s], s, True) for s in range(n)])
            for s in range(n):
                positions[s] += 1
                out[s].append(pick(s))
        decode_s = time.perf_counter() - step_started
        total_s = time.perf_counter() - started
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    tokens = sum(len(v) for v in out.values())
    prompt_tokens = sum(len(s) for s in seqs)
    return {
        "ttft_s": first_token_s,  # every stream's first token comes from the one batched prefill
        "prompt_tokens": prompt_tokens,
        "prefill_tps": prompt_tokens / first_token_s,
        "decode_tps_per_stream": (n_tokens - 1) / decode_s,
        "aggregate_tps": tokens / total_s,
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skulk.bench.llamacpp", description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--prompts-json", required=True, help="a JSON list of prompts (stream i uses prompt i)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: every CPU)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print(json.dumps({"error": "llama-cpp-python is not installed (pip install -e '.[bench]' builds it)"}))
        return 0
    import os

    prompts = json.loads(Path(args.prompts_json).read_text())
    streams = [int(s) for s in args.streams.split(",") if s]
    threads = args.threads or len(os.sched_getaffinity(0))
    longest = max(len(p) for p in prompts)
    llm = llama_cpp.Llama(
        model_path=args.gguf, n_ctx=4 * longest + args.tokens + 256, n_batch=512, n_threads=threads,
        n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    eos = int(llm.token_eos())
    _single(llm, prompts[0], 8, eos)  # warm up
    result: dict[str, Any] = {"version": llama_cpp.__version__, "threads": threads, "rows": {}}
    for n in streams:
        rounds = []
        for _ in range(args.rounds):
            if n == 1:
                llm.reset()
                rounds.append(_single(llm, prompts[0], args.tokens, eos))
            else:
                rounds.append(_batched_greedy(llm, prompts[:n], args.tokens, eos))
        result["rows"][str(n)] = rounds
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
