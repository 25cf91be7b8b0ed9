"""``skulk.engine.speculative.rounds``: one round and the standalone single-stream decoder.

On the generated pair (``SPEC_TINY``): greedy rounds reproduce plain decoding
at every depth and roll the caches back exactly; sampled rounds commit only
tokens the warped target allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from skulk.engine.sampling import resolve_sampling
from skulk.engine.speculative.drafters import DraftModelDrafter, MtpDrafter
from skulk.engine.speculative.mtp import load_mtp
from skulk.engine.speculative.rounds import decode_stream, speculative_round
from skulk.engine.speculative.target import TargetView, cache_length
from tests.engine.helpers import make_task, tokens_of
from tests.engine.speculative.helpers import PROMPTS, Run, greedy


def test_decode_stream_matches_plain_and_rolls_caches_back(spec_loaded: Any, spec_dirs: tuple[Path, Path]) -> None:
    """The standalone stream against itself at depth 0, with cache invariants."""
    from mlx_lm.utils import load_model

    target = TargetView(spec_loaded.shard)
    model = spec_loaded.shard.model
    draft_model, _ = load_model(spec_dirs[1])
    draft = TargetView(draft_model)
    heads = load_mtp(model, spec_dirs[0], spec_loaded.config)
    ids = spec_loaded.tokenizer.encode(PROMPTS[1])
    plain = decode_stream(target, lambda: make_prompt_cache(model), ids, 30)
    (engine_plain,) = Run(spec_loaded).run(greedy(PROMPTS[1], 30))
    assert plain.tokens == tokens_of(engine_plain)
    for depth in (1, 2, 4):
        for drafter in (DraftModelDrafter(draft, lambda: make_prompt_cache(draft_model)), MtpDrafter(heads, target)):
            got = decode_stream(target, lambda: make_prompt_cache(model), ids, 30, drafter=drafter, depth=depth)
            assert got.tokens == plain.tokens, (type(drafter).__name__, depth)
            assert sum(got.per_round) == len(got.tokens) - 1 and got.accepted <= got.drafted
            assert max(got.per_round) <= depth + 1

    # One round by hand: the target cache grows by exactly accepted + 1.
    cache = make_prompt_cache(model)
    logits, _ = target.forward(mx.array(ids, dtype=mx.uint32), cache)
    bonus = int(mx.argmax(logits[-1]).item())
    drafter = DraftModelDrafter(draft, lambda: make_prompt_cache(draft_model))
    drafter.extend(ids)
    before = cache_length(cache)
    outcome = speculative_round(target, cache, drafter, bonus, 4, None, (0, 1))
    assert cache_length(cache) == before + outcome.accepted + 1
    assert drafter.known == len(ids) + 1 + outcome.accepted
    assert cache_length(drafter.cache) + len(drafter.pending) == drafter.known


def test_sampled_decode_stream_draws_from_the_warped_target(spec_loaded: Any, spec_dirs: tuple[Path, Path]) -> None:
    """With top_k=2 only the target's two best tokens may ever be committed, drafted or not."""
    from mlx_lm.utils import load_model

    target = TargetView(spec_loaded.shard)
    model = spec_loaded.shard.model
    draft_model, _ = load_model(spec_dirs[1])
    draft = TargetView(draft_model)
    ids = spec_loaded.tokenizer.encode(PROMPTS[0])
    sampling = resolve_sampling(make_task(temperature=1.0, top_k=2, seed=9).params)
    drafter = DraftModelDrafter(draft, lambda: make_prompt_cache(draft_model))
    got = decode_stream(target, lambda: make_prompt_cache(model), ids, 24, drafter=drafter, depth=3, sampling=sampling)
    full = model(mx.array(ids + got.tokens[:-1], dtype=mx.uint32)[None])[0, len(ids) - 1 :]
    top2 = mx.argsort(-full, axis=-1)[:, :2].tolist()
    assert all(token in allowed for token, allowed in zip(got.tokens, top2))
