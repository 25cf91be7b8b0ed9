"""One bonus-driven speculative round, and a single-stream decoder built from rounds.

Theory of operation
-------------------
Between rounds a request has a *bonus* token: committed (already emitted)
but not yet fed to the target. A round:

1. the drafter proposes up to ``k`` tokens continuing ``context + [bonus]``;
2. ONE target forward over ``[bonus, d_1 .. d_j]`` (``j <= k`` drafts) gives
   ``j + 1`` rows of logits;
3. the decider (rank 0) accepts the longest valid prefix ``d_1 .. d_m`` and
   takes the target's own token ``t`` at position ``m`` (greedy: argmax;
   sampled: residual or bonus draw, see ``acceptance``);
4. the target's KV cache drops the ``j - m`` rejected positions; the drafter
   rolls back likewise;
5. ``d_1 .. d_m, t`` are committed and ``t`` is the next round's bonus.

No verify work is wasted: the position after the last accepted token is
always scored by the same forward, and its token is the next bonus. A round
with no drafts is exactly one plain decode step.

``decide`` is pluggable so that distributed callers can broadcast rank 0's
decision (``skulk.engine.speculative.collective``); the default decides
locally.

Invariants: the target cache grows by exactly ``m + 1`` positions per round;
every committed token is what the target would have produced (greedy) or is
distributed as the target's (sampled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from skulk.engine.sampling import SamplingParams
from skulk.engine.speculative.acceptance import Decision, accept_greedy, accept_sampled, sampling_logprobs
from skulk.engine.speculative.drafters import Agree, Drafter, MtpDrafter, Proposal
from skulk.engine.speculative.target import TargetView, trim_cache

__all__ = ["RoundOutcome", "Decide", "decide_locally", "speculative_round", "StreamResult", "decode_stream"]

Decide = Callable[[mx.array | None, Proposal, SamplingParams | None, tuple[int, int]], Decision]


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did: ``drafted`` proposals, ``accepted`` of them, ``tokens`` committed."""

    drafted: int
    accepted: int
    tokens: tuple[int, ...]


def decide_locally(
    logits: mx.array | None, proposal: Proposal, sampling: SamplingParams | None, seed_index: tuple[int, int]
) -> Decision:
    """Rank-0 decision from the verify logits (j + 1, V)."""
    assert logits is not None, "the decider needs the verify logits"
    if sampling is None or sampling.greedy:
        argmax = mx.argmax(logits, axis=-1)
        mx.eval(argmax, proposal.drafted if proposal.drafted is not None else [])
        return accept_greedy(proposal.tokens, [int(t) for t in argmax.tolist()])
    drafts = proposal.tokens
    p = sampling_logprobs(logits, sampling)
    q = proposal.q_logprobs if drafts else None
    if q is None:
        q = mx.zeros((0, p.shape[1]), dtype=p.dtype)
    seed, index = seed_index
    return accept_sampled(p, q, drafts, seed=seed, index=index)


def speculative_round(
    target: TargetView,
    cache: list,
    drafter: Drafter | None,
    bonus: int,
    k: int,
    sampling: SamplingParams | None,
    seed_index: tuple[int, int],
    *,
    decide: Decide = decide_locally,
    agree: Agree | None = None,
    proposal: Proposal | None = None,
) -> RoundOutcome:
    """Run one round (module docstring). ``k == 0`` or no drafter: a plain step.

    ``seed_index`` is (request seed, generated-token index of the bonus's
    successor). ``proposal`` skips drafting (pipeline followers receive rank
    0's drafts instead of drafting). Returns the outcome; caches are updated.
    """
    assert k >= 0, k
    if proposal is None:
        proposal = Proposal.of([])
        if drafter is not None and k > 0:
            # Locally the drafts stay lazy: the verify forward is queued behind
            # them and one wait covers both (collectives need eager steps).
            lazy = not target.eager and agree is None
            proposal = drafter.propose(bonus, k, sampling, seed_index, agree, lazy=lazy)
    assert proposal.count <= k, (proposal.count, k)
    want_hidden = drafter is not None and drafter.needs_hidden
    head = mx.array([int(bonus)], dtype=mx.uint32)
    inputs = head if proposal.drafted is None else mx.concatenate([head, proposal.drafted])
    logits, hidden = target.forward(inputs, cache, want_hidden=want_hidden)
    decision = decide(logits, proposal, sampling, seed_index)
    drafts = proposal.tokens
    m = decision.accepted
    assert 0 <= m <= len(drafts), (m, len(drafts))
    trim_cache(cache, len(drafts) - m)
    if drafter is not None:
        if isinstance(drafter, MtpDrafter):
            assert hidden is not None
            drafter.commit(drafts, m, hidden[: m + 1])
        elif drafts:
            drafter.commit(drafts, m, None)
    return RoundOutcome(drafted=len(drafts), accepted=m, tokens=decision.tokens)


@dataclass
class StreamResult:
    """Tokens of one single-stream generation and its speculation counters."""

    tokens: list[int]
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def decode_stream(
    target: TargetView,
    new_cache: Callable[[], list],
    prompt: list[int],
    max_tokens: int,
    *,
    drafter: Drafter | None = None,
    depth: int = 0,
    sampling: SamplingParams | None = None,
    eos: frozenset[int] = frozenset(),
) -> StreamResult:
    """Generate ``max_tokens`` tokens (or until an EOS) for ``prompt``, one stream.

    ``depth == 0`` or no drafter: plain decoding (one token per forward).
    The prompt is prefilled in one pass; the first token comes from its last
    logits, as in plain decoding. Used by the tests; the runner, the
    benchmark and the tuner go through ``SpeculativeEngine`` instead.
    """
    assert prompt and max_tokens >= 1, (len(prompt), max_tokens)
    cache = new_cache()
    seed = sampling.seed if sampling is not None else 0
    want_hidden = drafter is not None and drafter.needs_hidden
    logits, hidden = target.forward(mx.array(prompt, dtype=mx.uint32), cache, want_hidden=want_hidden)
    assert logits is not None
    first = decide_locally(logits[-1:], Proposal.of([]), sampling, (seed, 0)).tokens[0]
    out = StreamResult(tokens=[first])
    if isinstance(drafter, MtpDrafter):
        assert hidden is not None
        drafter.seed_hidden(prompt, hidden)
    context = list(prompt)
    while len(out.tokens) < max_tokens and out.tokens[-1] not in eos:
        bonus = out.tokens[-1]
        if drafter is not None:
            drafter.extend(context[drafter.known :])
        k = min(depth, max_tokens - len(out.tokens) - 1) if drafter is not None else 0
        outcome = speculative_round(target, cache, drafter, bonus, k, sampling, (seed, len(out.tokens)))
        context.append(bonus)
        context.extend(outcome.tokens[:-1])
        out.rounds += 1
        out.drafted += outcome.drafted
        out.accepted += outcome.accepted
        out.per_round.append(len(outcome.tokens))
        for token in outcome.tokens:
            out.tokens.append(token)
            if token in eos or len(out.tokens) >= max_tokens:
                break
    return out
