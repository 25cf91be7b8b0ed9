"""Speculation inside the runner: the engine subclass, the follower loop, the set-up.

Theory of operation
-------------------
``SpeculativeEngine`` is the engine (``skulk.engine.batch.Engine``) with one
more kind of step. When exactly one stream is decoding and nothing waits or
prefills, a step is a speculative *round* for that stream (``rounds``): draft
up to ``depth`` tokens, verify them with one forward of the target over its
own KV cache, commit the accepted prefix plus the target's next token. In
every other situation the step is the engine's plain batched step. This is the
load rule: with two or more streams, one batched forward already yields a
token per stream for about the cost of one, so per-stream verify passes could
only lose; speculation switches off as soon as a second stream joins and back
on when one is left, and concurrent throughput is that of plain decoding.

Requests asking for a repetition penalty or for logprobs decode plainly (the
penalty would have to be re-applied per drafted position; logprobs are
reported by the plain sampler), and so do grammar-constrained requests (each
drafted token would need its own mask).

Several ranks. Rank 0 decides everything and tells the others through the
engine's ``PlanChannel`` (fixed-shape all-sums), in frames of its own::

    [OP_SPEC, prev_accepted, reset, k, bonus, n_ext, *ext, n_drafts, *drafts]
    [OP_SPEC_COMMIT, prev_accepted]

- ``prev_accepted`` (-1: none) settles the previous round on the followers:
  they trim their target caches past the rejected drafts (and, on tensor
  placements, roll their drafters back). It rides on the next round's frame,
  or on an ``OP_SPEC_COMMIT`` sent before any plain plan, so a round costs no
  extra collective;
- *pipeline*: rank 0 (which holds the output head, and the drafter) drafts
  alone and sends the drafts; every rank then runs its stage of the verify;
- *tensor*: ranks draft *symmetrically*: each holds its slice of the drafter
  (sharded like the target) and runs every draft forward in step; each draft
  token is rank 0's choice, agreed with a ``(1,)`` all-sum
  (``collective.TokenAgreement``). ``ext`` carries the tokens the drafters
  must catch up on, ``reset`` starts a fresh drafter (a new stream).

No follower ever decides from its own logits, so ranks on different hardware
cannot diverge. ``build_speculator`` runs on every rank at load time and turns
speculation on only if every rank can speculate (``agree_capability``), and
not at all across nodes when the card says ``speculative_multi_node = false``.

Invariants: rank 0 and every follower apply the same rounds in the same order
and trim the same counts; a stream's committed tokens equal plain decoding's
under greedy sampling; one drafter state exists per rank (for the stream that
speculated last).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import msgspec

from skulk.core.cards import CardError, ModelCard, card_from_toml
from skulk.core.instances import RunnerSpec
from skulk.engine.batch import OP_SHUTDOWN, OP_STEP, BatchState, Engine, Plan
from skulk.engine.shard import LoadedShard, Shard
from skulk.engine.speculative.collective import TokenAgreement, agree_capability
from skulk.engine.speculative.drafters import Drafter, DraftModelDrafter, MtpDrafter, Proposal
from skulk.engine.speculative.rounds import speculative_round
from skulk.engine.speculative.target import TargetView, cache_length, trim_cache

__all__ = [
    "OP_SPEC",
    "OP_SPEC_COMMIT",
    "DEFAULT_DEPTH",
    "MAX_DEPTH",
    "Speculator",
    "SpeculativeEngine",
    "build_speculator",
    "spec_follow",
    "resolve_draft_path",
]

OP_SPEC = 71
OP_SPEC_COMMIT = 72
DEFAULT_DEPTH = 3
MAX_DEPTH = 8


@dataclass
class Speculator:
    """What one rank needs to speculate (built by ``build_speculator``).

    ``make_drafter`` is None on pipeline followers (they never draft);
    ``agree`` is set on tensor placements (symmetric drafting).
    """

    kind: str  # "draft_model" | "mtp"
    depth: int
    target: TargetView
    make_drafter: Callable[[], Drafter] | None
    agree: TokenAgreement | None = None

    def __post_init__(self) -> None:
        assert self.kind in ("draft_model", "mtp"), self.kind
        assert 1 <= self.depth <= MAX_DEPTH, self.depth
        assert (self.make_drafter is not None) or (self.target.kind == "pipeline" and self.target.rank != 0)

    @property
    def placement(self) -> str:
        return self.target.kind


def _log(message: str) -> None:
    sys.stderr.write(f"[skulk-speculation] {message}\n")
    sys.stderr.flush()


def _read_card(model_path: Path) -> ModelCard | None:
    path = Path(model_path) / "model_card.toml"
    if not path.is_file():
        return None
    try:
        return card_from_toml(path.read_text(), source=str(path))
    except CardError as exc:
        _log(f"ignoring unreadable card: {exc}")
        return None


def resolve_draft_path(draft_id: str) -> Path:
    """Find the draft model's directory: a path, a models-dir id, an engine preset or a speculation preset."""
    from skulk.engine.models import resolve_model_path

    try:
        return resolve_model_path(draft_id)
    except FileNotFoundError:
        from skulk.engine.speculative.models import SPEC_PRESETS, ensure_spec_models

        for preset in SPEC_PRESETS.values():
            if draft_id in (preset.draft_id, preset.target.model_id):
                target_dir, draft_dir = ensure_spec_models(preset)
                return draft_dir if draft_id == preset.draft_id else target_dir
        raise


