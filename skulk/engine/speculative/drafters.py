"""Drafters: cheap guesses of the target's next tokens, kept in step with the target.

Theory of operation
-------------------
A drafter follows one request. Its contract, per speculative round:

1. ``extend(tokens)``: the request's tokens (prompt and generated) the
   drafter has not been told about yet, up to but excluding the round's bonus
   token; ``known`` counts the tokens told so far, so the caller passes
   ``context[drafter.known:]``. The engine may have decoded some tokens
   without speculating (for example while the batch was large); the drafter
   catches up on them.
2. ``propose(bonus, k, ...)``: up to ``k`` draft tokens continuing
   ``context + [bonus]``, and, when sampling, the log-probabilities they were
   drawn from. Fewer than ``k`` (even none) is allowed: the round then
   verifies what there is.
3. ``commit(drafts, accepted, hidden)`` (after every round that verified
   drafts, and after every round for MTP): the target accepted the first
   ``accepted`` drafts; ``hidden`` holds the target's hidden states at the
   positions of ``[bonus] + drafts[:accepted]`` (MTP needs them). The
   drafter rolls its own cache back past the rejected drafts.

Two drafters:

- ``DraftModelDrafter``: a smaller model sharing the tokenizer, with its own
  KV cache. Its cache lags one token behind after a fully accepted round (the
  last draft was never fed); that token is fed first next round.
- ``MtpDrafter``: the checkpoint's MTP heads (``skulk.engine.speculative.mtp``)
  fed the target's hidden states. Each round first runs the pairs (hidden,
  next token) the last verify produced through the MTP block, then chains on
  its own output for the remaining drafts; chained positions are trimmed from
  the MTP cache right away, so the cache only ever holds pairs built from
  real target hidden states. Without a hidden state for the position before
  the bonus (right after prefill, or after plain decode steps) it proposes
  nothing; the verify then returns the hidden state it needs.

``agree`` (optional) makes drafting symmetric across tensor-parallel ranks:
every draft token is passed through it, and it returns rank 0's choice on
every rank, so all ranks feed identical tokens to their sharded drafters.

Invariants: after ``commit`` the drafter's cache covers a prefix of the
request's committed tokens (plus at most one pending token); proposals are
never longer than asked; greedy proposals consume no randomness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from skulk.engine.sampling import SamplingParams
from skulk.engine.speculative.acceptance import PURPOSE_DRAFT, draw_from_logprobs, round_key, sampling_logprobs
from skulk.engine.speculative.mtp import MtpHeads
from skulk.engine.speculative.target import TargetView, cache_length, trim_cache

__all__ = ["Proposal", "Drafter", "DraftModelDrafter", "MtpDrafter", "PREFILL_STEP_TOKENS"]

PREFILL_STEP_TOKENS = 512
Agree = Callable[[mx.array], mx.array]


@dataclass
class Proposal:
    """Drafted tokens (possibly none) and, when sampling, their (k, V) log-probs.

    ``drafted`` may still be unevaluated (a *lazy* proposal, so the caller can
    queue the verify forward behind the draft forwards before waiting for
    either); ``tokens`` reads it back, evaluating it if needed.
    """

    drafted: mx.array | None = None
    q_logprobs: mx.array | None = None
    _tokens: list[int] | None = None

    @classmethod
    def of(cls, tokens: list[int]) -> Proposal:
        """A proposal of known tokens (a pipeline follower's copy of rank 0's drafts)."""
        array = mx.array(tokens, dtype=mx.uint32) if tokens else None
        return cls(drafted=array, _tokens=[int(t) for t in tokens])

    @property
    def count(self) -> int:
        return 0 if self.drafted is None else int(self.drafted.shape[0])

    @property
    def tokens(self) -> list[int]:
        if self._tokens is None:
            self._tokens = [] if self.drafted is None else [int(t) for t in self.drafted.tolist()]
        return self._tokens


def _pick(logits: mx.array, sampling: SamplingParams | None, seed_index: tuple[int, int], step: int) -> tuple[mx.array, mx.array | None]:
    """Choose one draft token from ``logits`` (1, V): argmax, or a draw from q."""
    if sampling is None or sampling.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.uint32), None
    q = sampling_logprobs(logits, sampling)
    seed, index = seed_index
    return draw_from_logprobs(q, round_key(seed, index, PURPOSE_DRAFT, step)), q


class Drafter:
    """Interface (see the module docstring)."""

    kind = "none"
    needs_hidden = False

    known = 0

    def extend(self, tokens: list[int]) -> None:
        raise NotImplementedError

    def propose(
        self,
        bonus: int,
        k: int,
        sampling: SamplingParams | None,
        seed_index: tuple[int, int],
        agree: Agree | None = None,
        lazy: bool = False,
    ) -> Proposal:
        """Draft up to ``k`` tokens after ``bonus`` (``lazy``: do not wait for them)."""
        raise NotImplementedError

    def commit(self, drafts: list[int], accepted: int, hidden: mx.array | None) -> None:
        raise NotImplementedError


class DraftModelDrafter(Drafter):
    """Drafts with a smaller model (``draft``: a ``TargetView`` over it)."""

    kind = "draft_model"

    def __init__(self, draft: TargetView, new_cache: Callable[[], list[Any]]) -> None:
        self.draft = draft
        self._new_cache = new_cache
        self.cache = new_cache()
        self.known = 0  # context tokens fed or pending
        self.pending: list[int] = []

    def extend(self, tokens: list[int]) -> None:
        self.pending.extend(int(t) for t in tokens)
        self.known += len(tokens)

    def propose(
        self,
        bonus: int,
        k: int,
        sampling: SamplingParams | None,
        seed_index: tuple[int, int],
        agree: Agree | None = None,
        lazy: bool = False,
    ) -> Proposal:
        assert k >= 1, k
        feed = self.pending + [int(bonus)]
        self.pending = []
        # Long catch-ups go in prefill-sized chunks; only the last yields logits.
        while len(feed) > PREFILL_STEP_TOKENS:
            chunk, feed = feed[:PREFILL_STEP_TOKENS], feed[PREFILL_STEP_TOKENS:]
            logits, _ = self.draft.forward(mx.array(chunk, dtype=mx.uint32), self.cache)
            mx.eval([c.state for c in self.cache])
        inputs = mx.array(feed, dtype=mx.uint32)
        tokens: list[mx.array] = []
        qs: list[mx.array] = []
        for step in range(k):
            logits, _ = self.draft.forward(inputs, self.cache)
            assert logits is not None, "the draft model returned no logits on this rank"
            token, q = _pick(logits[-1:], sampling, seed_index, step)
            if agree is not None:
                token = agree(token)
            tokens.append(token)
            if q is not None:
                qs.append(q)
            inputs = token
            if step == k - 1:
                break
        drafted = mx.concatenate(tokens)
        q_all = mx.concatenate(qs) if qs else None
        work = [drafted, q_all if q_all is not None else [], [c.state for c in self.cache]]
        if lazy:
            mx.async_eval(*work)
            return Proposal(drafted=drafted, q_logprobs=q_all)
        mx.eval(*work)
        proposal = Proposal(drafted=drafted, q_logprobs=q_all)
        proposal.tokens  # noqa: B018 (read back now)
        return proposal

    def commit(self, drafts: list[int], accepted: int, hidden: mx.array | None) -> None:
        k = len(drafts)
        assert 0 <= accepted <= k, (accepted, k)
        # The cache holds ... bonus, d_1 .. d_{k-1}; keep bonus, d_1 .. d_accepted.
        if accepted < k:
            trim_cache(self.cache, k - 1 - accepted)
        else:
            self.pending = [drafts[-1]]
        self.known += 1 + accepted  # the bonus and the accepted drafts


class MtpDrafter(Drafter):
    """Drafts with the target's MTP heads (see the module docstring)."""

    kind = "mtp"
    needs_hidden = True

    def __init__(self, heads: MtpHeads, target: TargetView) -> None:
        assert target.supports_hidden, "MTP drafting needs a target that exposes hidden states"
        self.heads = heads
        self.target = target
        self.cache = heads.new_cache()
        self.known = 0
        # Pairs waiting to enter the MTP cache: hidden rows and their next tokens
        # (one token short: the last pair's next token is the coming bonus).
        self.pending_hidden: mx.array | None = None
        self.pending_tokens: list[int] = []
        self.gaps = 0  # times context arrived without hidden states

    def extend(self, tokens: list[int]) -> None:
        if tokens:
            # Tokens decoded without us: their hidden states are gone, so pending
            # pairs no longer end right before the bonus. Start afresh from the
            # next verify (the MTP cache keeps its older, still valid pairs).
            self.pending_hidden = None
            self.pending_tokens = []
            self.gaps += 1
            self.known += len(tokens)

    def seed_hidden(self, tokens: list[int], hidden: mx.array) -> None:
        """Tell ``tokens`` (all new) with the target's hidden states at their last positions.

        Used after a prefill that returned hidden states: ``hidden`` (n, H)
        covers the last ``n`` of ``tokens``.
        """
        n = int(hidden.shape[0])
        assert 1 <= n <= len(tokens), (n, len(tokens))
        self.known += len(tokens)
        self.pending_hidden = hidden
        self.pending_tokens = [int(t) for t in tokens[len(tokens) - n + 1 :]]

    def propose(
        self,
        bonus: int,
        k: int,
        sampling: SamplingParams | None,
        seed_index: tuple[int, int],
        agree: Agree | None = None,
        lazy: bool = False,
    ) -> Proposal:
        assert k >= 1, k
        if self.pending_hidden is None:
            return Proposal.of([])
        tokens_in = mx.array(self.pending_tokens + [int(bonus)], dtype=mx.uint32)
        hidden_in = self.pending_hidden[None]
        self.pending_hidden, self.pending_tokens = None, []
        embeds = self.target.embed(tokens_in)[None]
        drafted: list[mx.array] = []
        qs: list[mx.array] = []
        for step in range(k):
            module = self.heads.module_for(step)
            cache = self.cache[min(step, self.heads.count - 1)]
            g, normed = module(hidden_in, embeds, cache)
            head = getattr(module, "head", None)
            logits = head(normed[:, -1]) if head is not None else self.target.head(normed[:, -1])
            token, q = _pick(logits, sampling, seed_index, step)
            if agree is not None:
                token = agree(token)
            drafted.append(token)
            if q is not None:
                qs.append(q)
            if step == k - 1:
                break
            hidden_in = g[:, -1:]
            embeds = self.target.embed(token)[None]
        out = mx.concatenate(drafted)
        q_all = mx.concatenate(qs) if qs else None
        work = [out, q_all if q_all is not None else [], [c.state for cache in self.cache for c in cache]]
        if lazy:
            mx.async_eval(*work)
        else:
            mx.eval(*work)
        # Chained steps wrote positions built from MTP (not target) hidden states.
        # (Trimming only moves offsets, so it is safe while the writes are pending.)
        for step in range(1, len(drafted)):
            trim_cache(self.cache[min(step, self.heads.count - 1)], 1)
        proposal = Proposal(drafted=out, q_logprobs=q_all)
        if not lazy:
            proposal.tokens  # noqa: B018 (read back now)
        return proposal

    def commit(self, drafts: list[int], accepted: int, hidden: mx.array | None) -> None:
        assert 0 <= accepted <= len(drafts), (accepted, len(drafts))
        assert hidden is not None and int(hidden.shape[0]) == accepted + 1, (
            None if hidden is None else hidden.shape,
            accepted,
        )
        self.pending_hidden = hidden
        self.pending_tokens = [int(t) for t in drafts[:accepted]]
        self.known += 1 + accepted  # the bonus and the accepted drafts

    @property
    def cache_positions(self) -> int:
        return cache_length(self.cache[0])
