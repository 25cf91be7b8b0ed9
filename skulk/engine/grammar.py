"""Grammar-constrained decoding: one token mask per batch row, from llguidance.

Theory of operation
-------------------
A constrained request (``response_format`` ``json_object``/``json_schema``, or
a forced tool call) carries a grammar: llguidance's Lark dialect, where
``%json {schema}`` embeds a JSON Schema. Before each decode step, every
constrained row asks its ``Constraint`` for the set of tokens that keep the
output inside the grammar, as a packed bitmask (one bit per vocabulary entry,
32 per int32 word). Unconstrained rows contribute all-ones. The sampler turns
the (B, W) bitmask into -inf on the forbidden logits, for the row only, so
constrained and free requests share one batch (``skulk.engine.batch``).

Only rank 0 samples, so only rank 0 holds matchers; the other ranks follow
rank 0's plans, which carry the tokens chosen, and stay in step whatever was
masked. llguidance compiles lazily (well under a millisecond per request) and
computes a mask in about 10-20 microseconds on this machine's 1K- and
49K-token vocabularies (``docs/structured-output.md``), far below a decode step.

Invariants: a row's mask allows at least one token (llguidance allows EOS once
the grammar is satisfied); a stopped matcher (nothing may follow) ends its
request at once; a token the matcher refuses is a bug (the mask forbade it)
and ends the request with an error rather than emitting invalid output.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["GrammarError", "GrammarTokenizer", "Constraint", "batch_bitmask", "json_schema_grammar", "lark_json"]

# Compact JSON, as every parser and validator expects; no unbounded whitespace runs.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar (or schema) llguidance cannot compile; the message says why."""


def lark_json(schema: Any) -> str:
    """``%json {...}``: a Lark rule body matching JSON that validates against ``schema``."""
    body = dict(schema) if isinstance(schema, dict) else {}
    if isinstance(schema, dict):
        body["x-guidance"] = {**_JSON_STYLE, **body.get("x-guidance", {})}
    return "%json " + json.dumps(body, separators=(",", ":"))  # key order is the order generated


def json_schema_grammar(schema: Any) -> str:
    """A Lark grammar whose language is JSON documents valid under ``schema``."""
    return "start: " + lark_json(schema) + "\n"


class GrammarTokenizer:
    """The vocabulary in llguidance's form, built once per engine (about 0.2 s for 49K tokens).

    ``n_vocab`` is the logits width (models often pad their vocabulary past
    the tokenizer's); masks have ``words = ceil(n_vocab / 32)`` int32 words.
    """

    def __init__(self, hf_tokenizer: Any, n_vocab: int, eos_ids: Sequence[int]) -> None:
        import copy

        import llguidance

        assert n_vocab > 0, n_vocab
        self.n_vocab = n_vocab
        self.words = (n_vocab + 31) // 32
        eos = [int(t) for t in eos_ids]
        # The Rust tokenizer behind a fast HF tokenizer (or a bare ``tokenizers.Tokenizer``),
        # serialised with its added tokens, is what llguidance reads.
        backend = getattr(hf_tokenizer, "backend_tokenizer", hf_tokenizer)
        if not hasattr(backend, "to_str"):
            raise GrammarError(f"constrained decoding needs a fast (tokenizers) tokenizer, not {type(hf_tokenizer).__name__}")
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        self._ll = llguidance.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=eos or None)
        self._llguidance = llguidance

    def constraint(self, lark: str) -> Constraint:
        """A fresh matcher for ``lark``; raises ``GrammarError`` when it does not compile."""
        llguidance = self._llguidance
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._ll)
        if is_error:
            raise GrammarError(messages[0] if messages else "the grammar does not compile")
        matcher = llguidance.LLMatcher(self._ll, grammar)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Constraint(matcher, self.words)


class Constraint:
    """One request's matcher: masks before each token, and the tokens it consumed."""

    def __init__(self, matcher: Any, words: int) -> None:
        self._matcher = matcher
        self.words = words
        self.consumed = 0

    def fill(self, out: np.ndarray) -> None:
        """Write the next-token bitmask into ``out`` (int32, ``words`` long, C-contiguous)."""
        assert out.dtype == np.int32 and out.shape == (self.words,) and out.flags["C_CONTIGUOUS"], (out.dtype, out.shape)
        if self._matcher.is_stopped():
            out[:] = -1  # the row is finishing; its sample is discarded
            return
        self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def consume(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar refuses it (the matcher's error says why)."""
        ok = bool(self._matcher.consume_token(int(token)))
        if ok:
            self.consumed += 1
        return ok

    @property
    def stopped(self) -> bool:
        """Nothing but end-of-sequence may follow: the request is complete."""
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self._matcher.is_accepting())

    @property
    def error(self) -> str:
        return str(self._matcher.get_error())


def batch_bitmask(constraints: Sequence[Constraint | None], words: int) -> np.ndarray:
    """The (B, words) int32 bitmask of a batch: each constraint's mask, all-ones for free rows."""
    mask = np.full((len(constraints), words), -1, dtype=np.int32)
    for i, constraint in enumerate(constraints):
        if constraint is not None:
            constraint.fill(mask[i])
    return mask
