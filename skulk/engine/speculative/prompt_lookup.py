"""Prompt-lookup drafting: guess the next tokens by copying what followed the same n-gram earlier.

Theory of operation
-------------------
When a model rewrites, summarises or edits a text it was given, long spans of
its output repeat spans of its input. The drafter (vLLM's and llama.cpp's
"n-gram" or "prompt lookup" speculation) needs no model: it takes the last
``n`` tokens of the request (prompt and output so far, plus the round's
bonus token), finds the most recent earlier place where the same ``n``
tokens occurred, and proposes the up to ``k`` tokens that followed there,
trying ``n = max_ngram`` down to ``min_ngram`` and proposing nothing when no
n-gram recurs. The target verifies the proposal in one forward pass as for
any drafter (``skulk.engine.speculative.rounds``), so:

- under greedy decoding the committed tokens are exactly plain decoding's;
- under sampling the proposal is a point mass ``q`` (probability 1 on the
  copied token), and the usual speculative acceptance (accept with
  probability ``min(1, p/q) = p(token)``, else draw from the normalised
  ``max(0, p - q)``) keeps the target's distribution exactly.

Lookups are O(1) per n: an index maps every n-gram that has a continuation
to its latest start, updated as tokens arrive. Drafting costs microseconds,
so a round costs one verify pass, and a round whose proposal is empty is a
plain decode step.

On tensor-parallel ranks every rank holds the same context and computes the
same proposal; the count and each token still pass through ``agree`` (rank
0's choice on every rank), so ranks can never draft differently.

Invariant: ``known == len(context)``: the drafter's context is exactly the
request's tokens it was told about (``extend``) or that it saw committed
(``commit``: the bonus and the accepted drafts).
"""

from __future__ import annotations

import mlx.core as mx

from skulk.engine.sampling import SamplingParams
from skulk.engine.speculative.drafters import Agree, Drafter, Proposal

__all__ = ["PromptLookupDrafter", "DEFAULT_MAX_NGRAM", "DEFAULT_MIN_NGRAM"]

DEFAULT_MAX_NGRAM = 3
DEFAULT_MIN_NGRAM = 2


class PromptLookupDrafter(Drafter):
    """Drafts by copying the continuation of the latest earlier occurrence of the context's last n-gram."""

    kind = "prompt_lookup"

    def __init__(self, vocab_size: int, max_ngram: int = DEFAULT_MAX_NGRAM, min_ngram: int = DEFAULT_MIN_NGRAM) -> None:
        assert 1 <= min_ngram <= max_ngram, (min_ngram, max_ngram)
        assert vocab_size > 0, vocab_size
        self.vocab_size = vocab_size  # the width of q under sampling
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.context: list[int] = []
        self.known = 0
        # n -> {n-gram: latest start index whose n-gram has a following token}
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}
        self._bonus: int | None = None

    def _append(self, tokens: list[int]) -> None:
        for t in tokens:
            self.context.append(int(t))
            end = len(self.context) - 1  # the new token continues every n-gram ending just before it
            for n, index in self._index.items():
                start = end - n
                if start >= 0:
                    index[tuple(self.context[start:end])] = start

    def extend(self, tokens: list[int]) -> None:
        self._append(list(tokens))
        self.known += len(tokens)
        assert self.known == len(self.context)

    def lookup(self, tail: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the last n-gram of context + ``tail``.

        ``tail`` is the one token not yet in the context (the round's bonus).
        The index holds every n-gram of the context whose following token is
        in the context too; the one earlier start it cannot hold yet (the
        n-gram ending at the context's last token, continued by the bonus)
        is checked first, being the latest.
        """
        assert len(tail) <= 1, tail
        full = self.context + tail
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(full) <= n:
                continue
            key = tuple(full[-n:])
            latest = len(full) - n - 1
            start = latest if tuple(full[latest : latest + n]) == key else self._index[n].get(key)
            if start is not None:
                assert start + n < len(full), (start, n, len(full))
                return full[start + n : start + n + k]
        return []

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
        self._bonus = int(bonus)
        tokens = self.lookup([int(bonus)], k)
        if agree is not None:
            count = int(agree(mx.array([len(tokens)], dtype=mx.uint32)).item())
            padded = tokens + [0] * max(0, count - len(tokens))
            tokens = [int(agree(mx.array([padded[i]], dtype=mx.uint32)).item()) for i in range(count)]
        if not tokens:
            return Proposal.of([])
        proposal = Proposal.of(tokens)
        if sampling is not None and not sampling.greedy:
            assert proposal.drafted is not None
            # A point mass on each copied token: log q = 0 there, -inf elsewhere.
            q = mx.full((len(tokens), self.vocab_size), -mx.inf, dtype=mx.float32)
            q[mx.arange(len(tokens)), proposal.drafted] = 0.0
            proposal.q_logprobs = q
        return proposal

    def commit(self, drafts: list[int], accepted: int, hidden: mx.array | None) -> None:
        assert 0 <= accepted <= len(drafts), (accepted, len(drafts))
        assert self._bonus is not None, "commit without a proposal"
        self._append([self._bonus, *drafts[:accepted]])
        self.known += 1 + accepted
        self._bonus = None
        assert self.known == len(self.context)
