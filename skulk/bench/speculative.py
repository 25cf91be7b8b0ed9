"""Speculative decoding benchmark: ``python -m skulk.bench speculative``.

On Skulk's generated high-agreement pair (``SPEC_BENCH``: a 16-layer target
whose upper layers refine its lower ones, its 1-layer truncation as the draft,
and MTP heads), prints:

1. forward-pass costs: the target over 1..5 tokens, one draft step of each
   drafter (and their ratios to a plain decode step);
2. single-stream decode tokens/s, plain vs speculative at depths 1-4 for each
   drafter: acceptance, tokens per round, measured speed-up, the speed-up the
   acceptance and costs predict (``spec_measure.predicted_speedup``) and
   measured/predicted;
3. aggregate tokens/s with 8 concurrent streams (equal lengths, and staggered
   lengths so the batch drains to one stream), plain vs speculative;
4. optionally (``--sampled``) the same single-stream figures at temperature 0.7.

Figures only: nothing here asserts a timing. Run it on an idle machine; on a
shared one the interleaving keeps ratios fair but absolute figures move.
``OPENBLAS_NUM_THREADS=1`` is set unless already set: on a 2-core shared
machine one BLAS thread is faster and steadier for these small matmuls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _draft_step_callables(target: Any, speculators: dict[str, Any]) -> dict[str, Any]:
    """One draft step per drafter kind, each appending one position and rolling it back."""
    import mlx.core as mx

    from skulk.engine.speculative.drafters import DraftModelDrafter, MtpDrafter
    from skulk.engine.speculative.target import trim_cache

    steps: dict[str, Any] = {}
    for kind, spec in speculators.items():
        drafter = spec.make_drafter()
        if isinstance(drafter, DraftModelDrafter):
            view, cache = drafter.draft, drafter.cache
            mx.eval(view.forward(mx.array([5] * 64, dtype=mx.uint32), cache)[0])

            def step(view: Any = view, cache: Any = cache) -> None:
                logits, _ = view.forward(mx.array([7], dtype=mx.uint32), cache)
                mx.eval(mx.argmax(logits[-1:], axis=-1))
                trim_cache(cache, 1)

        else:
            assert isinstance(drafter, MtpDrafter)
            module, cache = drafter.heads.module_for(0), drafter.cache[0]
            hidden = mx.zeros((1, 64, target.hidden_size))
            module(hidden, target.embed(mx.array([5] * 64, dtype=mx.uint32))[None], cache)
            mx.eval([c.state for c in cache])

            def step(module: Any = module, cache: Any = cache) -> None:
                g, normed = module(mx.zeros((1, 1, target.hidden_size)), target.embed(mx.array([7], dtype=mx.uint32))[None], cache)
                mx.eval(mx.argmax(target.head(normed[:, -1]), axis=-1), g)
                trim_cache(cache, 1)

        steps[kind] = step
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skulk.bench speculative", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="models root (default: Skulk's models directory)")
    parser.add_argument("--preset", default="bench", help="speculation preset (bench or tiny)")
    parser.add_argument("--tokens", type=int, default=96, help="tokens per single stream")
    parser.add_argument("--repetitions", type=int, default=3, help="passes over the prompts per configuration")
    parser.add_argument("--stream-repetitions", type=int, default=4, help="runs of each concurrent scenario")
    parser.add_argument("--depths", default="1,2,3,4")
    parser.add_argument("--drafters", default="draft_model,mtp")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=64, help="tokens per concurrent stream")
    parser.add_argument("--sampled", action="store_true", help="also measure at temperature 0.7")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    from skulk.engine.accel import enable_fast_blas

    blas = enable_fast_blas()
    from skulk.core.instances import SpeculationConfig
    from skulk.engine.shard import load_shard
    from skulk.engine.speculative.engine import build_speculator
    from skulk.bench.spec_measure import concurrent_figures, decode_figures, forward_costs, predicted_speedup
    from skulk.engine.speculative.models import SPEC_PRESETS, ensure_spec_models
    from skulk.engine.speculative.target import TargetView

    preset = SPEC_PRESETS[args.preset]
    print(f"BLAS: {blas.backend} ({'active' if blas.active else 'inactive'}), {blas.threads} thread(s); load average {os.getloadavg()}")
    started = time.monotonic()
    target_dir, draft_dir = ensure_spec_models(preset, root=args.root)
    print(f"models: {target_dir} (+ MTP heads), draft {draft_dir} [{time.monotonic() - started:.1f}s]")
    report = json.loads((target_dir / "skulk_spec.json").read_text())
    print(f"pair: draft = first {preset.draft_layers} of {preset.target.num_hidden_layers} layers; upper layers' residual outputs x{preset.upper_scale}; "
          f"MTP held-out agreement {report['mtp']['agreement_before']:.3f} -> {report['mtp']['agreement_after']:.3f} after training")
    loaded = load_shard(target_dir, None, None)
    target = TargetView(loaded.shard)

    def build(drafter: str, depth: int) -> Any:
        from skulk.core.ids import InstanceId, ModelId, NodeId, RunnerId
        from skulk.core.instances import PipelineShardMetadata, RunnerSpec

        shard = PipelineShardMetadata(
            model_id=ModelId(preset.target.model_id), device_rank=0, world_size=1, start_layer=0,
            end_layer=loaded.n_layers, n_layers=loaded.n_layers,
        )  # fmt: skip
        spec = RunnerSpec(
            instance_id=InstanceId("bench"), runner_id=RunnerId("bench"), node_id=NodeId("bench"),
            model_id=ModelId(preset.target.model_id), shard=shard, context_ceiling=8192,
            speculation=SpeculationConfig(drafter=drafter, depth=depth, draft_model_id=str(draft_dir)),  # type: ignore[arg-type]
        )  # fmt: skip
        built, reason = build_speculator(spec, loaded, target_dir, None)
        if built is None:
            raise SystemExit(f"cannot speculate with {drafter}: {reason}")
        return built

    depths = [int(d) for d in args.depths.split(",")]
    drafters = [d for d in args.drafters.split(",") if d]
    speculators = {(d, k): build(d, k) for d in drafters for k in depths}
    figures: dict[str, Any] = {"blas": blas.backend, "threads": blas.threads, "preset": preset.name}

    print("\n== forward-pass costs (best of 30, ms; KV cache of 64 positions) ==")
    costs = forward_costs(target, _draft_step_callables(target, {d: speculators[(d, depths[0])] for d in drafters}))
    t1, c1 = costs["target:1"], costs["cpu/target:1"]
    for key in sorted(k for k in costs if not k.startswith("cpu/")):
        cpu = costs[f"cpu/{key}"]
        print(f"  {key:<16} wall {costs[key] * 1e3:7.2f} ms  x{costs[key] / t1:.2f}   cpu {cpu * 1e3:7.2f} ms  x{cpu / c1:.2f}")
    figures["costs_s"] = costs

    def single(temperature: float) -> list[dict[str, Any]]:
        configs = [("plain", 0, None)] + [(f"{d}@{k}", k, speculators[(d, k)]) for d in drafters for k in depths]
        results = decode_figures(loaded, configs, tokens=args.tokens, repetitions=args.repetitions, temperature=temperature)
        plain, plain_best = results[0].decode_tps, results[0].best_tps
        rows = []
        print(f"\n== single stream, temperature {temperature}: decode tok/s over {len(results[0].runs)} streams of {args.tokens} tokens ==")
        print("  speed-ups compare best runs (median-run speed-up in brackets); predicted = E*T1/(k*Td + Tv(k+1))")
        print(f"  {'config':<15}{'median':>8}{'best':>8}{'accept':>8}{'E tok/rnd':>10}{'speedup':>16}{'predicted':>10}{'meas/pred':>10}")
        print(f"  {'plain':<15}{plain:8.1f}{plain_best:8.1f}")
        cpu_rows = []
        for (name, depth, spec), res in zip(configs[1:], results[1:]):
            assert spec is not None
            measured = res.best_tps / plain_best
            median_speedup = res.decode_tps / plain
            predicted = predicted_speedup(res.tokens_per_round, res.drafted_per_round, costs, f"{spec.kind}:1")
            print(
                f"  {name:<15}{res.decode_tps:8.1f}{res.best_tps:8.1f}{res.acceptance:8.2f}{res.tokens_per_round:10.2f}"
                f"{measured:8.2f}x ({median_speedup:.2f}x){predicted:9.2f}x{measured / predicted:9.0%}"
            )
            cpu_measured = res.cpu_tps / results[0].cpu_tps
            cpu_predicted = predicted_speedup(res.tokens_per_round, res.drafted_per_round, costs, f"{spec.kind}:1", "cpu/")
            cpu_rows.append((name, res.cpu_tps, cpu_measured, cpu_predicted))
            rows.append({
                "cpu_tps": res.cpu_tps, "cpu_speedup": cpu_measured, "cpu_predicted": cpu_predicted,
                "config": name, "depth": depth, "decode_tps_median": res.decode_tps, "decode_tps_best": res.best_tps,
                "plain_tps_median": plain, "plain_tps_best": plain_best, "acceptance": res.acceptance,
                "tokens_per_round": res.tokens_per_round, "drafted_per_round": res.drafted_per_round,
                "speedup": measured, "speedup_median": median_speedup, "predicted": predicted,
            })  # fmt: skip
        print("  in CPU time (tokens per CPU-second, medians; prefill included; costs: CPU-time medians):")
        print(f"  {'plain':<15}{results[0].cpu_tps:8.1f}")
        for name, tps, measured, predicted in cpu_rows:
            print(f"  {name:<15}{tps:8.1f}{measured:8.2f}x  predicted {predicted:5.2f}x  meas/pred {measured / predicted:4.0%}")
        return rows

    figures["greedy"] = single(0.0)
    if args.sampled:
        figures["sampled"] = single(0.7)

    best = max(figures["greedy"], key=lambda r: r["speedup"])
    best_spec = speculators[(best["config"].split("@")[0], best["depth"])]
    print(f"\n== {args.streams} concurrent streams: aggregate tok/s (plain vs {best['config']}) ==")
    for staggered in (False, True):
        agg = concurrent_figures(
            loaded, [("plain", None), (best["config"], best_spec)], streams=args.streams, tokens=args.stream_tokens, staggered=staggered,
            repetitions=args.stream_repetitions,
        )
        label = "staggered lengths" if staggered else "equal lengths"
        (p_med, p_best, p_cpu), (s_med, s_best, s_cpu) = agg["plain"], agg[best["config"]]
        print(
            f"  {label:<18} plain {p_med:6.1f} (best {p_best:6.1f}, cpu {p_cpu:6.1f})   speculative {s_med:6.1f} "
            f"(best {s_best:6.1f}, cpu {s_cpu:6.1f})   ratio {s_med / p_med:.2f} (best {s_best / p_best:.2f}, cpu {s_cpu / p_cpu:.2f})"
        )
        figures[f"concurrent_{'staggered' if staggered else 'equal'}"] = agg
    print(f"\nload average at the end {os.getloadavg()}; total {time.monotonic() - started:.0f}s")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
