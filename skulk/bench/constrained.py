"""Constrained-decoding benchmark: ``python -m skulk.bench constrained``.

Prints, for the embedded presets (or ``--model PATH``):

1. aggregate decode tokens/s of 8 concurrent ``json_schema``-constrained chat
   streams against 8 plain chat streams on one real runner subprocess
   (continuous batching, one mask row per stream), alternating rounds, with
   the loss (target: under 15%), and tokens per CPU-second of the runner
   (the cost, which a busy machine disturbs less than the wall clock). The schema (an array of at least 10,000
   strings) cannot complete within ``max_tokens``, so every constrained
   stream runs its full length and masks every token;
2. the grammar library's mask cost per token on the model's vocabulary
   (llguidance, which Skulk uses) and, when importable, outlines-core's, for
   comparison (``--tokenizer tokenizer.json`` adds another vocabulary, such
   as a 49K-token one).

Every figure comes from one run, side by side; nothing is asserted. A quick
run (``--quick``) takes about a minute on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId, TaskId
from skulk.core.instances import PipelineShardMetadata, RunnerReady, RunnerSpec
from skulk.core.tasks import ChatMessage, GenerationParams, ResponseFormat, Task

__all__ = ["main", "LONG_SCHEMA", "mask_cost"]

STREAMS = 8
LONG_SCHEMA: dict[str, Any] = {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 10_000}
# The mask-cost document: a realistic tool-call-sized object.
_DOC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "maxLength": 64},
        "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "details": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    },
    "required": ["location", "units", "days", "details"],
    "additionalProperties": False,
}
_DOC = {"location": "Paris, France", "units": "celsius", "days": 3, "details": ["wind", "rain", "humidity"]}


def _task(task_id: str, constrained: bool, max_tokens: int, i: int) -> Task:
    fmt = ResponseFormat(type="json_schema", schema=json.dumps(LONG_SCHEMA)) if constrained else ResponseFormat()
    return Task(
        task_id=TaskId(task_id),
        command_id=CommandId(f"cmd-{task_id}"),
        origin=NodeId("bench"),
        instance_id=InstanceId("bench"),
        model_id=ModelId("bench"),
        kind="chat",
        params=GenerationParams(
            messages=(ChatMessage(role="user", content=f"Request {i}: list the foxes you saw today."),),
            max_tokens=max_tokens,
            temperature=0.0,
            response_format=fmt,
        ),
    )


def _spawn(path: Path, n_layers: int) -> Any:
    from skulk.engine.client import RunnerProcess

    spec = RunnerSpec(
        instance_id=InstanceId("bench-constrained"),
        runner_id=RunnerId("bench-runner"),
        node_id=NodeId("bench"),
        model_id=ModelId("bench"),
        shard=PipelineShardMetadata(model_id=ModelId("bench"), device_rank=0, world_size=1, start_layer=0, end_layer=n_layers, n_layers=n_layers),
        context_ceiling=8192,
        max_concurrent_requests=STREAMS,
    )
    runner = RunnerProcess.spawn(spec, path, stderr=subprocess.DEVNULL)
    runner.wait_for_status(RunnerReady, 180)
    return runner


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by process ``pid`` (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _round(runner: Any, constrained: bool, max_tokens: int, tag: str) -> tuple[float, int, float]:
    """(aggregate tokens/s, tokens, tokens per runner CPU-second) of ``STREAMS`` concurrent streams."""
    tasks = [_task(f"{tag}-{i}", constrained, max_tokens, i) for i in range(STREAMS)]
    cpu0 = _cpu_s(runner.pid)
    started = time.perf_counter()
    for task in tasks:
        runner.submit(task)
    done = runner.collect([t.task_id for t in tasks], timeout=900)
    elapsed = time.perf_counter() - started
    tokens = 0
    for task in tasks:
        final = done[task.task_id][-1]
        assert final.error is None and final.usage is not None, final
        tokens += final.usage.completion_tokens
    cpu = _cpu_s(runner.pid) - cpu0
    return tokens / elapsed, tokens, (tokens / cpu if cpu > 0 else 0.0)


def bench_streams(path: Path, n_layers: int, rounds: int, max_tokens: int) -> dict[str, float]:
    runner = _spawn(path, n_layers)
    try:
        _round(runner, True, 8, "warm-c")  # builds the grammar vocabulary once, as a first request would
        _round(runner, False, 8, "warm-p")
        plain, constrained, plain_cpu, constrained_cpu = [], [], [], []
        for r in range(rounds):
            tps, _, per_cpu = _round(runner, False, max_tokens, f"p{r}")
            plain.append(tps)
            plain_cpu.append(per_cpu)
            tps, _, per_cpu = _round(runner, True, max_tokens, f"c{r}")
            constrained.append(tps)
            constrained_cpu.append(per_cpu)
    finally:
        runner.kill()
    p, c = statistics.median(plain), statistics.median(constrained)
    pc, cc = statistics.median(plain_cpu), statistics.median(constrained_cpu)
    return {"plain_tps": p, "constrained_tps": c, "loss": 1.0 - c / p,
            "plain_per_cpu_s": pc, "constrained_per_cpu_s": cc, "cpu_loss": 1.0 - cc / pc if pc else 0.0}


def mask_cost(tokenizer_json: str, eos: list[int]) -> dict[str, float]:
    """Median and p95 microseconds per mask along a document's tokens, per library."""
    import llguidance
    import llguidance.numpy as lln
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tokenizer_json).encode(json.dumps(_DOC, separators=(", ", ": "))).ids
    tok = llguidance.LLTokenizer(tokenizer_json, eos_token=eos)
    from skulk.engine.grammar import json_schema_grammar

    matcher = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_lark(json_schema_grammar(_DOC_SCHEMA)))
    mask = lln.allocate_token_bitmask(1, tok.vocab_size)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        lln.fill_next_token_bitmask(matcher, mask, 0)
        times.append(time.perf_counter() - t0)
        if not matcher.consume_token(t):
            break  # the document's tokenisation left the grammar's path; the masks so far still count
    out = {"vocab": float(tok.vocab_size), "llguidance_us_median": statistics.median(times) * 1e6,
           "llguidance_us_p95": sorted(times)[int(len(times) * 0.95)] * 1e6}
    try:
        import numpy as np
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return out
    vocab: dict[str, list[int]] = {}
    for text, i in Tokenizer.from_str(tokenizer_json).get_vocab().items():
        if i not in eos:
            vocab.setdefault(text, []).append(i)
    t0 = time.perf_counter()
    index = outlines_core.Index(build_regex_from_schema(json.dumps(_DOC_SCHEMA)), outlines_core.Vocabulary(eos[0], vocab))
    out["outlines_core_compile_s"] = time.perf_counter() - t0
    guide = outlines_core.Guide(index)
    bits = np.full((1, (int(out["vocab"]) + 31) // 32), -1, dtype=np.int32)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        guide.write_mask_into(bits.ctypes.data, bits.size, bits.itemsize)
        times.append(time.perf_counter() - t0)
        try:
            guide.advance(t)
        except Exception:  # noqa: BLE001 - a path outlines' regex does not take
            break
    out["outlines_core_us_median"] = statistics.median(times) * 1e6
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m skulk.bench constrained", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, fewer rounds and tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", action="append", default=[], help="an mlx-lm model directory (repeatable)")
    parser.add_argument("--tokenizer", action="append", default=[], help="a tokenizer.json for the mask-cost table (repeatable)")
    args = parser.parse_args(argv)

    from skulk.engine.models import DEFAULT_MODEL_ID, SMALL_MODEL_ID, ensure_model

    paths = [Path(p) for p in args.model] or [ensure_model(DEFAULT_MODEL_ID)] + ([] if args.quick else [ensure_model(SMALL_MODEL_ID)])
    rounds, max_tokens = (2, 64) if args.quick else (args.rounds, args.max_tokens)
    print(f"# {STREAMS} json_schema-constrained streams vs {STREAMS} plain streams, {max_tokens} tokens each, median of {rounds} rounds")
    for path in paths:
        config = json.loads((path / "config.json").read_text())
        n_layers = int(config.get("num_hidden_layers") or config["n_layers"])
        r = bench_streams(path, n_layers, rounds, max_tokens)
        print(f"{path.name:>24}: plain {r['plain_tps']:8.1f} tok/s   constrained {r['constrained_tps']:8.1f} tok/s   "
              f"loss {100 * r['loss']:5.1f}% (target < 15%)")
        print(f"{'':>24}  per runner CPU-second: plain {r['plain_per_cpu_s']:8.1f} tok   constrained "
              f"{r['constrained_per_cpu_s']:8.1f} tok   loss {100 * r['cpu_loss']:5.1f}% (less sensitive to a busy machine)")
    print("# mask cost per token (microseconds), along a tool-call-sized JSON document")
    tokenizers = [(p / "tokenizer.json", json.loads((p / "config.json").read_text()).get("eos_token_id")) for p in paths]
    tokenizers += [(Path(t), None) for t in args.tokenizer]
    for path, eos in tokenizers:
        eos_ids = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [0]
        cost = mask_cost(path.read_text(), [int(e) for e in eos_ids])
        print(f"{str(path)[-48:]:>48}: " + ", ".join(f"{k} {v:.1f}" if "vocab" not in k else f"vocab {int(v)}" for k, v in cost.items()))


if __name__ == "__main__":
    main()
