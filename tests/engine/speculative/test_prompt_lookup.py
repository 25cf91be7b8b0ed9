"""Prompt-lookup drafting (``skulk.engine.speculative.prompt_lookup``): what it proposes, and the rules it keeps.

- proposals: the continuation of the latest earlier occurrence of the longest recurring n-gram;
- exact under greedy: the engine's committed tokens equal plain decoding's, on text with repeats;
- distribution-preserving under sampling: speculative rounds whose drafts are point masses (what this
  drafter proposes) produce the target chain's transition frequencies (chi-square test, as for the other
  drafters), and seeded requests are reproducible;
- placement turns it on from a card's ``prompt_lookup_depth``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import msgspec
import numpy as np

from skulk.core.instances import SpeculationConfig
from skulk.core.placement import speculation_for
from skulk.engine.speculative.acceptance import accept_sampled
from skulk.engine.speculative.engine import SpeculativeEngine, build_speculator
from skulk.engine.speculative.prompt_lookup import PromptLookupDrafter
from tests.engine.helpers import check_stream, make_spec, make_task, tokens_of
from tests.engine.speculative.helpers import Run, greedy
from tests.engine.speculative.test_acceptance import SIGNIFICANCE, TOKENS, VOCAB, chi_square_vs, transition_matrices

REPEATING = (
    "Rewrite this sentence: the river runs north through the valley, past the old mill. "
    "Again: the river runs north through the valley, past the old mill. And once more: the river runs"
)


def test_it_copies_what_followed_the_latest_occurrence_of_the_longest_ngram() -> None:
    d = PromptLookupDrafter(vocab_size=100, max_ngram=3, min_ngram=1)
    d.extend([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6])
    # Bonus 2 gives ... 6, 2: no 3-gram or 2-gram recurs; the 1-gram 2 last recurred at 6 -> 3, 7, 8.
    assert d.propose(2, 3, None, (0, 0)).tokens == [3, 7, 8]
    d.commit([3, 7, 8], 1, None)  # the target took 3 and rejected 7
    assert d.context == [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3] and d.known == 13
    # Tokens decoded without speculating arrive by extend; with bonus 5, 3, 4, 5 recurs as a 3-gram.
    d.extend([4])
    assert d.propose(5, 4, None, (0, 1)).tokens == [9, 2, 3, 7]
    d2 = PromptLookupDrafter(vocab_size=100, max_ngram=3, min_ngram=2)
    d2.extend([1, 2, 3, 4, 5, 9, 2, 3])
    assert d2.propose(4, 2, None, (0, 0)).tokens == [5, 9]  # 2, 3, 4 recurs: 5, 9 followed it
    assert d2.propose(8, 2, None, (0, 0)).tokens == []  # 3, 8 and 8 never occurred before
    # A run of one token: the latest earlier start overlaps the tail by all but one position.
    d3 = PromptLookupDrafter(vocab_size=100, max_ngram=2, min_ngram=2)
    d3.extend([5, 7, 7])
    assert d3.propose(7, 3, None, (0, 0)).tokens == [7]


def test_sampled_proposals_are_point_masses() -> None:
    from skulk.engine.sampling import resolve_sampling

    d = PromptLookupDrafter(vocab_size=11)
    d.extend([1, 2, 3, 1, 2])
    sampling = resolve_sampling(make_task(prompt="x", temperature=0.7).params, default_temperature=1.0)
    proposal = d.propose(3, 2, sampling, (0, 0))
    assert proposal.tokens == [1, 2] and proposal.q_logprobs is not None
    q = np.exp(np.array(proposal.q_logprobs))
    assert q.shape == (2, 11) and np.array_equal(q.argmax(axis=1), [1, 2]) and np.allclose(q.sum(axis=1), 1.0)


def test_speculative_rounds_with_point_mass_drafts_keep_the_target_distribution() -> None:
    """The copied drafts are deterministic; acceptance must still leave the target chain's frequencies."""
    p, _ = transition_matrices()
    log_p = mx.array(np.log(np.maximum(p, 1e-300)), dtype=mx.float32)
    counts = np.zeros((VOCAB, VOCAB), dtype=np.int64)
    seq, drafted, accepted, index = [0], 0, 0, 0
    while len(seq) < TOKENS:
        drafts = [(seq[-1] + j + 1) % VOCAB for j in range(3)]  # any deterministic guess, like a copied span
        q = np.full((3, VOCAB), -np.inf, dtype=np.float32)
        q[np.arange(3), drafts] = 0.0
        p_rows = log_p[mx.array([seq[-1]] + drafts)]
        decision = accept_sampled(p_rows, mx.array(q), drafts, seed=99, index=index)
        drafted, accepted, index = drafted + 3, accepted + decision.accepted, index + 1
        for token in decision.tokens:
            counts[seq[-1], token] += 1
            seq.append(token)
    _, p_value = chi_square_vs(counts, p)
    assert 0.05 < accepted / drafted < 0.95, accepted / drafted
    assert p_value > SIGNIFICANCE, p_value


