"""Speculative acceptance rules: greedy prefix matching and distribution-preserving sampling.

The sampled rule is checked statistically: a small Markov-chain "target" and a
deliberately different "draft" over a 6-token vocabulary, many speculative
rounds with fixed seeds, and a chi-square test of the observed transitions
against the target's transition matrix. A biased variant of the rule (resample
from p instead of the residual on rejection) must fail the same test, which
shows the test has the power to notice a wrong sampler.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from skulk.core.tasks import GenerationParams
from skulk.engine.sampling import SampleRow, resolve_sampling, sample_batch
from skulk.engine.speculative.acceptance import (
    Decision,
    accept_greedy,
    accept_sampled,
    draw_from_logprobs,
    round_key,
    sampling_logprobs,
)

VOCAB = 6
DEPTH = 3
TOKENS = 6_000
SIGNIFICANCE = 1e-3


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square(dof): the regularized upper incomplete gamma Q(dof/2, stat/2)."""
    a, x = dof / 2.0, stat / 2.0
    if x <= 0:
        return 1.0
    log_prefix = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        n = 0
        while abs(term) > 1e-15 * abs(total):
            n += 1
            term *= x / (a + n)
            total += term
        return max(0.0, 1.0 - math.exp(log_prefix) * total)
    # Continued fraction for Q (Lentz).
    b, c, d = x + 1 - a, 1e300, 1.0 / (x + 1 - a)
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.exp(log_prefix) * h


def test_chi2_sf_matches_known_values() -> None:
    # Reference values (textbook tables): chi2(1) at 3.841 -> 0.05; chi2(10) at 18.307 -> 0.05;
    # chi2(30) at 50.892 -> 0.01; chi2(4) at 0 -> 1.
    assert chi2_sf(3.841459, 1) == pytest.approx(0.05, abs=1e-5)
    assert chi2_sf(18.307038, 10) == pytest.approx(0.05, abs=1e-5)
    assert chi2_sf(50.892181, 30) == pytest.approx(0.01, abs=1e-5)
    assert chi2_sf(0.0, 4) == 1.0


def transition_matrices() -> tuple[np.ndarray, np.ndarray]:
    """A target chain P and a draft chain Q that differ substantially (and Q misses tokens P has)."""
    rng = np.random.Generator(np.random.PCG64(7))
    p = rng.dirichlet(np.ones(VOCAB) * 0.8, size=VOCAB)
    q = rng.dirichlet(np.ones(VOCAB) * 0.8, size=VOCAB)
    q[:, 0] = 0.0  # the draft never proposes token 0: only the residual can produce it
    q /= q.sum(axis=1, keepdims=True)
    return p, q


def run_chain(
    p: np.ndarray, q: np.ndarray, *, biased: bool, seed: int
) -> tuple[np.ndarray, int, int]:
    """Generate TOKENS tokens by speculative rounds; returns (transition counts, drafted, accepted)."""
    log_p = mx.array(np.log(np.maximum(p, 1e-300)), dtype=mx.float32)
    log_q = mx.array(np.log(np.maximum(q, 1e-300)), dtype=mx.float32)
    counts = np.zeros((VOCAB, VOCAB), dtype=np.int64)
    seq = [0]
    drafted = accepted = 0
    round_index = 0
    while len(seq) < TOKENS:
        # Draft DEPTH tokens from the draft chain, recording the rows drawn from.
        drafts: list[int] = []
        prev = seq[-1]
        for j in range(DEPTH):
            token = int(draw_from_logprobs(log_q[prev][None], round_key(seed, round_index, 9, j)).item())
            drafts.append(token)
            prev = token
        contexts = [seq[-1]] + drafts  # the token before each verified position
        p_rows = log_p[mx.array(contexts)]
        q_rows = log_q[mx.array(contexts[:-1])]
        if biased:
            decision = biased_accept(p_rows, q_rows, drafts, seed=seed, index=round_index)
        else:
            decision = accept_sampled(p_rows, q_rows, drafts, seed=seed, index=round_index)
        drafted += DEPTH
        accepted += decision.accepted
        for token in decision.tokens:
            counts[seq[-1], token] += 1
            seq.append(token)
        round_index += 1
    return counts, drafted, accepted


