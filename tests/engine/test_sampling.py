"""Per-row sampling: greedy is argmax, seeds are per request, masks restrict support."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_repetition_penalty

from skulk.core.tasks import GenerationParams
from skulk.engine.sampling import SampleRow, SamplingParams, resolve_sampling, sample_batch


def params(**kw: object) -> SamplingParams:
    base = {"temperature": 0.0, "seed": 1}
    base.update(kw)
    return resolve_sampling(GenerationParams(**base))  # type: ignore[arg-type]


LOGITS = mx.array(
    [
        [0.1, 2.0, -1.0, 0.5, 1.9, -3.0, 0.0, 1.0],
        [3.0, -2.0, 0.0, 0.2, 0.3, 2.9, -1.0, 0.0],
        [-1.0, -1.0, 4.0, 0.0, 0.0, 0.0, 3.5, 0.0],
    ]
)
INPUTS = mx.array([1, 2, 3], dtype=mx.uint32)


def test_greedy_rows_take_the_argmax() -> None:
    out = sample_batch(LOGITS, [SampleRow(params=params(), index=i) for i in range(3)], INPUTS)
    assert out.tokens.tolist() == [1, 0, 2]
    assert out.chosen_logprobs is None and out.top_ids is None


def test_a_seeded_row_does_not_depend_on_its_batch() -> None:
    hot = params(temperature=1.5, seed=1234)
    alone = [sample_batch(LOGITS[1:2], [SampleRow(params=hot, index=i)], INPUTS[1:2]).tokens.item() for i in range(40)]
    batched = [
        sample_batch(
            LOGITS,
            [SampleRow(params=params(temperature=0.7, seed=9), index=i), SampleRow(params=hot, index=i),
             SampleRow(params=params(), index=i)],
            INPUTS,
        ).tokens.tolist()[1]
        for i in range(40)
    ]  # fmt: skip
    assert alone == batched
    assert len(set(alone)) > 1  # it really samples
    other_seed = [
        sample_batch(LOGITS[1:2], [SampleRow(params=params(temperature=1.5, seed=99), index=i)], INPUTS[1:2]).tokens.item()
        for i in range(40)
    ]
    assert other_seed != alone


def test_top_k_top_p_and_min_p_restrict_the_support() -> None:
    row = LOGITS[0:1]
    draws = {
        name: {sample_batch(row, [SampleRow(params=p, index=i)], INPUTS[:1]).tokens.item() for i in range(120)}
        for name, p in {
            "top_k": params(temperature=5.0, top_k=2),
            "top_p": params(temperature=5.0, top_p=0.05),
            "min_p": params(temperature=5.0, min_p=0.9),
            "free": params(temperature=5.0),
        }.items()
    }
    assert draws["top_k"] == {1, 4}  # the two largest logits (2.0 and 1.9)
    assert draws["top_p"] == {1}  # the top token alone holds more than 5% of the mass
    assert draws["min_p"] == {1, 4}  # exp(1.9 - 2.0) = 0.905 >= 0.9
    assert len(draws["free"]) >= 6


def test_temperature_sampling_follows_the_softmax() -> None:
    logits = mx.array([[1.0, 0.0, -1.0, 0.5]])
    p = params(temperature=1.0, seed=42)
    n = 1500
    rows = [SampleRow(params=p, index=i) for i in range(n)]
    draws = sample_batch(mx.repeat(logits, n, axis=0), rows, mx.zeros((n,), dtype=mx.uint32)).tokens.tolist()
    counts = np.bincount(draws, minlength=4)
    expected = np.exp([1.0, 0.0, -1.0, 0.5]) / np.exp([1.0, 0.0, -1.0, 0.5]).sum() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3, (counts, expected)  # p = 0.001 for 3 degrees of freedom


def test_logprobs_and_top_logprobs() -> None:
    rows = [SampleRow(params=params(logprobs=True, top_logprobs=3), index=0), SampleRow(params=params(), index=0)]
    out = sample_batch(LOGITS[:2], rows, INPUTS[:2])
    assert out.chosen_logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    expected = LOGITS[0] - mx.logsumexp(LOGITS[0])
    assert math.isclose(out.chosen_logprobs.tolist()[0], expected[1].item(), rel_tol=1e-6)
    top = sorted(zip(out.top_logprobs.tolist()[0], out.top_ids.tolist()[0]), reverse=True)
    assert [t for _, t in top] == [1, 4, 7]


def test_repetition_penalty_matches_mlx_lm() -> None:
    history = [1, 4, 4, 0, 7]
    p = params(repetition_penalty=1.7, logprobs=True, top_logprobs=8)
    # The row's current input (3) is part of the context, as in mlx-lm.
    ours = sample_batch(LOGITS[0:1], [SampleRow(params=p, index=0, preceding=tuple(history))], mx.array([3], dtype=mx.uint32))
    theirs = make_repetition_penalty(1.7, 20)(mx.array(history + [3]), LOGITS[0:1])
    theirs = (theirs - mx.logsumexp(theirs, axis=-1, keepdims=True))[0].tolist()
    assert ours.top_ids is not None and ours.top_logprobs is not None
    got = dict(zip(ours.top_ids.tolist()[0], ours.top_logprobs.tolist()[0]))
    assert sorted(got) == list(range(8))
    assert all(math.isclose(got[t], theirs[t], rel_tol=1e-5, abs_tol=1e-6) for t in range(8)), (got, theirs)
    # Penalised tokens lost mass; the untouched ones gained it.
    plain = (LOGITS[0] - mx.logsumexp(LOGITS[0])).tolist()
    assert got[1] < plain[1] and got[6] > plain[6]


@pytest.mark.parametrize(
    "bad",
    [{"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"min_p": 1.0}, {"repetition_penalty": 0.0}, {"top_logprobs": 21}],
)
def test_invalid_settings_are_refused_with_the_field_named(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        resolve_sampling(GenerationParams(**bad))  # type: ignore[arg-type]


def test_defaults() -> None:
    p = resolve_sampling(GenerationParams())
    assert p.temperature == 1.0 and not p.greedy and 0 <= p.seed < 2**64
    assert resolve_sampling(GenerationParams(temperature=0.0)).greedy
    assert resolve_sampling(GenerationParams(top_k=1)).greedy
