"""Deciding which drafted tokens the target accepts: greedy and sampled.

Theory of operation
-------------------
A speculative round feeds the target ``[bonus, d_1, ..., d_k]`` in one forward
pass and gets ``k + 1`` rows of logits: row ``j`` is the target's distribution
for the token after ``d_j`` (row 0: after the bonus). This module turns those
rows (and, when sampling, the drafter's rows) into the tokens to commit.

Greedy (``temperature == 0`` or ``top_k == 1``): accept the longest prefix of
drafts equal to the target's argmax, then commit the target's argmax at the
first disagreement (or after the last draft). The committed tokens are exactly
what one-token-at-a-time greedy decoding produces, provided the target's
forward computes the same argmax for a token whether it sees it alone or
inside a block of ``k + 1`` (true for the models Skulk runs: their argmax
margins dwarf float32 reduction-order noise).

Sampled (Leviathan et al. 2023; Chen et al. 2023): with ``p_j`` the target's
and ``q_j`` the drafter's *sampling* distributions (the same temperature,
top-p, min-p and top-k applied to both, in the engine's order), accept ``d_j``
with probability ``min(1, p_j(d_j) / q_j(d_j))``; at the first rejection draw
the committed token from the residual ``max(0, p_j - q_j)`` renormalised; when
every draft is accepted draw one more token from ``p_k``. Every committed token
is then distributed exactly as the target alone would sample it.

``sampling_logprobs`` reproduces ``skulk.engine.sampling``'s masks (top-p,
then min-p, then top-k, all on the untempered log-probabilities, then divide by
the temperature), so the distribution speculation preserves is the one the
engine samples from without speculation.

Randomness comes from keys derived from (request seed, token index, purpose),
so a seeded request is reproducible for a fixed depth.

Invariants: ``0 <= accepted <= k``; greedy decisions consume no randomness;
the committed list is never empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from skulk.engine.sampling import SamplingParams

__all__ = [
    "Decision",
    "sampling_logprobs",
    "draw_from_logprobs",
    "accept_greedy",
    "accept_sampled",
    "round_key",
    "PURPOSE_DRAFT",
    "PURPOSE_ACCEPT",
    "PURPOSE_RESIDUAL",
    "PURPOSE_BONUS",
]

_U64 = (1 << 64) - 1
# Distinct streams of randomness per round (mixed into the key).
PURPOSE_DRAFT = 1
PURPOSE_ACCEPT = 2
PURPOSE_RESIDUAL = 3
PURPOSE_BONUS = 4


@dataclass(frozen=True)
class Decision:
    """The outcome of one verify: ``accepted`` drafts, then ``tokens`` to commit.

    ``tokens`` is ``drafts[:accepted] + [next]`` where ``next`` is the target's
    own token at the first disagreement (the next round's bonus).
    """

    accepted: int
    tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        assert self.accepted >= 0 and len(self.tokens) == self.accepted + 1, (self.accepted, self.tokens)


def round_key(seed: int, index: int, purpose: int, sub: int = 0) -> mx.array:
    """An MLX PRNG key for (request ``seed``, token ``index``, ``purpose``, ``sub``).

    ``index`` is the generated-token index the round starts at, so keys never
    repeat within a request.
    """
    assert index >= 0 and purpose > 0 and sub >= 0, (index, purpose, sub)
    mixed = (seed ^ 0x9E3779B97F4A7C15) & _U64
    for part in (index + 1, purpose, sub + 1):
        mixed = (mixed * 0xBF58476D1CE4E5B9 + part * 0x94D049BB133111EB) & _U64
        mixed ^= mixed >> 31
    return mx.random.key(mixed)


def sampling_logprobs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Log-probabilities (N, V) of the distribution the engine samples from.

    ``logits`` (N, V) are raw model outputs for one request (no repetition
    penalty: speculation is not used with one). Applies, like
    ``skulk.engine.sampling``, top-p, then min-p, then top-k to the
    untempered log-probabilities, divides by the temperature and renormalises.
    Masked tokens get ``-inf``. ``params`` must not be greedy.
    """
    assert logits.ndim == 2, logits.shape
    assert not params.greedy, "greedy requests are verified with accept_greedy"
    vocab = logits.shape[1]
    neg_inf = mx.array(-math.inf, dtype=logits.dtype)
    x = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if params.top_p < 1.0:
        desc = -mx.sort(-x, axis=-1)
        probs = mx.exp(desc)
        before = mx.cumsum(probs, axis=-1) - probs
        keep_n = mx.maximum(mx.sum(before < params.top_p, axis=-1, keepdims=True), 1)
        threshold = mx.take_along_axis(desc, keep_n - 1, axis=-1)
        x = mx.where(x < threshold, neg_inf, x)
    if params.min_p > 0.0:
        top = mx.max(x, axis=-1, keepdims=True)
        x = mx.where(x < top + math.log(params.min_p), neg_inf, x)
    if 0 < params.top_k < vocab:
        desc = -mx.sort(-x, axis=-1)
        kth = desc[:, params.top_k - 1 : params.top_k]
        x = mx.where(x < kth, neg_inf, x)
    x = x / params.temperature
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def draw_from_logprobs(logprobs: mx.array, key: mx.array) -> mx.array:
    """One categorical draw per row of ``logprobs`` (N, V); returns (N,) uint32."""
    assert logprobs.ndim == 2, logprobs.shape
    noise = mx.random.gumbel(shape=logprobs.shape, key=key).astype(logprobs.dtype)
    return mx.argmax(logprobs + noise, axis=-1).astype(mx.uint32)


def accept_greedy(drafts: list[int], target_argmax: list[int]) -> Decision:
    """Greedy verify: ``target_argmax`` has ``len(drafts) + 1`` entries."""
    assert len(target_argmax) == len(drafts) + 1, (len(drafts), len(target_argmax))
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == target_argmax[accepted]:
        accepted += 1
    return Decision(accepted=accepted, tokens=tuple(drafts[:accepted]) + (int(target_argmax[accepted]),))


def accept_sampled(
    p_logprobs: mx.array,
    q_logprobs: mx.array,
    drafts: list[int],
    *,
    seed: int,
    index: int,
) -> Decision:
    """Sampled verify by rejection sampling (see the module docstring).

    Inputs: ``p_logprobs`` (k + 1, V), the target's sampling log-probabilities
    for the positions after the bonus and after each draft; ``q_logprobs``
    (k, V), the drafter's sampling log-probabilities the drafts were drawn
    from; ``drafts`` (k tokens); the request ``seed`` and the generated-token
    ``index`` of the round's first new token (keys derive from both).
    Output: a ``Decision`` whose tokens are distributed as the target's.
    """
    k = len(drafts)
    assert p_logprobs.ndim == 2 and p_logprobs.shape[0] == k + 1, (p_logprobs.shape, k)
    bonus_key = round_key(seed, index, PURPOSE_BONUS)
    if k == 0:
        token = int(draw_from_logprobs(p_logprobs, bonus_key).item())
        return Decision(accepted=0, tokens=(token,))
    assert q_logprobs.shape == (k, p_logprobs.shape[1]), (q_logprobs.shape, p_logprobs.shape)
    rows = mx.arange(k)
    cols = mx.array(drafts, dtype=mx.int32)
    p = mx.exp(p_logprobs[:k])
    q = mx.exp(q_logprobs)
    p_d = p[rows, cols]
    q_d = q[rows, cols]
    u = mx.random.uniform(shape=(k,), key=round_key(seed, index, PURPOSE_ACCEPT))
    # u < p/q without dividing (q_d > 0: the draft was drawn from q).
    accept = u * q_d < p_d
    residual = mx.maximum(p - q, 0.0)
    mass = mx.sum(residual, axis=-1, keepdims=True)
    # A residual with no mass only arises when p == q (then rejection has
    # probability zero); fall back to p so the draw stays well defined.
    residual_lp = mx.where(mass > 0, mx.log(residual) - mx.log(mx.maximum(mass, 1e-30)), p_logprobs[:k])
    resampled = draw_from_logprobs(residual_lp, round_key(seed, index, PURPOSE_RESIDUAL))
    bonus = draw_from_logprobs(p_logprobs[k:], bonus_key)
    mx.eval(accept, resampled, bonus)
    flags = accept.tolist()
    accepted = 0
    while accepted < k and flags[accepted]:
        accepted += 1
    nxt = int(bonus.item()) if accepted == k else int(resampled[accepted].item())
    return Decision(accepted=accepted, tokens=tuple(drafts[:accepted]) + (nxt,))
