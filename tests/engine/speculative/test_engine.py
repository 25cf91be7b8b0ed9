"""``skulk.engine.speculative.engine`` in one process: exactness, load rule, stats, set-up.

The models are Skulk's generated speculation pair (``SPEC_TINY``): a target
whose upper layers refine its lower ones, a draft that is its first two
layers, and MTP heads trained on the target's own greedy output. "Plain" is
the engine without speculation on the same target, so "equal" means token for
token what a user gets without speculation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from skulk.core.instances import SpeculationConfig
from skulk.engine.speculative.engine import SpeculativeEngine, build_speculator
from skulk.engine.speculative.models import SPEC_TINY, read_card
from tests.engine.helpers import check_stream, make_spec, make_task, text_of, tokens_of
from tests.engine.speculative.helpers import PROMPTS, Run, greedy, speculator


@pytest.mark.parametrize(("drafter", "depth"), [("draft_model", 1), ("draft_model", 4), ("mtp", 2), ("mtp", 3)])
def test_greedy_speculation_equals_plain_decoding(
    spec_loaded: Any, spec_dirs: tuple[Path, Path], drafter: str, depth: int
) -> None:
    spec = speculator(spec_loaded, spec_dirs, drafter, depth)
    plain, fast = Run(spec_loaded), Run(spec_loaded, spec)
    for prompt in PROMPTS:
        (expected,) = plain.run(greedy(prompt, 40))
        (got,) = fast.run(greedy(prompt, 40))
        final = check_stream(got)
        assert tokens_of(got) == tokens_of(expected), prompt
        assert text_of(got) == text_of(expected)
        assert final.finish_reason == expected[-1].finish_reason
        assert final.usage == expected[-1].usage
        assert final.stats is not None and final.stats.draft_depth == depth
        rate = final.stats.acceptance_rate
        assert rate is not None and 0.0 <= rate <= 1.0
        assert expected[-1].stats is not None and expected[-1].stats.acceptance_rate is None
    assert isinstance(fast.engine, SpeculativeEngine)
    # Rounds commit several tokens at once: fewer steps than tokens.
    assert 0 < fast.engine.spec_rounds < 3 * 40
    assert fast.engine.steps < plain.engine.steps


def test_acceptance_is_high_on_the_generated_pair(spec_loaded: Any, spec_dirs: tuple[Path, Path]) -> None:
    """The pair is built to agree (upper layers refine); a broken round would show as ~0 acceptance."""
    for drafter in ("draft_model", "mtp"):
        run = Run(spec_loaded, speculator(spec_loaded, spec_dirs, drafter, 2))
        rates = [run.run(greedy(p, 48))[0][-1].stats.acceptance_rate for p in PROMPTS]
        assert min(rates) > 0.2, (drafter, rates)


def test_concurrent_streams_decode_plainly_and_the_last_one_speculates(
    spec_loaded: Any, spec_dirs: tuple[Path, Path]
) -> None:
    spec = speculator(spec_loaded, spec_dirs, "draft_model", 3)
    tasks = lambda: [greedy(p, n) for p, n in zip(PROMPTS, (12, 20, 44))]  # noqa: E731
    plain = Run(spec_loaded, prefill_step_tokens=64, prefill_chunk_tokens=64).run(*tasks(), stagger=2)
    run = Run(spec_loaded, spec, prefill_step_tokens=64, prefill_chunk_tokens=64)
    fast = run.run(*tasks(), stagger=2)
    assert [tokens_of(c) for c in fast] == [tokens_of(c) for c in plain]
    for chunks in fast:
        check_stream(chunks)
    engine = run.engine
    assert isinstance(engine, SpeculativeEngine)
    # While several streams decode, steps are plain batched steps; the longest
    # stream, alone at the end, speculates.
    assert engine.spec_plain_steps >= 12 and engine.spec_rounds > 0
    assert fast[2][-1].stats.acceptance_rate is not None


def test_penalised_and_logprob_requests_decode_plainly(spec_loaded: Any, spec_dirs: tuple[Path, Path]) -> None:
    spec = speculator(spec_loaded, spec_dirs, "draft_model", 3)
    for extra in ({"repetition_penalty": 1.3}, {"logprobs": True, "top_logprobs": 2}):
        run = Run(spec_loaded, spec)
        (got,) = run.run(greedy(PROMPTS[0], 16, **extra))
        (expected,) = Run(spec_loaded).run(greedy(PROMPTS[0], 16, **extra))
        assert tokens_of(got) == tokens_of(expected)
        assert run.engine.spec_rounds == 0 and got[-1].stats.acceptance_rate is None
        if "logprobs" in extra:
            assert all(c.logprobs for c in got if c.token_ids)


@pytest.mark.parametrize("drafter", ["draft_model", "mtp"])
def test_sampled_speculation_is_seeded_and_valid(spec_loaded: Any, spec_dirs: tuple[Path, Path], drafter: str) -> None:
    spec = speculator(spec_loaded, spec_dirs, drafter, 3)
    task = lambda: make_task(prompt=PROMPTS[1], max_tokens=40, temperature=0.8, top_p=0.95, seed=4242)  # noqa: E731
    first = Run(spec_loaded, spec).run(task())[0]
    second = Run(spec_loaded, spec).run(task())[0]
    assert tokens_of(first) == tokens_of(second), "a seeded request must be reproducible"
    final = check_stream(first)
    vocab = len(spec_loaded.tokenizer)
    assert all(0 <= t < vocab for t in tokens_of(first))
    assert final.stats.acceptance_rate is not None and final.usage.completion_tokens == len(tokens_of(first))
    # top_k == 1 is greedy: speculation must then reproduce plain greedy exactly.
    (topk1,) = Run(spec_loaded, spec).run(make_task(prompt=PROMPTS[1], max_tokens=24, temperature=0.8, top_k=1))
    (plain,) = Run(spec_loaded).run(greedy(PROMPTS[1], 24))
    assert tokens_of(topk1) == tokens_of(plain)


def test_build_speculator_reports_why_it_cannot_speculate(
    spec_loaded: Any, spec_dirs: tuple[Path, Path], models_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Model ids resolve under the session's models root, never the user's.
    monkeypatch.setenv("SKULK_MODELS_DIR", str(models_root))

    def build(config: SpeculationConfig, path: Path) -> tuple[Any, str]:
        return build_speculator(msgspec.structs.replace(make_spec(), speculation=config), spec_loaded, path, None)

    assert build(SpeculationConfig(), spec_dirs[0]) == (None, "speculation not configured for this instance")
    missing, reason = build(SpeculationConfig(drafter="mtp", depth=2), spec_dirs[1])
    assert missing is None and "MTP" in reason
    unknown, reason = build(SpeculationConfig(drafter="draft_model", depth=2, draft_model_id="no/such-model"), spec_dirs[0])
    assert unknown is None and "no/such-model" in reason
    # Depth 0 means "the card's depth".
    card_depth, _ = build(SpeculationConfig(drafter="mtp", depth=0), spec_dirs[0])
    assert card_depth is not None and card_depth.depth == read_card(spec_dirs[0]).mtp_max_depth == SPEC_TINY.mtp_max_depth
    # The card names the draft: no id needed.
    by_card, reason = build(SpeculationConfig(drafter="draft_model", depth=2), spec_dirs[0])
    assert read_card(spec_dirs[0]).draft_model == SPEC_TINY.draft_id
    assert by_card is not None and by_card.kind == "draft_model", reason