def biased_accept(p_rows: mx.array, q_rows: mx.array, drafts: list[int], *, seed: int, index: int) -> Decision:
    """A classic bug: on rejection, resample from p instead of the residual max(0, p - q)."""
    k = len(drafts)
    p = np.exp(np.array(p_rows))
    q = np.exp(np.array(q_rows))
    u = np.array(mx.random.uniform(shape=(k,), key=round_key(seed, index, 2)))
    for j, d in enumerate(drafts):
        if u[j] * q[j, d] >= p[j, d]:
            token = int(draw_from_logprobs(p_rows[j : j + 1], round_key(seed, index, 3, j)).item())
            return Decision(accepted=j, tokens=tuple(drafts[:j]) + (token,))
    token = int(draw_from_logprobs(p_rows[k:], round_key(seed, index, 4)).item())
    return Decision(accepted=k, tokens=tuple(drafts) + (token,))


def chi_square_vs(counts: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Pearson chi-square of each row's transition counts against P (cells with expectation >= 5)."""
    stat, dof = 0.0, 0
    for a in range(VOCAB):
        total = counts[a].sum()
        expected = total * p[a]
        keep = expected >= 5
        stat += float((((counts[a] - expected) ** 2)[keep] / expected[keep]).sum())
        dof += int(keep.sum()) - 1
    return stat, chi2_sf(stat, dof)


def test_sampled_speculation_preserves_the_target_distribution() -> None:
    p, q = transition_matrices()
    counts, drafted, accepted = run_chain(p, q, biased=False, seed=1234)
    stat, p_value = chi_square_vs(counts, p)
    # The draft differs from the target, so rejections (and residual draws) happen often.
    assert 0.1 < accepted / drafted < 0.9, accepted / drafted
    assert counts[:, 0].sum() > 100, "token 0 comes only from residual/bonus draws"
    assert p_value > SIGNIFICANCE, (stat, p_value)


def test_the_chi_square_test_detects_a_biased_sampler() -> None:
    p, q = transition_matrices()
    counts, _, _ = run_chain(p, q, biased=True, seed=1234)
    stat, p_value = chi_square_vs(counts, p)
    assert p_value < 1e-6, (stat, p_value)


def test_accept_greedy_takes_the_longest_agreeing_prefix_then_the_target_token() -> None:
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == Decision(accepted=3, tokens=(5, 6, 7, 8))
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == Decision(accepted=1, tokens=(5, 9))
    assert accept_greedy([5, 6, 7], [4, 6, 7, 8]) == Decision(accepted=0, tokens=(4,))
    assert accept_greedy([], [3]) == Decision(accepted=0, tokens=(3,))
    with pytest.raises(AssertionError):
        accept_greedy([1, 2], [1, 2])


def test_accept_sampled_with_identical_distributions_accepts_everything() -> None:
    logits = mx.random.normal((4, 32), key=mx.random.key(3))
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    drafts = [int(t) for t in mx.argmax(lp[:3], axis=-1).tolist()]
    for index in range(20):
        decision = accept_sampled(lp, lp[:3], drafts, seed=99, index=index)
        assert decision.accepted == 3 and decision.tokens[:3] == tuple(drafts)


def test_accept_sampled_never_commits_a_token_the_target_excludes() -> None:
    # The target puts all mass on tokens {2, 3}; the draft proposes 7 (excluded) every time.
    p = np.full((3, 8), -np.inf, dtype=np.float32)
    p[:, 2] = p[:, 3] = np.log(0.5)
    q = np.full((2, 8), np.log(1 / 8), dtype=np.float32)
    for index in range(30):
        decision = accept_sampled(mx.array(p), mx.array(q), [7, 7], seed=5, index=index)
        assert decision.accepted == 0 and decision.tokens[0] in (2, 3)


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0.7},
        {"temperature": 1.3, "top_p": 0.8},
        {"temperature": 1.0, "top_k": 5},
        {"temperature": 0.9, "min_p": 0.05, "top_p": 0.95},
    ],
)
def test_sampling_logprobs_is_the_distribution_the_engine_samples_from(settings: dict[str, float]) -> None:
    """Draws from the engine's own sampler fit ``sampling_logprobs`` (chi-square) and respect its support."""
    vocab, draws = 24, 6000
    logits = mx.random.normal((1, vocab), key=mx.random.key(11)) * 2.0
    params = resolve_sampling(GenerationParams(seed=77, **settings))
    probs = np.exp(np.array(sampling_logprobs(logits, params)))[0]
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    rows = [SampleRow(params=params, index=i) for i in range(draws)]
    tokens = np.array(sample_batch(mx.repeat(logits, draws, axis=0), rows, mx.zeros((draws,), dtype=mx.uint32)).tokens)
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[probs == 0].sum() == 0, "the engine drew a token speculation considers impossible"
    expected = probs * draws
    keep = expected >= 5
    stat = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    assert chi2_sf(stat, int(keep.sum()) - 1) > SIGNIFICANCE, (stat, counts, expected.round(1))
