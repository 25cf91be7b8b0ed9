"""Measuring speculation on this machine: decode throughput and forward-pass costs.

Shared by ``speculative`` (figures) and ``tune`` (best depth for a card). Every
measurement runs the real engine (``Engine`` for plain decoding,
``SpeculativeEngine`` for speculation) in this process on a world of one, and
configurations are *interleaved* (each repetition runs every configuration
once, in a rotated order), so slow drifts of a shared machine hit all of them
alike; figures are medians over runs.

Decode throughput is the engine's own ``generation_tps`` (first to last
token of a stream, prefill excluded). Both the median and the best run are
kept: on a shared machine other processes only ever slow a run down, so the
best run (like ``timeit``'s minimum) estimates the uncontended figure and the
median shows the spread. Forward-pass costs are likewise minima. CPU time
(``time.process_time``, all threads of this process) is measured too: it
does not count time spent waiting for a CPU that other processes hold, so on
a shared machine CPU-time ratios are the steadier figures (they do not credit
the plain engine for overlapping its bookkeeping with computation, which wall
time does).

The speed-up speculation should give follows from the acceptance and the cost
ratios (the standard analysis of Leviathan et al. 2023, with measured costs
instead of a constant ratio)::

    predicted = E * T_1 / (k * T_d + T_v(k + 1))

where ``E`` is the mean number of tokens a round commits (accepted drafts plus
the target's own token), ``T_1`` the target's one-token forward (a plain decode
step), ``T_d`` one draft step and ``T_v(n)`` the target's forward over ``n``
tokens (the verify pass). With i.i.d. per-token acceptance ``a``,
``E = (1 - a^(k+1)) / (1 - a)``.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from skulk.core.tasks import TokenChunk
from skulk.engine.batch import Engine, EngineConfig
from skulk.engine.speculative.engine import SpeculativeEngine, Speculator

__all__ = ["RunFigures", "ConfigFigures", "decode_figures", "concurrent_figures", "forward_costs", "predicted_speedup", "BENCH_PROMPTS"]

BENCH_PROMPTS = (
    "The weather today is cloudy with a chance of",
    "Once upon a time, a clever fox lived at the edge of",
    "def generate(prompt, max_tokens=16):",
    "The cluster joins several machines into one, and",
)

_counter = iter(range(10**9))


def _task(prompt: str, max_tokens: int, temperature: float, seed: int | None) -> Any:
    from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, TaskId
    from skulk.core.tasks import GenerationParams, Task

    n = next(_counter)
    return Task(
        task_id=TaskId(f"bench-{n}"),
        command_id=CommandId(f"bench-{n}"),
        origin=NodeId("bench"),
        instance_id=InstanceId("bench"),
        model_id=ModelId("bench"),
        kind="completion",
        params=GenerationParams(prompt=prompt, max_tokens=max_tokens, temperature=temperature, seed=seed),
    )


def _engine(loaded: Any, speculator: Speculator | None, sink: dict[str, list[TokenChunk]]) -> Engine:
    config = EngineConfig(context_ceiling=8192, max_concurrent=16)

    def emit(chunks: list[TokenChunk]) -> None:
        for c in chunks:
            sink[c.task_id].append(c)

    if speculator is None:
        return Engine(loaded.shard, loaded.tokenizer, config, emit)
    return SpeculativeEngine(loaded.shard, loaded.tokenizer, config, emit, speculator=speculator)


@dataclass
class RunFigures:
    """One stream: decode tokens/s, tokens, rounds and acceptance counters."""

    decode_tps: float
    tokens: int
    rounds: int
    drafted: int
    accepted: int
    cpu_s: float = 0.0  # process CPU time of the whole stream (prefill included)


@dataclass
class ConfigFigures:
    """Every run of one configuration."""

    name: str
    depth: int
    runs: list[RunFigures] = field(default_factory=list)

    @property
    def decode_tps(self) -> float:
        """Median over runs."""
        return statistics.median(r.decode_tps for r in self.runs)

    @property
    def best_tps(self) -> float:
        """Best run: contention from other processes only ever slows a run down."""
        return max(r.decode_tps for r in self.runs)

    @property
    def cpu_tps(self) -> float:
        """Median tokens per CPU-second: immune to waiting for a CPU other processes hold."""
        return statistics.median(r.tokens / r.cpu_s for r in self.runs)

    @property
    def acceptance(self) -> float:
        drafted = sum(r.drafted for r in self.runs)
        return sum(r.accepted for r in self.runs) / drafted if drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        rounds = sum(r.rounds for r in self.runs)
        # The first token of a stream comes from its (plain) join step.
        return sum(r.tokens - 1 for r in self.runs) / rounds if rounds else 1.0

    @property
    def drafted_per_round(self) -> float:
        rounds = sum(r.rounds for r in self.runs)
        return sum(r.drafted for r in self.runs) / rounds if rounds else 0.0


def _one_stream(loaded: Any, speculator: Speculator | None, prompt: str, tokens: int, temperature: float, seed: int) -> RunFigures:
    sink: dict[str, list[TokenChunk]] = defaultdict(list)
    engine = _engine(loaded, speculator, sink)
    task = _task(prompt, tokens, temperature, seed)
    cpu_started = time.process_time()
    engine.submit(task)
    engine.drain()
    cpu_s = time.process_time() - cpu_started
    final = sink[task.task_id][-1]
    assert final.finish_reason in ("length", "stop") and final.stats is not None, final
    rounds = drafted = accepted = 0
    if isinstance(engine, SpeculativeEngine):
        rounds = engine.spec_rounds
        drafted = engine.last_counters.drafted if engine.last_counters else 0
        accepted = engine.last_counters.accepted if engine.last_counters else 0
    return RunFigures(
        decode_tps=final.stats.generation_tps,
        tokens=final.stats.generation_tokens,
        rounds=rounds,
        drafted=drafted,
        accepted=accepted,
        cpu_s=cpu_s,
    )


def decode_figures(
    loaded: Any,
    configs: list[tuple[str, int, Speculator | None]],
    *,
    prompts: tuple[str, ...] = BENCH_PROMPTS,
    tokens: int = 96,
    repetitions: int = 3,
    temperature: float = 0.0,
    warmup: bool = True,
) -> list[ConfigFigures]:
    """Single-stream decode figures for ``configs`` (name, depth, speculator or None).

    Runs ``repetitions x len(prompts)`` streams per configuration, interleaved
    and rotated. Streams that stop early (EOS) still count their tokens.
    """
    results = [ConfigFigures(name=name, depth=depth) for name, depth, _ in configs]
    if warmup:
        for _, _, spec in configs:
            _one_stream(loaded, spec, prompts[0], 8, temperature, 0)
    order = list(range(len(configs)))
    for rep in range(repetitions):
        for p, prompt in enumerate(prompts):
            shift = (rep * len(prompts) + p) % len(order)
            for i in order[shift:] + order[:shift]:
                _, _, spec = configs[i]
                results[i].runs.append(_one_stream(loaded, spec, prompt, tokens, temperature, seed=1000 * rep + p))
    return results


def concurrent_figures(
    loaded: Any,
    configs: list[tuple[str, Speculator | None]],
    *,
    streams: int = 8,
    tokens: int = 64,
    staggered: bool = False,
    repetitions: int = 2,
) -> dict[str, tuple[float, float]]:
    """Aggregate tokens/s (median, best, per CPU-second) with ``streams`` concurrent greedy streams.

    ``staggered``: stream i asks for ``tokens * (i + 1) / streams`` tokens, so
    the batch shrinks over time and the last stream runs alone for a while.
    Wall time from submission to the last token, over ``repetitions`` runs.
    """
    out: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for rep in range(repetitions):  # alternate the order: neither goes first every time
        for name, spec in configs if rep % 2 == 0 else list(reversed(configs)):
            sink: dict[str, list[TokenChunk]] = defaultdict(list)
            engine = _engine(loaded, spec, sink)
            tasks = []
            for i in range(streams):
                n = max(2, tokens * (i + 1) // streams) if staggered else tokens
                tasks.append(_task(BENCH_PROMPTS[i % len(BENCH_PROMPTS)], n, 0.0, None))
            started, cpu_started = time.perf_counter(), time.process_time()
            for task in tasks:
                engine.submit(task)
            engine.drain()
            elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
            generated = sum(len(c.token_ids) for t in tasks for c in sink[t.task_id])
            out[name].append(generated / elapsed)
            cpu[name].append(generated / cpu_s)
    return {name: (statistics.median(v), max(v), statistics.median(cpu[name])) for name, v in out.items()}


def forward_costs(
    target: Any,
    drafts: dict[str, Any],
    *,
    lengths: tuple[int, ...] = (1, 2, 3, 4, 5),
    context: int = 64,
    repetitions: int = 30,
) -> dict[str, float]:
    """Minimum seconds of forward passes over a KV cache of ``context`` positions.

    ``target``: a ``TargetView``; returns ``target:<n>`` for each length
    (``target:1`` is a plain decode step, ``target:<k+1>`` a verify) and
    ``<name>:1`` for each draft step callable in ``drafts`` (called with a
    fresh-enough state; it must append and roll back its own cache).
    Interleaved across kinds, like the decode figures.
    """
    from mlx_lm.models.cache import make_prompt_cache

    from skulk.engine.speculative.target import trim_cache

    cache = make_prompt_cache(target.model)
    mx.eval(target.forward(mx.array([5] * context, dtype=mx.uint32), cache)[0])
    samples: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for _ in range(repetitions):
        for n in lengths:
            started, cpu_started = time.perf_counter(), time.process_time()
            logits, _ = target.forward(mx.array([7] * n, dtype=mx.uint32), cache)
            mx.eval(logits)
            samples[f"target:{n}"].append(time.perf_counter() - started)
            cpu[f"target:{n}"].append(time.process_time() - cpu_started)
            trim_cache(cache, n)
        for name, step in drafts.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            step()
            samples[f"{name}:1"].append(time.perf_counter() - started)
            cpu[f"{name}:1"].append(time.process_time() - cpu_started)
    out = {key: min(v) for key, v in samples.items()}
    out.update({f"cpu/{key}": statistics.median(v) for key, v in cpu.items()})
    return out


def predicted_speedup(
    tokens_per_round: float, drafted_per_round: float, costs: dict[str, float], draft_key: str, prefix: str = ""
) -> float:
    """``E * T_1 / (k * T_d + T_v(k + 1))`` with ``k`` the mean drafts per round (interpolated).

    ``prefix`` selects the cost set (``""``: wall-clock minima, ``"cpu/"``: CPU-time medians).
    """
    k = drafted_per_round
    lo = int(k)
    longest = max(int(key.split(":")[1]) for key in costs if key.startswith(f"{prefix}target:"))
    hi = min(lo + 1, longest - 1)
    frac = k - lo
    verify = (1 - frac) * costs[f"{prefix}target:{lo + 1}"] + frac * costs[f"{prefix}target:{hi + 1}"]
    return tokens_per_round * costs[f"{prefix}target:1"] / (k * costs[f"{prefix}{draft_key}"] + verify)
