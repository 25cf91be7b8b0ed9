"""Per-request sampling, vectorised over a decode batch.

Theory of operation
-------------------
Every row of a decode batch carries its own request's settings. One call turns
the batch's logits into one token per row, all inside the MLX graph (nothing is
materialised here, so the engine can overlap the next step with this one):

1. repetition penalty over the last ``REPETITION_CONTEXT`` tokens (sign-aware,
   as in mlx-lm: negative logits are multiplied, positive ones divided);
   then, for constrained rows, the grammar's token bitmask (``skulk.engine.grammar``):
   forbidden tokens get -inf, so neither sampling nor greedy can pick them;
2. log-probabilities ``logits - logsumexp(logits)`` (what ``logprobs`` report);
3. greedy rows take the argmax (exactly mlx-lm's greedy sampler);
4. sampled rows apply top-p, then min-p, then top-k masks (mlx-lm's order),
   divide by the temperature and take ``argmax(x + gumbel)``, i.e. a
   categorical draw. Each row draws its Gumbel noise from a key derived from
   (request seed, token index), so a seeded request produces the same tokens
   whatever else shares its batch.

Invariants: greedy rows never consume randomness; a row's output depends only
on its own logits, settings, seed and position.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import mlx.core as mx

from skulk.core.tasks import GenerationParams

__all__ = [
    "REPETITION_CONTEXT",
    "MAX_TOP_LOGPROBS",
    "SamplingParams",
    "SampleRow",
    "SampleOut",
    "resolve_sampling",
    "sample_batch",
    "apply_bitmask",
]

REPETITION_CONTEXT = 20
MAX_TOP_LOGPROBS = 20
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings of one request (``temperature == 0``: greedy)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    repetition_penalty: float
    logprobs: bool
    top_logprobs: int

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


def resolve_sampling(params: GenerationParams, default_temperature: float = 1.0) -> SamplingParams:
    """Validate ``params`` and fill defaults; raises ``ValueError`` naming the field.

    ``temperature=None`` means ``default_temperature`` (OpenAI's default, 1.0);
    ``seed=None`` draws a fresh seed from the OS.
    """
    temperature = default_temperature if params.temperature is None else float(params.temperature)
    if not (0.0 <= temperature <= 100.0) or math.isnan(temperature):
        raise ValueError(f"temperature must be in [0, 100], got {params.temperature}")
    if not (0.0 < params.top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {params.top_k}")
    if not (0.0 <= params.min_p < 1.0):
        raise ValueError(f"min_p must be in [0, 1), got {params.min_p}")
    penalty = 1.0 if params.repetition_penalty is None else float(params.repetition_penalty)
    if not (0.0 < penalty <= 100.0):
        raise ValueError(f"repetition_penalty must be in (0, 100], got {params.repetition_penalty}")
    if not (0 <= params.top_logprobs <= MAX_TOP_LOGPROBS):
        raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {params.top_logprobs}")
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
    return SamplingParams(
        temperature=temperature,
        top_p=float(params.top_p),
        top_k=int(params.top_k),
        min_p=float(params.min_p),
        seed=seed & _U64,
        repetition_penalty=penalty,
        logprobs=bool(params.logprobs or params.top_logprobs > 0),
        top_logprobs=int(params.top_logprobs),
    )


@dataclass(frozen=True)
class SampleRow:
    """What the sampler needs to know about one batch row this step.

    ``index`` is the position of the token being drawn among the request's
    generated tokens (0 for the first), used to derive the row's random key.
    ``preceding`` lists the tokens before the row's current input token (only
    the last ``REPETITION_CONTEXT - 1`` are used, and only with a penalty).
    """

    params: SamplingParams
    index: int
    preceding: tuple[int, ...] = ()


@dataclass
class SampleOut:
    """Lazy results: ``tokens`` (B,) uint32; logprob arrays when any row asked."""

    tokens: mx.array
    chosen_logprobs: mx.array | None = None
    top_ids: mx.array | None = None
    top_logprobs: mx.array | None = None


def _row_key(seed: int, index: int) -> mx.array:
    mixed = (seed * 0x5851F42D4C957F2D + (index + 1) * 0x14057B7EF767814F) & _U64
    mixed ^= mixed >> 29
    return mx.random.key(mixed)


def _apply_repetition_penalty(logits: mx.array, rows: list[SampleRow], inputs: mx.array) -> mx.array:
    width = REPETITION_CONTEXT - 1
    host = []
    factors = []
    for row in rows:
        prev = list(row.preceding[-width:]) if row.params.repetition_penalty != 1.0 else []
        host.append([-1] * (width - len(prev)) + prev)
        factors.append(row.params.repetition_penalty)
    # Pads (-1) become the row's own current input token: a duplicate index
    # then writes the very value its twin writes, so the scatter is well defined.
    current = inputs.astype(mx.int32)[:, None]
    idx = mx.array(host, dtype=mx.int32)
    idx = mx.concatenate([mx.where(idx < 0, current, idx), current], axis=1)
    penalty = mx.array(factors, dtype=logits.dtype)[:, None]
    selected = mx.take_along_axis(logits, idx, axis=1)
    selected = mx.where(selected < 0, selected * penalty, selected / penalty)
    return mx.put_along_axis(logits, idx, selected, axis=1)


def apply_bitmask(logits: mx.array, bitmask: mx.array) -> mx.array:
    """``logits`` (B, V) with -inf wherever bit ``v`` of row ``b`` of ``bitmask`` (B, W int32) is clear."""
    vocab = logits.shape[1]
    assert bitmask.ndim == 2 and bitmask.shape[0] == logits.shape[0], (bitmask.shape, logits.shape)
    assert bitmask.shape[1] * 32 >= vocab, (bitmask.shape, vocab)
    idx = mx.arange(vocab, dtype=mx.int32)
    words = mx.take(bitmask, idx // 32, axis=1)
    allowed = mx.bitwise_and(mx.right_shift(words, idx % 32), 1) == 1
    return mx.where(allowed, logits, mx.array(-math.inf, dtype=logits.dtype))


def sample_batch(logits: mx.array, rows: list[SampleRow], inputs: mx.array, bitmask: mx.array | None = None) -> SampleOut:
    """Draw one token per row of ``logits`` (B, V) following each row's settings.

    ``inputs`` (B,) are the tokens that produced these logits (the current
    inputs, needed by the repetition penalty). ``bitmask`` (B, ceil(V/32)
    int32), when given, forbids every token whose bit is clear in its row.
    Returns lazy arrays.
    """
    assert logits.ndim == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
    vocab = logits.shape[1]
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        logits = _apply_repetition_penalty(logits, rows, inputs)
    if bitmask is not None:
        logits = apply_bitmask(logits, bitmask)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    greedy_tokens = mx.argmax(logprobs, axis=-1)
    sampled_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not sampled_rows:
        tokens = greedy_tokens
    else:
        tokens = mx.where(
            mx.array([not r.params.greedy for r in rows]),
            _draw(logprobs, rows, vocab),
            greedy_tokens,
        )
    out = SampleOut(tokens=tokens)
    if any(r.params.logprobs for r in rows):
        out.chosen_logprobs = mx.take_along_axis(logprobs, tokens[:, None].astype(mx.int32), axis=1)[:, 0]
        k = max(r.params.top_logprobs for r in rows)
        if k > 0:
            k = min(k, vocab)
            top_ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
            out.top_ids = top_ids
            out.top_logprobs = mx.take_along_axis(logprobs, top_ids, axis=1)
    return out


def _draw(logprobs: mx.array, rows: list[SampleRow], vocab: int) -> mx.array:
    neg_inf = mx.array(-math.inf, dtype=logprobs.dtype)
    x = logprobs
    if any(r.params.top_p < 1.0 for r in rows if not r.params.greedy):
        top_p = mx.array([r.params.top_p if not r.params.greedy else 1.0 for r in rows])[:, None]
        desc = -mx.sort(-x, axis=-1)
        probs = mx.exp(desc)
        before = mx.cumsum(probs, axis=-1) - probs
        # Keep every token whose preceding mass is below top_p (at least one).
        keep_n = mx.maximum(mx.sum(before < top_p, axis=-1, keepdims=True), 1)
        threshold = mx.take_along_axis(desc, keep_n - 1, axis=-1)
        x = mx.where(x < threshold, neg_inf, x)
    if any(r.params.min_p > 0.0 for r in rows if not r.params.greedy):
        log_min_p = mx.array(
            [math.log(r.params.min_p) if r.params.min_p > 0 and not r.params.greedy else -math.inf for r in rows]
        )[:, None]
        top = mx.max(x, axis=-1, keepdims=True)
        x = mx.where(x < top + log_min_p, neg_inf, x)
    if any(0 < r.params.top_k < vocab for r in rows if not r.params.greedy):
        ks = mx.array([r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows])[:, None]
        desc = -mx.sort(-x, axis=-1)
        kth = mx.take_along_axis(desc, ks - 1, axis=-1)
        x = mx.where(x < kth, neg_inf, x)
    temps = mx.array([r.params.temperature if not r.params.greedy else 1.0 for r in rows], dtype=x.dtype)
    noise = mx.stack(
        [
            mx.random.gumbel(shape=(vocab,), key=_row_key(r.params.seed, r.index))
            if not r.params.greedy
            else mx.zeros((vocab,))
            for r in rows
        ]
    ).astype(x.dtype)
    return mx.argmax(x / temps[:, None] + noise, axis=-1)
