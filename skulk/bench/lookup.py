"""Prompt-lookup drafting on the real model: ``python -m skulk.bench lookup``.

Rewriting a given paragraph (the task prompt lookup exists for: the answer
repeats long spans of the prompt) with the default model,
SmolLM2-135M-Instruct, computing as a runner does (world of one, CPU serving
format), greedy. For each depth ``k`` the real engine (``SpeculativeEngine``
with a ``PromptLookupDrafter``) runs interleaved with plain decoding
(``skulk.bench.spec_measure``) and the tool prints:

- *acceptance*: accepted drafts / drafted tokens, and tokens committed per round;
- *measured speed-up*: speculative / plain decode tokens/s (median runs, best
  runs, and per CPU-second, the steadiest on a shared machine);
- *predicted speed-up*: ``E * T_1 / (k * T_d + T_v(k + 1))`` from the measured
  acceptance and the measured forward costs (``T_d``, one lookup, is
  microseconds), once from wall-clock minima and once from CPU-time medians,
  and the measured / predicted ratios (best runs against the first; CPU-time
  speed-up against the second, which a busy machine disturbs least).

A control task with no repeated spans (answering a question) shows what the
drafter costs when it finds nothing to copy. Targets (issue 12): at least
1.3x over plain decoding on the rewrite task, and at least 90% of the
predicted speed-up. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

__all__ = ["REWRITE_PARAGRAPHS", "main"]

REWRITE_PARAGRAPHS = (
    "The river runs north through the valley, past the old mill, under the stone bridge and into the lake. "
    "In spring the water rises and covers the meadow, and the children of the village come down to watch the "
    "ducks. In autumn the river is low and clear, and you can see the stones on its bed.",
    "Our team meets every Monday at nine in the small room on the second floor. Each person says what they "
    "finished last week, what they will do this week, and what is blocking them. The meeting lasts fifteen "
    "minutes, and anything longer is discussed afterwards by the people who need to be there.",
    "To make the bread, mix the flour, the salt and the yeast in a large bowl, then add the warm water and stir "
    "until a soft dough forms. Knead the dough for ten minutes, cover it, and let it rise for an hour in a warm "
    "place. Shape the loaf, let it rise again, and bake it for forty minutes.",
)
CONTROL_QUESTIONS = (
    "What are three good habits for staying healthy?",
    "Why is the sky blue?",
    "Give me some ideas for a birthday party.",
)


def _chat_prompts(tokenizer: Any, texts: list[str]) -> tuple[str, ...]:
    return tuple(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                               tokenize=False) for t in texts)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skulk.bench lookup", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id or directory (default: the default model)")
    parser.add_argument("--depths", default="3,5,8", help="draft depths to measure")
    parser.add_argument("--tokens", type=int, default=160, help="tokens per stream")
    parser.add_argument("--repetitions", type=int, default=2, help="passes over the prompts per configuration")
    parser.add_argument("--skip-control", action="store_true", help="skip the task without repeated spans")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the runner (skulk.engine.runner.default_blas_threads)

    from skulk.engine.accel import enable_fast_blas

    blas = enable_fast_blas()
    import mlx.core as mx

    from skulk.bench.spec_measure import decode_figures, forward_costs, predicted_speedup
    from skulk.engine.models import DEFAULT_MODEL_ID, resolve_model_path
    from skulk.engine.shard import load_shard
    from skulk.engine.speculative.engine import Speculator
    from skulk.engine.speculative.prompt_lookup import PromptLookupDrafter
    from skulk.engine.speculative.target import TargetView

    path = resolve_model_path(args.model or DEFAULT_MODEL_ID)
    loaded = load_shard(path, None, None)
    target = TargetView(loaded.shard)
    depths = [int(d) for d in args.depths.split(",") if d]
    print(f"prompt-lookup drafting on {path.name}  (BLAS {blas.backend}, {blas.threads} thread(s); load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.tokens} greedy tokens per stream)")  # fmt: skip

    def speculator(depth: int) -> Speculator:
        return Speculator(kind="prompt_lookup", depth=depth, target=target,
                          make_drafter=lambda: PromptLookupDrafter(target.vocab_size))  # fmt: skip

    # The lookup's own cost, on a context as long as a rewrite's.
    drafter = PromptLookupDrafter(target.vocab_size)
    drafter.extend(list(range(1000, 1400)) * 2)

    def lookup_step() -> None:
        drafter.propose(1100, max(depths), None, (0, 0))

    started = time.monotonic()
    costs = forward_costs(target, {"lookup": lookup_step}, lengths=tuple(range(1, max(depths) + 2)), context=200,
                          repetitions=10)  # fmt: skip
    print(f"forward costs (ms, minima): decode step {costs['target:1'] * 1e3:.1f}; verify of k+1 tokens: "
          + ", ".join(f"k={k}: {costs[f'target:{k + 1}'] * 1e3:.1f}" for k in depths)
          + f"; one lookup {costs['lookup:1'] * 1e6:.0f} us  [{time.monotonic() - started:.0f}s]")  # fmt: skip
    tasks = [("rewrite a given paragraph", _chat_prompts(loaded.tokenizer, [
        f"Rewrite the following paragraph, keeping every detail:\n\n{p}" for p in REWRITE_PARAGRAPHS]))]
    if not args.skip_control:
        tasks.append(("control: answer a question (nothing to copy)", _chat_prompts(loaded.tokenizer, list(CONTROL_QUESTIONS))))
    for title, prompts in tasks:
        configs: list[tuple[str, int, Any]] = [("plain", 0, None)] + [(f"lookup k={k}", k, speculator(k)) for k in depths]
        started = time.monotonic()
        figs = decode_figures(loaded, configs, prompts=prompts, tokens=args.tokens, repetitions=args.repetitions)
        plain = figs[0]
        print(f"\n{title}: {len(prompts)} prompts x {args.repetitions} repetitions  [{time.monotonic() - started:.0f}s]")
        print(f"{'config':>13} {'tok/s med':>10} {'best':>7} {'per CPU-s':>10} {'accept':>7} {'tok/round':>10} "
              f"{'speed-up med':>13} {'best':>6} {'CPU':>6} {'predicted':>10} {'CPU pred':>9} "
              f"{'best/pred':>10} {'CPU/pred':>9}")  # fmt: skip
        for f in figs:
            if f.depth == 0:
                print(f"{f.name:>13} {f.decode_tps:>10.1f} {f.best_tps:>7.1f} {f.cpu_tps:>10.1f}")
                continue
            pred = predicted_speedup(f.tokens_per_round, f.drafted_per_round, costs, "lookup:1")
            pred_cpu = predicted_speedup(f.tokens_per_round, f.drafted_per_round, costs, "lookup:1", prefix="cpu/")
            med, best, cpu = f.decode_tps / plain.decode_tps, f.best_tps / plain.best_tps, f.cpu_tps / plain.cpu_tps
            print(f"{f.name:>13} {f.decode_tps:>10.1f} {f.best_tps:>7.1f} {f.cpu_tps:>10.1f} {f.acceptance:>7.2f} "
                  f"{f.tokens_per_round:>10.2f} {med:>12.2f}x {best:>5.2f}x {cpu:>5.2f}x {pred:>9.2f}x "
                  f"{pred_cpu:>8.2f}x {best / pred:>9.0%} {cpu / pred_cpu:>8.0%}")  # fmt: skip
    print("\ntargets: rewrite speed-up >= 1.3x over plain decoding, measured >= 90% of predicted "
          "(best runs vs wall-clock prediction; CPU-time speed-up vs CPU-time prediction, steadier on a busy machine)")
    del mx
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
