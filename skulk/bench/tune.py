"""Find the best speculation depth for a model on this machine and write it to its card.

``python -m skulk.bench tune <model dir or card.toml>
[--drafter mtp|draft_model] [--depths 1,2,3,4,5,6] [--write]``

For each depth the real engine decodes a few greedy streams, interleaved
with plain decoding (``spec_measure.decode_figures``); the best depth is the
one with the highest decode tokens/s, provided it beats plain decoding by at least
``--min-gain`` (default 5%). Otherwise speculation does not pay on this
machine and the depth is 0 (placement then leaves speculation off). With
``--write`` the result is stored as ``mtp_max_depth`` in the card's
``[runtime]`` table (the depth placement gives instances of this model, for
either drafter); without it the command only reports.

The argument is a model directory holding ``model_card.toml``, or a card file
whose ``model_id`` resolves to a local model directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "choose_depth"]


def choose_depth(plain_tps: float, by_depth: dict[int, float], min_gain: float) -> int:
    """The depth with the highest tokens/s if it beats ``plain_tps`` by ``min_gain``, else 0."""
    assert plain_tps > 0 and min_gain >= 0, (plain_tps, min_gain)
    if not by_depth:
        return 0
    depth = max(sorted(by_depth), key=lambda d: by_depth[d])
    return depth if by_depth[depth] >= plain_tps * (1.0 + min_gain) else 0


def _locate(target: Path) -> tuple[Path, Path]:
    """(model directory, card path) for a directory or a card file."""
    from skulk.core.cards import card_from_toml
    from skulk.engine.models import CARD_FILENAME, resolve_model_path

    if target.is_dir():
        card = target / CARD_FILENAME
        if not card.is_file():
            raise SystemExit(f"{target} has no {CARD_FILENAME}")
        return target, card
    if not target.is_file():
        raise SystemExit(f"{target}: no such model directory or card")
    card = card_from_toml(target.read_text(), source=str(target))
    return resolve_model_path(card.model_id), target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skulk.bench tune", description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="a model directory, or a model card TOML")
    parser.add_argument("--drafter", choices=("mtp", "draft_model"), default=None, help="default: mtp when the checkpoint has heads")
    parser.add_argument("--depths", default="1,2,3,4,5,6")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--min-gain", type=float, default=0.05, help="speed-up over plain a depth must beat")
    parser.add_argument("--write", action="store_true", help="store the best depth in the card")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    from skulk.engine.accel import enable_fast_blas

    enable_fast_blas()
    from skulk.core.cards import card_from_toml
    from skulk.core.ids import InstanceId, ModelId, NodeId, RunnerId
    from skulk.core.instances import PipelineShardMetadata, RunnerSpec, SpeculationConfig
    from skulk.engine.shard import load_shard
    from skulk.engine.speculative.engine import build_speculator
    from skulk.bench.spec_measure import decode_figures
    from skulk.engine.speculative.mtp import find_mtp_weights

    model_dir, card_path = _locate(args.target)
    card = card_from_toml(card_path.read_text(), source=str(card_path))
    loaded = load_shard(model_dir, None, None)
    drafter = args.drafter or ("mtp" if find_mtp_weights(model_dir, loaded.config) else "draft_model")
    if drafter == "draft_model" and not card.draft_model:
        raise SystemExit(f"{card_path} names no draft_model and the checkpoint has no MTP heads")

    def build(depth: int) -> Any:
        shard = PipelineShardMetadata(
            model_id=card.model_id, device_rank=0, world_size=1, start_layer=0, end_layer=loaded.n_layers, n_layers=loaded.n_layers
        )
        spec = RunnerSpec(
            instance_id=InstanceId("tune"), runner_id=RunnerId("tune"), node_id=NodeId("tune"), model_id=ModelId(card.model_id),
            shard=shard, context_ceiling=8192,
            speculation=SpeculationConfig(drafter=drafter, depth=depth, draft_model_id=card.draft_model),  # type: ignore[arg-type]
        )  # fmt: skip
        built, reason = build_speculator(spec, loaded, model_dir, None)
        if built is None:
            raise SystemExit(f"cannot speculate with {drafter}: {reason}")
        return built

    depths = [int(d) for d in args.depths.split(",")]
    configs = [("plain", 0, None)] + [(f"{drafter}@{d}", d, build(d)) for d in depths]
    results = decode_figures(loaded, configs, tokens=args.tokens, repetitions=args.repetitions)
    plain = results[0].best_tps
    by_depth = {d: r.best_tps for (_, d, _), r in zip(configs[1:], results[1:])}
    print(f"{card.model_id} ({drafter}) on this machine, best of {len(results[0].runs)} streams of {args.tokens} tokens:")
    print(f"  plain     {plain:7.1f} tok/s")
    for (_, d, _), r in zip(configs[1:], results[1:]):
        print(f"  depth {d:<3} {r.best_tps:7.1f} tok/s  x{r.best_tps / plain:.2f}  acceptance {r.acceptance:.2f}")
    best = choose_depth(plain, by_depth, args.min_gain)
    print(f"best depth: {best}" + ("" if best else " (speculation does not pay here)"))
    if args.write:
        from skulk.engine.speculative.models import update_card_runtime

        update_card_runtime(card_path, mtp_max_depth=best)
        print(f"wrote mtp_max_depth = {best} to {card_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