def _load_draft_view(path: Path, group: Any | None, tensor: bool) -> TargetView:
    from mlx_lm.utils import load_model

    from skulk.engine.shard import LocalShard, TensorShard

    model, _ = load_model(path, lazy=True)
    if tensor:
        if not hasattr(model, "shard"):
            raise ValueError(f"draft model at {path} cannot be tensor-sharded")
        model.shard(group)
        mx.eval(model.parameters())
        return TargetView(TensorShard(model, group))
    mx.eval(model.parameters())
    return TargetView(LocalShard(model))


def _new_cache_for(view: TargetView) -> Callable[[], list[Any]]:
    from mlx_lm.models.cache import make_prompt_cache

    model = view.model
    return lambda: make_prompt_cache(model)


def build_speculator(
    spec: RunnerSpec, loaded: LoadedShard, model_path: str | Path, group: Any | None
) -> tuple[Speculator | None, str]:
    """Set up speculation for this rank; a collective when ``group`` is set.

    Every rank must call it at the same point (after loading). Returns
    (speculator or None, a one-line reason for the log). Speculation is on
    only if ``spec.speculation`` asks for it and every rank could load its
    part (drafter, trimmable caches, hidden states for MTP).
    """
    cfg = spec.speculation
    if cfg.drafter == "none":
        return None, "speculation not configured for this instance"
    model_path = Path(model_path)
    card = _read_card(model_path)
    target = TargetView(loaded.shard)
    world = target.world_size
    depth = cfg.depth if cfg.depth > 0 else (card.mtp_max_depth if card and card.mtp_max_depth > 0 else DEFAULT_DEPTH)
    depth = max(1, min(MAX_DEPTH, depth))
    speculator: Speculator | None = None
    reason = ""
    try:
        if world > 1 and card is not None and not card.speculative_multi_node:
            raise ValueError("the model card opts out of multi-node speculation (speculative_multi_node = false)")
        probe = loaded.shard.new_cache()
        if not all(c.is_trimmable() for c in probe):
            raise ValueError("the model's KV cache cannot be trimmed")
        drafts_here = target.kind != "pipeline" or target.rank == 0
        tensor = target.kind == "tensor"
        make: Callable[[], Drafter] | None = None
        if drafts_here and cfg.drafter == "draft_model":
            draft_id = cfg.draft_model_id or (card.draft_model if card else None)
            if not draft_id:
                raise ValueError("draft_model speculation needs a draft_model_id (or a card naming one)")
            view = _load_draft_view(resolve_draft_path(draft_id), group, tensor)
            if view.vocab_size != target.vocab_size:
                raise ValueError(f"draft {draft_id} has {view.vocab_size} tokens, the target {target.vocab_size}")
            new_cache = _new_cache_for(view)
            make = lambda: DraftModelDrafter(view, new_cache)  # noqa: E731
        elif drafts_here and cfg.drafter == "mtp":
            from skulk.engine.speculative.mtp import load_mtp, shard_mtp

            if not target.supports_hidden:
                raise ValueError("the model's layout exposes no hidden states for MTP")
            heads = load_mtp(target.model, model_path, loaded.config)
            if tensor:
                shard_mtp(heads, group)
                mx.eval(heads.parameters())
            make = lambda: MtpDrafter(heads, target)  # noqa: E731
        agree = TokenAgreement(group) if tensor else None
        speculator = Speculator(kind=cfg.drafter, depth=depth, target=target, make_drafter=make, agree=agree)
        reason = f"{cfg.drafter} speculation at depth {depth} ({target.kind}, rank {target.rank}/{world})"
    except Exception as exc:  # any failure means this rank cannot speculate
        speculator = None
        reason = f"rank {target.rank} cannot speculate: {exc}"
    everyone, able = agree_capability(group, speculator is not None)
    if not everyone:
        if speculator is not None:
            reason = f"{able} of {world} ranks can speculate; speculation is off for all"
        return None, reason
    return speculator, reason


