"""Speculative decoding with prefix-cache hits: the drafter's caches stay consistent.

A cache hit seeds the target's KV for most of the prompt; the drafter still
has to know the prompt. A fresh drafter per stream catches up before its
first proposal: a draft model reads every token (its acceptance is what it
was without a hit, checked below: drafts from a wrong history would collapse
it); MTP heads get the target's hidden states of the positions this request
computed (the tap records from wherever the seeded cache starts), so they
draft from that tail of the prompt. Greedy output equals plain decoding
either way: the target verifies every draft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.engine.helpers import check_stream, tokens_of
from tests.engine.speculative.helpers import PROMPTS, Run, greedy, speculator


@pytest.mark.parametrize("drafter", ["draft_model", "mtp"])
def test_speculation_after_a_cache_hit_equals_plain_decoding(spec_loaded: Any, spec_dirs: tuple[Path, Path], drafter: str) -> None:
    spec = speculator(spec_loaded, spec_dirs, drafter, 3)
    plain = Run(spec_loaded, prefix_cache_bytes=0)
    fast = Run(spec_loaded, spec)
    base = PROMPTS[2]
    rates = []
    for extra in ("", " Once more:", " Once more: and again,"):
        (expected,) = plain.run(greedy(base + extra, 32))
        (got,) = fast.run(greedy(base + extra, 32))
        final = check_stream(got)
        assert tokens_of(got) == tokens_of(expected), extra
        assert final.usage == expected[-1].usage
        assert final.stats is not None and final.stats.acceptance_rate is not None
        rates.append((final.stats.cached_tokens, final.stats.acceptance_rate))
    assert rates[0][0] == 0 and all(cached > 0 for cached, _ in rates[1:]), rates
    assert fast.engine.spec_rounds > 0
    if drafter == "draft_model":
        # Drafts proposed from the right history: acceptance after a hit stays as high as without one.
        assert min(rate for _, rate in rates[1:]) > 0.5 * rates[0][1], rates