def _lookup_speculator(loaded: Any, model_dir: Path, depth: int) -> Any:
    spec = msgspec.structs.replace(make_spec(), speculation=SpeculationConfig(drafter="prompt_lookup", depth=depth))
    built, reason = build_speculator(spec, loaded, model_dir, None)
    assert built is not None, reason
    assert built.kind == "prompt_lookup" and built.depth == depth
    return built


def test_greedy_prompt_lookup_equals_plain_decoding_and_accepts_copied_spans(
    spec_loaded: Any, spec_dirs: tuple[Path, Path]
) -> None:
    spec = _lookup_speculator(spec_loaded, spec_dirs[0], 4)
    plain, fast = Run(spec_loaded), Run(spec_loaded, spec)
    rates = []
    for prompt in (REPEATING, "The quick brown fox", "one two three one two three one two three one two"):
        (expected,) = plain.run(greedy(prompt, 48))
        (got,) = fast.run(greedy(prompt, 48))
        final = check_stream(got)
        assert tokens_of(got) == tokens_of(expected), prompt
        assert final.usage == expected[-1].usage and final.finish_reason == expected[-1].finish_reason
        assert final.stats is not None and final.stats.draft_depth == 4
        rates.append(final.stats.acceptance_rate)
    assert isinstance(fast.engine, SpeculativeEngine) and fast.engine.spec_rounds > 0
    assert all(r is None or 0.0 <= r <= 1.0 for r in rates)


def test_sampled_prompt_lookup_is_seeded_and_valid(spec_loaded: Any, spec_dirs: tuple[Path, Path]) -> None:
    spec = _lookup_speculator(spec_loaded, spec_dirs[0], 3)
    task = lambda: make_task(prompt=REPEATING, max_tokens=40, temperature=0.8, top_p=0.95, seed=77)  # noqa: E731
    first = Run(spec_loaded, spec).run(task())[0]
    second = Run(spec_loaded, _lookup_speculator(spec_loaded, spec_dirs[0], 3)).run(task())[0]
    assert tokens_of(first) == tokens_of(second), "a seeded request must be reproducible"
    final = check_stream(first)
    assert final.usage is not None and final.usage.completion_tokens == len(tokens_of(first))


def test_a_cards_prompt_lookup_depth_turns_it_on_below_mtp_and_draft_models() -> None:
    from skulk.core.cards import ModelCard

    card = ModelCard(model_id="a/b", family="llama", weight_bytes=1, n_layers=2, hidden_size=8, num_kv_heads=1,
                     head_dim=8, context_length=64, supports_tensor=True, prompt_lookup_depth=4)  # fmt: skip
    assert speculation_for(card, 1) == SpeculationConfig(drafter="prompt_lookup", depth=4)
    assert speculation_for(msgspec.structs.replace(card, draft_model="a/c"), 1).drafter == "draft_model"
    assert speculation_for(msgspec.structs.replace(card, mtp_max_depth=2), 1).drafter == "mtp"
    assert speculation_for(msgspec.structs.replace(card, prompt_lookup_depth=0), 1).drafter == "none"