# --- rank 0 ------------------------------------------------------------------


class _HiddenTap(Shard):
    """A world-of-one shard that also keeps the hidden states of a lone stream's cache.

    Same forwards as ``LocalShard`` (the head applied to ``model.model``'s
    output is exactly ``model(...)``); while a cache is fed without gaps
    (prefill chunks, then one-row decode steps) the post-norm hidden states
    of every position fed are kept, keyed by the cache, so an MTP drafter can
    start with the whole prompt instead of an empty history. A cache seeded
    from the prefix cache starts past 0: its states cover the positions this
    request computed (the drafter gets that tail of the prompt).
    """

    def __init__(self, inner: Shard, view: TargetView) -> None:
        assert view.supports_hidden and view.world_size == 1
        self.inner = inner
        self.view = view
        self.model = getattr(inner, "model", None)
        self.log: dict[int, tuple[int, int, list[mx.array]]] = {}  # cache -> (first, end, states)

    def new_cache(self) -> list[Any]:
        return self.inner.new_cache()

    def _record(self, cache: list[Any], start: int, rows: mx.array) -> None:
        key = id(cache[0])
        first, end, parts = self.log.get(key, (start, start, []))
        if end != start:
            first, end, parts = start, start, []  # a gap: keep only what follows it
        self.log[key] = (first, end + int(rows.shape[0]), parts + [rows])

    def prefill(self, tokens: mx.array, cache: list[Any]) -> list[Any]:
        start = cache_length(cache)
        hidden = self.view.model.model(tokens, cache=cache)
        self._record(cache, start, hidden[0])
        return [c.state for c in cache] + [hidden]

    def decode(self, inputs: mx.array, cache: list[Any]) -> mx.array | None:
        if int(inputs.shape[0]) != 1:
            return self.inner.decode(inputs, cache)
        start = cache_length(cache)
        hidden = self.view.model.model(inputs[:, None], cache=cache)
        self._record(cache, start, hidden[0])
        return self.view.head(hidden)[:, -1, :]

    def take(self, cache: list[Any], positions: int) -> mx.array | None:
        """The hidden states of ``cache``'s last positions up to ``positions`` (n, H), else None."""
        first, end, parts = self.log.pop(id(cache[0]), (0, 0, []))
        if end != positions or not parts:
            return None
        assert 0 <= first < end, (first, end)
        return mx.concatenate(parts, axis=0)

    def keep_only(self, caches: list[list[Any] | None]) -> None:
        live = {id(c[0]) for c in caches if c}
        for key in [k for k in self.log if k not in live]:
            del self.log[key]


@dataclass
class _Counters:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0


class SpeculativeEngine(Engine):
    """The engine with speculative rounds for a lone stream (module docstring)."""

    def __init__(self, *args: Any, speculator: Speculator, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert speculator.target.rank == 0, "only rank 0 runs the engine"
        self.speculator = speculator
        self._drafter: Drafter | None = None
        self._drafter_task: str | None = None
        self._uncommitted: int | None = None  # followers' pending settle of the last round
        self._counters: dict[str, _Counters] = {}
        self.spec_rounds = 0
        self.spec_plain_steps = 0
        self.last_counters: _Counters | None = None  # of the last finished stream that speculated
        self._tap: _HiddenTap | None = None
        if speculator.kind == "mtp" and speculator.placement == "local":
            self._tap = _HiddenTap(self._state.shard, speculator.target)
            self._state.shard = self._tap

    # --- decisions -------------------------------------------------------------

    def _wants_round(self) -> bool:
        if len(self.rows) != 1 or self.waiting or self.prefilling is not None:
            return False
        sampling = self.rows[0].sampling
        return sampling.repetition_penalty == 1.0 and not sampling.logprobs and self.rows[0].grammar is None

    def _step(self) -> None:
        if self._wants_round():
            prev = self._outstanding
            if prev is not None:
                # Drafting needs the last token on the host.
                self._outstanding = None
                self._materialize(prev)
            request = self.rows[0]
            k = min(self.speculator.depth, request.max_tokens - request.scheduled - 1)
            if not request.done and not request.cancelled and k >= 1:
                self._round(request, k)
                return
        self._settle_followers()
        self.spec_plain_steps += 1
        super()._step()
        if self._tap is not None:
            lone = self._state.decode_cache if self._state.batch == 1 else None
            self._tap.keep_only([lone, self._state.prefill_cache])

    def _settle_followers(self) -> None:
        if self._uncommitted is not None and self._plans is not None:
            self._plans([OP_SPEC_COMMIT, self._uncommitted])
        self._uncommitted = None

    # --- one round -----------------------------------------------------------

    def _round(self, request: Any, k: int) -> None:
        spec = self.speculator
        assert request.generated and len(request.generated) == request.scheduled, (
            len(request.generated),
            request.scheduled,
        )
        reset = self._drafter_task != request.task_id
        if reset:
            assert spec.make_drafter is not None
            self._drafter = spec.make_drafter()
            self._drafter_task = request.task_id
        drafter = self._drafter
        assert drafter is not None
        bonus = request.generated[-1]
        tokens = request.prompt + request.generated
        ext = tokens[drafter.known : len(tokens) - 1]
        seed_index = (request.sampling.seed, request.scheduled)
        sampling = request.sampling
        prev = -1 if self._uncommitted is None else self._uncommitted
        self._uncommitted = None
        proposal: Proposal | None = None
        if spec.placement == "pipeline":
            drafter.extend(ext)
            proposal = drafter.propose(bonus, k, sampling, seed_index)
            if self._plans is not None:
                self._plans(_encode_spec(prev, reset, k, bonus, [], proposal.tokens))
        elif spec.placement == "tensor":
            assert self._plans is not None
            self._plans(_encode_spec(prev, reset, k, bonus, ext, []))
            drafter.extend(ext)
            proposal = drafter.propose(bonus, k, sampling, seed_index, spec.agree)
        elif reset and self._tap is not None and isinstance(drafter, MtpDrafter):
            hidden = self._tap.take(self._state.decode_cache, len(tokens) - 1)
            if hidden is not None:
                drafter.seed_hidden(ext, hidden)
            else:
                drafter.extend(ext)
        else:
            drafter.extend(ext)
        outcome = speculative_round(
            spec.target,
            self._state.decode_cache,
            drafter,
            bonus,
            k,
            sampling,
            seed_index,
            proposal=proposal,
        )
        if self._plans is not None:
            self._uncommitted = outcome.accepted
        counters = self._counters.setdefault(request.task_id, _Counters())
        counters.rounds += 1
        counters.drafted += outcome.drafted
        counters.accepted += outcome.accepted
        self.spec_rounds += 1
        now = time.monotonic()
        for token in outcome.tokens:
            if request.done:
                break
            request.generated.append(token)
            request.scheduled += 1
            request.last_token_at = now
            self._accept(request, token, None)

    # --- stats -----------------------------------------------------------------

    def _finish(self, request: Any, *args: Any, **kwargs: Any) -> None:
        super()._finish(request, *args, **kwargs)
        counters = self._counters.pop(request.task_id, None)
        if self._drafter_task == request.task_id:
            self._drafter_task = None  # the next stream starts a fresh drafter
            self._drafter = None
        if counters is None or counters.rounds == 0:
            return
        self.last_counters = counters
        last = self._out[-1]
        assert last.task_id == request.task_id and last.finish_reason is not None, last
        if last.stats is not None:
            rate = counters.accepted / counters.drafted if counters.drafted else 0.0
            stats = msgspec.structs.replace(last.stats, acceptance_rate=round(rate, 4), draft_depth=self.speculator.depth)
            self._out[-1] = msgspec.structs.replace(last, stats=stats)

    def stop_followers(self) -> None:
        self._settle_followers()
        super().stop_followers()

    def clear_prefix_cache(self) -> None:
        self._settle_followers()
        super().clear_prefix_cache()


def _encode_spec(prev: int, reset: bool, k: int, bonus: int, ext: list[int], drafts: list[int]) -> list[int]:
    return [OP_SPEC, prev, int(reset), k, int(bonus), len(ext), *ext, len(drafts), *drafts]


# --- followers -----------------------------------------------------------------


class _FollowerRounds:
    """A follower's side of speculative rounds (module docstring)."""

    def __init__(self, speculator: Speculator, state: BatchState) -> None:
        self.spec = speculator
        self.state = state
        self.drafter: Drafter | None = None
        self.last_drafts: list[int] | None = None
        self.last_hidden: mx.array | None = None

    def settle(self, accepted: int) -> None:
        """Apply rank 0's decision about the previous round."""
        if accepted < 0:
            return
        drafts = self.last_drafts
        assert drafts is not None and 0 <= accepted <= len(drafts), (drafts, accepted)
        assert self.state.decode_cache is not None
        trim_cache(self.state.decode_cache, len(drafts) - accepted)
        if self.drafter is not None:
            if isinstance(self.drafter, MtpDrafter):
                assert self.last_hidden is not None
                self.drafter.commit(drafts, accepted, self.last_hidden[: accepted + 1])
            elif drafts:
                self.drafter.commit(drafts, accepted, None)
        self.last_drafts, self.last_hidden = None, None

    def round(self, values: list[int]) -> None:
        it = iter(values)
        op, prev, reset, k, bonus = (next(it) for _ in range(5))
        assert op == OP_SPEC, op
        ext = [next(it) for _ in range(next(it))]
        drafts = [next(it) for _ in range(next(it))]
        assert next(it, None) is None, "trailing values in a speculation frame"
        self.settle(prev)
        if self.spec.placement == "tensor":
            if reset:
                assert self.spec.make_drafter is not None
                self.drafter = self.spec.make_drafter()
            assert self.drafter is not None and not drafts
            self.drafter.extend(ext)
            # Symmetric drafting: the same forwards as rank 0, rank 0's tokens.
            drafts = self.drafter.propose(bonus, k, None, (0, 0), self.spec.agree).tokens
        assert self.state.decode_cache is not None and self.state.batch == 1, self.state.batch
        want_hidden = isinstance(self.drafter, MtpDrafter)
        _, hidden = self.spec.target.forward(
            mx.array([bonus] + drafts, dtype=mx.uint32), self.state.decode_cache, want_hidden=want_hidden
        )
        self.last_drafts, self.last_hidden = drafts, hidden


def spec_follow(
    shard: Shard,
    recv: Callable[[], list[int]],
    speculator: Speculator,
    on_step: Callable[[bool], None] | None = None,
) -> None:
    """``skulk.engine.batch.follow`` that also applies rank 0's speculative frames."""
    state = BatchState(shard)
    rounds = _FollowerRounds(speculator, state)
    while True:
        values = recv()
        op = values[0]
        if op == OP_SHUTDOWN:
            return
        if on_step is not None:
            on_step(True)
        if op == OP_SPEC:
            rounds.round(values)
        elif op == OP_SPEC_COMMIT:
            assert len(values) == 2, values
            rounds.settle(values[1])
        else:
            assert op == OP_STEP, op
            plan = Plan.decode(values)
            logits, pending = state.apply(plan, None)
            mx.eval(pending, [] if logits is None else logits)
        if on_step is not None:
            on_step(False)
