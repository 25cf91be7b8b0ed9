"""The generation engine: continuous batching, chunked prefill, lockstep ranks.

Theory of operation
-------------------
Requests move through three places on rank 0:

``waiting`` (admitted, FIFO) -> ``prefilling`` (at most one, its prompt fed in
chunks into a private KV cache) -> ``rows`` (the decode batch: one row of a
batched KV cache per request, all decoding together, one token per step).

Each engine step is described by a ``Plan``:

1. ``keep``: rows to keep (finished, cancelled and length-complete rows go);
2. ``prefill_start`` / ``prefill_tokens``: feed the next chunk of the
   prefilling request's prompt (all but its last token) into its cache;
3. ``join``: the prefilled request becomes the batch's last row, its last
   prompt token as that row's input;
4. decode: one forward for the whole batch, then one sampled token per row.

While rows are decoding, a prefill chunk is at most ``prefill_chunk_tokens``
long, so a long prompt never stalls running streams for its whole length;
with nobody decoding it uses ``prefill_step_tokens`` (mlx-lm's 2048).

World of one: steps are *pipelined* exactly like ``mlx_lm.generate``: step
n+1 is built from step n's still-lazy sampled tokens and handed to MLX
(``async_eval``) before step n's tokens are read back, detokenised and
emitted. A request that turns out to have finished wastes one row-step.

Several ranks: rank 0 builds each plan, broadcasts it (``PlanChannel``) and
every rank applies it to its own caches (``BatchState``), so all ranks keep
identical batch layouts in lockstep. Followers run ``follow``. Distributed
steps are evaluated eagerly (collectives must pair up in the same order).

Chat replies go through the request's ``ReplyParser`` (``skulk.engine.chatformat``):
each chunk carries content, reasoning and complete tool calls separately, so
every dialect and every node sees one parse. Constrained rows (structured
output, forced tool calls) sample under their grammar's token mask
(``skulk.engine.grammar``); while the batch holds one, a pipelined step queues
its forward, then reads the previous step's tokens back and advances the
matchers while the forward runs, and samples last, so each mask follows every
token that came before it.

Invariants: every submitted task receives exactly one final chunk; chunk
``seq`` numbers are dense from 0; a task never holds a row after its final
chunk; all ranks apply the same plans in the same order.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

from skulk.core.admission import DEFAULT_MAX_OUTPUT_TOKENS, Refused, admit
from skulk.core.kv_budget import KV_BUDGET_EXHAUSTED, Refuse, RowSpan, Wait
from skulk.core.ids import TaskId
from skulk.core.tasks import (
    ChunkError,
    FinishReason,
    GenerationStats,
    Task,
    TokenChunk,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from skulk.engine.prefix_cache import KvLedger, KvSnapshot, PrefixStore, kv_bytes_per_position, prefix_cache_support, row_caches
from skulk.engine.chatformat import (
    ChatFormats,
    ReplyParser,
    call_id_maker,
    detect_formats,
    grammar_for,
    prompt_opens_reasoning,
    render_chat,
    resolve_formats,
)
from skulk.engine.grammar import Constraint, GrammarError, GrammarTokenizer, batch_bitmask
from skulk.engine.reasoning import Parts
from skulk.engine.sampling import SampleOut, SampleRow, SamplingParams, resolve_sampling, sample_batch
from skulk.engine.shard import Shard
from skulk.engine.textstream import StopText

__all__ = ["EngineConfig", "Plan", "BatchState", "Engine", "follow", "OP_STEP", "OP_SHUTDOWN"]

OP_STEP = 1
OP_SHUTDOWN = 2
_CLEAR_CACHE_EVERY = 256


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine (the runner fills them from the spec and env)."""

    context_ceiling: int
    max_concurrent: int = 8
    default_max_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS
    prefill_step_tokens: int = 2048
    prefill_chunk_tokens: int = 256
    default_temperature: float = 1.0
    # Test knob: hang inside this step number (provokes the wedge exit).
    wedge_at_step: int = 0
    # The KV budget (skulk.engine.prefix_cache): KV bytes placement reserved for this
    # shard (0: unknown), how long a request may wait for KV before a 503, and the
    # prefix cache's bound in bytes (None: what the budget leaves; 0: no prefix cache).
    kv_reserved_bytes: int = 0
    kv_queue_wait_s: float = 30.0
    prefix_cache_bytes: int | None = None

    def __post_init__(self) -> None:
        assert self.context_ceiling > 0, self.context_ceiling
        assert self.max_concurrent > 0, self.max_concurrent
        assert self.default_max_tokens > 0, self.default_max_tokens
        assert 0 < self.prefill_chunk_tokens <= self.prefill_step_tokens, (
            self.prefill_chunk_tokens,
            self.prefill_step_tokens,
        )
        assert self.kv_reserved_bytes >= 0 and self.kv_queue_wait_s >= 0, (self.kv_reserved_bytes, self.kv_queue_wait_s)


# --- plans -------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One engine step, as rank 0 broadcasts it (see the module docstring)."""

    op: int = OP_STEP
    keep: tuple[int, ...] | None = None
    prefill_start: bool = False
    prefill_tokens: tuple[int, ...] = ()
    join: bool = False
    inputs: tuple[int, ...] = ()
    # Prefix cache (skulk.engine.prefix_cache): keep leaving rows as entries
    # (row, entry id, positions), seed the started prefill from an entry
    # (-1: none), then evict entries. Applied in that order.
    store: tuple[tuple[int, int, int], ...] = ()
    drop_prefill: bool = False  # the prefilling request was cancelled: free its cache
    seed_entry: int = -1
    seed_positions: int = 0
    evict: tuple[int, ...] = ()

    def encode(self) -> list[int]:
        out = [self.op]
        if self.keep is None:
            out += [0]
        else:
            out += [1, len(self.keep), *self.keep]
        out += [int(self.prefill_start), len(self.prefill_tokens), *self.prefill_tokens]
        out += [int(self.join), len(self.inputs), *self.inputs]
        out += [len(self.store), *(v for triple in self.store for v in triple)]
        out += [int(self.drop_prefill), self.seed_entry, self.seed_positions, len(self.evict), *self.evict]
        return out

    @classmethod
    def decode(cls, values: list[int]) -> Plan:
        it = iter(values)

        def take(n: int) -> tuple[int, ...]:
            got = tuple(next(it) for _ in range(n))
            assert len(got) == n
            return got

        op = next(it)
        keep = take(next(it)) if next(it) else None
        prefill_start = bool(next(it))
        prefill_tokens = take(next(it))
        join = bool(next(it))
        inputs = take(next(it))
        flat = take(3 * next(it))
        store = tuple((flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3))
        drop_prefill = bool(next(it))
        seed_entry, seed_positions = next(it), next(it)
        evict = take(next(it))
        assert next(it, None) is None, "trailing values in plan"
        return cls(
            op=op, keep=keep, prefill_start=prefill_start, prefill_tokens=prefill_tokens, join=join, inputs=inputs,
            store=store, drop_prefill=drop_prefill, seed_entry=seed_entry, seed_positions=seed_positions, evict=evict,
        )  # fmt: skip


class BatchState:
    """The KV caches one rank holds: the decode batch and the prefill cache.

    A batch of one row keeps the model's own per-request cache (what
    ``mlx_lm.generate`` uses, so a single stream runs exactly its arithmetic
    at its speed); two or more rows use the cache type's batched form
    (``KVCache`` -> ``BatchKVCache``, left-padded), converted on the way in
    (``merge``/``extend``) and back out (``extract``).
    """

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.decode_cache: list[Any] | None = None
        self.batch = 0
        self.prefill_cache: list[Any] | None = None
        self.prefix = PrefixStore()

    def kv_bytes_per_position(self) -> int:
        """This rank's bytes per KV position, measured on whatever cache holds some (0: none yet)."""
        for cache in (self.decode_cache, self.prefill_cache, *self.prefix.entries.values()):
            measured = kv_bytes_per_position(cache)
            if measured:
                return measured
        return 0

    def apply(self, plan: Plan, inputs: mx.array | None) -> tuple[mx.array | None, list[Any]]:
        """Apply ``plan``; returns (logits (B, V) or None, arrays to evaluate).

        ``inputs`` are the decode inputs as an array (rank 0 may pass a lazy
        array; other ranks pass None and ``plan.inputs`` is used).
        """
        pending: list[Any] = []
        for row, entry_id, positions in plan.store:
            assert self.decode_cache is not None
            pending += self.prefix.store(entry_id, row_caches(self.decode_cache, self.batch, row), positions)
        if plan.keep is not None:
            keep = list(plan.keep)
            assert all(0 <= i < self.batch for i in keep) and keep == sorted(set(keep)), (keep, self.batch)
            if not keep:
                self.decode_cache, self.batch = None, 0
            elif len(keep) != self.batch:
                assert self.decode_cache is not None and self.batch > 1
                if len(keep) == 1:
                    self.decode_cache = [c.extract(keep[0]) for c in self.decode_cache]
                else:
                    for c in self.decode_cache:
                        c.filter(keep)
                self.batch = len(keep)
        if plan.drop_prefill:
            self.prefill_cache = None
        if plan.prefill_start:
            if plan.seed_entry >= 0:
                self.prefill_cache = self.prefix.seed(plan.seed_entry, plan.seed_positions)
            else:
                self.prefill_cache = self.shard.new_cache()
        for entry_id in plan.evict:
            self.prefix.evict(entry_id)
        if plan.prefill_tokens:
            assert self.prefill_cache is not None, "prefill chunk without a started prefill"
            pending += self.shard.prefill(mx.array(plan.prefill_tokens, dtype=mx.uint32)[None], self.prefill_cache)
        if plan.join:
            assert self.prefill_cache is not None, "join without a prefilled request"
            if self.decode_cache is None:
                self.decode_cache = self.prefill_cache
            else:
                if self.batch == 1:
                    self.decode_cache = [type(c).merge([c]) for c in self.decode_cache]
                for mine, new in zip(self.decode_cache, self.prefill_cache):
                    mine.extend(type(new).merge([new]))
            self.batch += 1
            self.prefill_cache = None
        if self.batch == 0:
            assert not plan.inputs, plan.inputs
            return None, pending
        assert self.decode_cache is not None
        if inputs is None:
            assert len(plan.inputs) == self.batch, (len(plan.inputs), self.batch)
            inputs = mx.array(plan.inputs, dtype=mx.uint32)
        logits = self.shard.decode(inputs, self.decode_cache)
        return logits, pending


def follow(shard: Shard, recv: Callable[[], list[int]], on_step: Callable[[bool], None] | None = None) -> None:
    """Ranks other than 0: apply rank 0's plans until it broadcasts shutdown.

    ``on_step(True)`` is called when a plan arrives and ``on_step(False)``
    when it has been applied (the runner's wedge watchdog uses these).
    """
    state = BatchState(shard)
    steps = 0
    while True:
        plan = Plan.decode(recv())
        if plan.op == OP_SHUTDOWN:
            return
        assert plan.op == OP_STEP, plan.op
        if on_step is not None:
            on_step(True)
        logits, pending = state.apply(plan, None)
        mx.eval(pending, [] if logits is None else logits)
        steps += 1
        if steps % _CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
        if on_step is not None:
            on_step(False)


# --- rank 0 ----------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    task: Task
    sampling: SamplingParams
    prompt: list[int]
    max_tokens: int
    detok: Any
    stop: StopText
    submitted_at: float
    generated: list[int] = field(default_factory=list)
    scheduled: int = 0
    prefill_pos: int = 0
    next_seq: int = 0
    done: bool = False
    cancelled: bool = False
    prefill_started_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    cached_tokens: int = 0  # prompt positions seeded from the prefix cache
    # Chat replies: the parser splitting content, reasoning and tool calls; None for completions.
    reply: ReplyParser | None = None
    calls_sent: int = 0
    # Constrained decoding: the grammar, and whether it is "live" (masking every token),
    # "open" (a <think> block may still open first) or "deferred" (inside reasoning).
    grammar: Constraint | None = None
    grammar_state: str = "live"

    @property
    def task_id(self) -> TaskId:
        return self.task.task_id

    @property
    def reserve(self) -> int:
        """KV positions this request may come to hold (prompt + max_tokens)."""
        return len(self.prompt) + self.max_tokens


@dataclass
class _Outstanding:
    rows: list[_Request]
    out: SampleOut


class Engine:
    """Rank 0's engine: accepts tasks, schedules steps, emits chunks.

    ``emit`` receives the chunks produced by each call (a list, possibly
    empty calls are skipped). ``plans`` broadcasts a plan to other ranks
    (None for a world of one).
    """

    def __init__(
        self,
        shard: Shard,
        tokenizer: Any,
        config: EngineConfig,
        emit: Callable[[list[TokenChunk]], None],
        plans: Callable[[list[int]], None] | None = None,
    ) -> None:
        assert shard.rank == 0, "only rank 0 runs the engine; others run follow()"
        assert (plans is None) == (shard.world_size == 1), "a plan channel is needed exactly when distributed"
        self.shard = shard
        self.tokenizer = tokenizer
        self.config = config
        self._emit = emit
        self._plans = plans
        self._state = BatchState(shard)
        self._pipelined = not shard.eager
        self.waiting: deque[_Request] = deque()
        self.prefilling: _Request | None = None
        self.rows: list[_Request] = []
        self._outstanding: _Outstanding | None = None
        self._by_id: dict[str, _Request] = {}
        self._out: list[TokenChunk] = []
        self._eos = frozenset(int(t) for t in (tokenizer.eos_token_ids or ()))
        self._token_text: dict[int, str] = {}
        self.steps = 0
        self.step_started_at: float | None = None
        self.vocab_size = len(tokenizer)
        self.kv = KvLedger(
            context_ceiling=config.context_ceiling,
            reserved_kv_bytes=config.kv_reserved_bytes,
            queue_wait_s=config.kv_queue_wait_s,
            cache_bytes=config.prefix_cache_bytes,
            measure=self._state.kv_bytes_per_position,
            cache_support=prefix_cache_support(shard.new_cache()),
        )
        self._step_s = 0.0  # recent seconds per step (for Retry-After estimates)
        self._drop_prefill = False
        self._formats: ChatFormats | None = None
        self._grammar_tokenizer: GrammarTokenizer | None = None
        think = tokenizer.convert_tokens_to_ids("<think>") if hasattr(tokenizer, "convert_tokens_to_ids") else None
        self._think_id: int | None = think if isinstance(think, int) and 0 <= think < self.vocab_size else None

    # --- intake ------------------------------------------------------------

    @property
    def active_tasks(self) -> int:
        """Tasks admitted and not yet finished (waiting ones included)."""
        return len(self._by_id)

    @property
    def queued_tasks(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self._by_id) or self._outstanding is not None or bool(self._out)

    def submit(self, task: Task) -> None:
        """Tokenise, validate and admit ``task``; refusals end it at once."""
        now = time.monotonic()
        if task.task_id in self._by_id:
            return  # a duplicate delivery of a task already running
        reply: ReplyParser | None = None
        grammar: Constraint | None = None
        grammar_state = "live"
        try:
            sampling = resolve_sampling(task.params, self.config.default_temperature)
            prompt, reply, grammar, grammar_state = self._prepare(task)
        except (ValueError, TypeError, KeyError) as exc:
            code = "invalid_grammar" if isinstance(exc, GrammarError) else "invalid_value"
            self._refuse(task, f"invalid request: {exc}", "invalid_request_error", code, 0)
            return
        decision = admit(
            prompt_tokens=len(prompt),
            max_tokens=task.params.max_tokens,
            ceiling=self.config.context_ceiling,
            default_max_tokens=self.config.default_max_tokens,
        )
        if isinstance(decision, Refused):
            self._refuse(task, decision.message, decision.type, decision.code, len(prompt))
            return
        request = _Request(
            task=task,
            sampling=sampling,
            prompt=prompt,
            max_tokens=decision.max_tokens,
            detok=self._new_detokenizer(),
            stop=StopText(task.params.stop),
            submitted_at=now,
            reply=reply,
            grammar=grammar,
            grammar_state=grammar_state,
        )
        self._by_id[task.task_id] = request
        self.waiting.append(request)

    def _new_detokenizer(self) -> Any:
        detok = self.tokenizer.detokenizer
        if isinstance(detok, BPEStreamingDetokenizer):
            # mlx-lm's BPE detokenizer drops the first token's leading space
            # (while text is empty); a completion must keep it, so the stream
            # concatenates to exactly ``tokenizer.decode(tokens)``. A hidden
            # placeholder makes the text non-empty; ``offset`` skips it.
            detok.text, detok.offset = " ", 1
        return detok

    def formats(self) -> ChatFormats:
        """The chat formats this model's template implies (detected once)."""
        if self._formats is None:
            self._formats = detect_formats(self.tokenizer)
        return self._formats

    def grammar_tokenizer(self) -> GrammarTokenizer:
        """The vocabulary in llguidance's form, built on the first constrained request."""
        if self._grammar_tokenizer is None:
            hf = getattr(self.tokenizer, "_tokenizer", self.tokenizer)
            # Masks span the logits, which may be wider than the tokenizer (padded vocabularies).
            args = getattr(getattr(self.shard, "model", None), "args", None)
            n_vocab = max(self.vocab_size, int(getattr(args, "vocab_size", 0) or 0))
            self._grammar_tokenizer = GrammarTokenizer(hf, n_vocab, sorted(self._eos))
        return self._grammar_tokenizer

    def _prepare(self, task: Task) -> tuple[list[int], ReplyParser | None, Constraint | None, str]:
        """Prompt ids, reply parser, grammar and its starting state (raises ValueError when invalid)."""
        params = task.params
        if not (task.kind == "chat" or params.messages is not None):
            return self._tokenize(task), None, None, "live"  # a text completion: no chat parsing
        if not params.messages:
            raise ValueError("a chat task needs at least one message")
        formats = resolve_formats(self.formats(), params)
        text = render_chat(self.tokenizer, params, formats)
        in_reasoning = prompt_opens_reasoning(text, formats)
        reply = ReplyParser(formats, params, call_id_maker(task.task_id), in_reasoning=in_reasoning)
        lark = grammar_for(params, formats)
        grammar = None if lark is None else self.grammar_tokenizer().constraint(lark)
        state = "live"
        if grammar is not None and formats.reasoning == "think" and params.enable_thinking is not False:
            # Reasoning stays free; the grammar takes over once the <think> block closes.
            state = "deferred" if in_reasoning else ("open" if self._think_id is not None else "live")
        # A rendered template already holds its special tokens (as apply_chat_template encodes it).
        templated = getattr(self.tokenizer, "has_chat_template", False)
        ids = self.tokenizer.encode(text, add_special_tokens=False) if templated else self.tokenizer.encode(text)
        return self._checked_ids([int(t) for t in ids]), reply, grammar, state

    def _tokenize(self, task: Task) -> list[int]:
        if task.params.prompt is None:
            raise ValueError("a completion task needs a prompt")
        ids = self.tokenizer.encode(task.params.prompt)
        return self._checked_ids([int(t) for t in ids])

    def _checked_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            # An empty prompt conditions on end-of-text, as OpenAI does.
            if not self._eos:
                raise ValueError("the prompt is empty")
            ids = [min(self._eos)]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary: {bad[:5]}")
        return ids

    def _refuse(self, task: Task, message: str, err_type: str, code: str | None, prompt_tokens: int) -> None:
        self._out.append(
            TokenChunk(
                command_id=task.command_id,
                task_id=task.task_id,
                seq=0,
                finish_reason="error",
                usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=0, total_tokens=prompt_tokens),
                error=ChunkError(message=message, type=err_type, code=code),
            )
        )
        self._flush()

    def cancel(self, task_id: str) -> bool:
        """Cancel ``task_id``; returns False when it is unknown or finished."""
        request = self._by_id.get(task_id)
        if request is None or request.done:
            return False
        request.cancelled = True
        if request in self.waiting:
            self.waiting.remove(request)
            self._finish(request, "cancelled", "", ())
        elif request is self.prefilling:
            self.prefilling = None
            self._drop_prefill = True  # its partial KV goes with the next plan (it no longer counts in the budget)
            self._finish(request, "cancelled", "", ())
        # A decoding row ends at the next step (its slot goes with the plan).
        self._flush()
        return True

    def cancel_all(self) -> None:
        for task_id in list(self._by_id):
            self.cancel(task_id)
        for request in list(self._by_id.values()):
            if not request.done:
                self._finish(request, "cancelled", "", ())
        self._flush()

    # --- steps -------------------------------------------------------------

    def step(self) -> None:
        """Run one engine step (see the module docstring). Cheap when idle."""
        self.steps += 1
        self.step_started_at = time.monotonic()
        if self.config.wedge_at_step and self.steps == self.config.wedge_at_step:
            while True:  # test knob: a step that never finishes
                time.sleep(3600)
        try:
            self._step()
        finally:
            if self.rows:
                took = time.monotonic() - self.step_started_at
                self._step_s = took if self._step_s == 0.0 else 0.9 * self._step_s + 0.1 * took
            self.step_started_at = None
        if self.steps % _CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()  # as mlx-lm does: return freed buffers now and then
        self._flush()

    def _step(self) -> None:
        # Rows that finished, were cancelled or scheduled all their tokens leave.
        for request in self.rows:
            if request.cancelled and not request.done:
                self._finish(request, "cancelled", "", ())
        keep_rows = [i for i, r in enumerate(self.rows) if not r.done and r.scheduled < r.max_tokens]
        keep = None if len(keep_rows) == len(self.rows) else tuple(keep_rows)
        rows = [self.rows[i] for i in keep_rows]
        store, evict = self._kv_leave(keep_rows, rows)

        # Prefill: start the next waiting request when a slot is free and the KV budget allows.
        prefill_start = False
        seed_entry, seed_positions = -1, 0
        if self.prefilling is None and self.waiting and len(rows) < self.config.max_concurrent:
            started = self._kv_admit(rows)
            if started is not None:
                self.prefilling, hit, admit_evict = started
                evict += admit_evict
                if hit is not None:
                    seed_entry, seed_positions = hit.entry_id, hit.positions
                    self.prefilling.prefill_pos = self.prefilling.cached_tokens = hit.positions
                self.prefilling.prefill_started_at = time.monotonic()
                prefill_start = True
        chunk: tuple[int, ...] = ()
        join = False
        joining = self.prefilling
        if joining is not None:
            budget = self.config.prefill_chunk_tokens if rows else self.config.prefill_step_tokens
            body = joining.prompt[:-1]
            chunk = tuple(body[joining.prefill_pos : joining.prefill_pos + budget])
            joining.prefill_pos += len(chunk)
            join = joining.prefill_pos == len(body)

        # Decode inputs: kept rows continue from their last token; a joining
        # request starts from its last prompt token.
        host_inputs: list[int] = []
        lazy_inputs: mx.array | None = None
        prev = self._outstanding
        if self._pipelined and prev is not None and rows:
            # Map kept rows to their positions in the previous step's output.
            index = {id(r): i for i, r in enumerate(prev.rows)}
            pos = [index[id(r)] for r in rows]
            taken = prev.out.tokens if len(pos) == len(prev.rows) else prev.out.tokens[mx.array(pos)]
            lazy_inputs = taken
        else:
            host_inputs = [r.generated[-1] if r.generated else r.prompt[-1] for r in rows]
        if join:
            assert joining is not None
            rows.append(joining)
            self.prefilling = None
            if lazy_inputs is not None:
                lazy_inputs = mx.concatenate([lazy_inputs, mx.array([joining.prompt[-1]], dtype=lazy_inputs.dtype)])
            else:
                host_inputs.append(joining.prompt[-1])

        plan = Plan(
            keep=keep,
            prefill_start=prefill_start,
            prefill_tokens=chunk,
            join=join,
            inputs=tuple(host_inputs) if lazy_inputs is None else (),
            store=tuple(store),
            drop_prefill=self._drop_prefill,
            seed_entry=seed_entry,
            seed_positions=seed_positions,
            evict=tuple(evict),
        )
        if self._plans is not None:
            assert lazy_inputs is None
            self._plans(plan.encode())
        if lazy_inputs is None and rows:
            inputs = mx.array(host_inputs, dtype=mx.uint32)
        else:
            inputs = lazy_inputs
        logits, pending = self._state.apply(plan, inputs if rows else None)
        self.rows = rows
        self._drop_prefill = False

        out = None
        if logits is not None:
            assert inputs is not None
            bitmask = None
            if any(r.grammar is not None for r in rows):
                if self._pipelined and prev is not None:
                    # A mask follows every earlier token: start this step's forward, then
                    # read the previous step's tokens back and advance the matchers while
                    # it runs; only the sampling waits for the masks.
                    mx.async_eval(logits, pending)
                    self._outstanding = None
                    self._materialize(prev)
                    prev = None
                bitmask = self._bitmask(rows)
            sample_rows = [self._sample_row(r) for r in rows]
            out = sample_batch(logits, sample_rows, inputs, bitmask)
            for r in rows:
                r.scheduled += 1
        outputs = [] if out is None else [a for a in (out.tokens, out.chosen_logprobs, out.top_ids, out.top_logprobs) if a is not None]
        if self._pipelined:
            mx.async_eval(outputs, pending)
            self._outstanding = None if out is None else _Outstanding(list(rows), out)
            if prev is not None:
                self._materialize(prev)
        else:
            mx.eval(outputs, pending)
            if out is not None:
                self._materialize(_Outstanding(list(rows), out))

    # --- the KV budget and the prefix cache (skulk.engine.prefix_cache) ---------------------

    def _kv_leave(self, keep_rows: list[int], rows: list[_Request]) -> tuple[list[tuple[int, int, int]], list[int]]:
        """Rows leaving this step: which stay behind as prefix-cache entries, which entries go."""
        kept = set(keep_rows)
        leaving = []
        for i, r in enumerate(self.rows):
            if i in kept:
                continue
            # The row's cache holds its prompt and every fed decode input: the
            # first len(prompt) - 1 + scheduled tokens of its sequence.
            tokens = r.prompt + r.generated
            held = len(r.prompt) - 1 + r.scheduled
            assert len(tokens) >= held, (len(tokens), held)
            leaving.append((i, tokens[:held]))
        if not leaving:
            return [], []
        staying = [self._span(r) for r in rows] + ([self._span(self.prefilling)] if self.prefilling is not None else [])
        return self.kv.leave(leaving, staying)

    def _span(self, r: _Request) -> RowSpan:
        """What ``r`` may hold from now on, for the budget (``skulk.core.kv_budget.RowSpan``).

        A decoding row holds its cache and grows a position per step until
        its ``max_tokens``; a request not yet joined counts its whole prompt
        now and ends after its prefill chunks (at the smaller chunk size), its
        join and its ``max_tokens`` steps.
        """
        if r in self.rows or r.scheduled:
            held = len(r.prompt) - 1 + r.scheduled
            return RowSpan(held=min(held, r.reserve), final=r.reserve, steps=max(0, r.max_tokens - r.scheduled))
        chunk = self.config.prefill_chunk_tokens
        prefill_steps = -(-max(0, len(r.prompt) - 1 - r.prefill_pos) // chunk) + 1
        return RowSpan(held=len(r.prompt), final=r.reserve, steps=prefill_steps + r.max_tokens)

    def _kv_admit(self, rows: list[_Request]) -> tuple[_Request, Any, list[int]] | None:
        """The next request to prefill under the KV budget: (request, cache hit, evictions), or None.

        FIFO: only the head may start. A head that cannot fit waits; once it
        has waited ``kv_queue_wait_s`` it is refused (503 with Retry-After)
        and the next one is considered.
        """
        now = time.monotonic()
        spans = [self._span(r) for r in rows]
        while self.waiting:
            head = self.waiting[0]
            decision, hit = self.kv.admit(
                now=now, rows=spans, request=self._span(head), prompt=head.prompt,
                waiting_since=head.submitted_at, step_s=self._step_s,
            )  # fmt: skip
            if isinstance(decision, Wait):
                return None
            self.waiting.popleft()
            if isinstance(decision, Refuse):
                self._refuse_kv(head, decision)
                continue
            return head, hit, list(decision.evict)
        return None

    def _refuse_kv(self, request: _Request, decision: Refuse) -> None:
        """End a queued request with 503 ``kv_budget_exhausted`` (the runner keeps serving)."""
        assert not request.done and request.next_seq == 0, request.task_id
        request.done = True
        n_prompt = len(request.prompt)
        error = ChunkError(
            message=decision.message, type="service_unavailable", code=KV_BUDGET_EXHAUSTED, retry_after_s=decision.retry_after_s
        )
        self._out.append(
            TokenChunk(
                command_id=request.task.command_id,
                task_id=request.task_id,
                seq=0,
                finish_reason="error",
                usage=Usage(prompt_tokens=n_prompt, completion_tokens=0, total_tokens=n_prompt),
                error=error,
            )
        )
        request.next_seq = 1
        del self._by_id[request.task_id]

    def kv_snapshot(self) -> KvSnapshot:
        """The KV ledger now: budget, rows' reservation, prefix cache and its counters."""
        spans = [self._span(r) for r in self.rows if not r.done]
        if self.prefilling is not None:
            spans.append(self._span(self.prefilling))
        return self.kv.snapshot(spans)

    def clear_prefix_cache(self) -> None:
        """Drop every prefix-cache entry on every rank and zero the counters (idle only: after warmup)."""
        assert not self.has_work(), "clear the prefix cache only while idle"
        evict = tuple(self.kv.evict_all())
        self.kv.reset_counters()
        if evict:
            plan = Plan(evict=evict)
            if self._plans is not None:
                self._plans(plan.encode())
            logits, pending = self._state.apply(plan, None)
            assert logits is None
            mx.eval(pending)

    def _bitmask(self, rows: list[_Request]) -> mx.array:
        """The batch's token bitmask: each live grammar's mask, all-ones for free rows."""
        words = self.grammar_tokenizer().words
        live = [r.grammar if (r.grammar is not None and not r.done and r.grammar_state != "deferred") else None for r in rows]
        mask = batch_bitmask(live, words)
        if self._think_id is not None:
            bits = mask.view(np.uint32)
            for i, r in enumerate(rows):
                if r.grammar_state == "open":  # a <think> block may open before the grammar starts
                    bits[i, self._think_id // 32] |= np.uint32(1 << (self._think_id % 32))
        return mx.array(mask)

    def _sample_row(self, r: _Request) -> SampleRow:
        preceding: tuple[int, ...] = ()
        if r.sampling.repetition_penalty != 1.0:
            # The input of this step is token len(prompt) - 1 + scheduled of the
            # full sequence; at most one generated token is still unread, so
            # everything before the input is known on the host.
            end = len(r.prompt) - 1 + r.scheduled
            known = r.prompt + r.generated
            assert len(known) >= end, (len(known), end)
            preceding = tuple(known[max(0, end - 32) : end])
        return SampleRow(params=r.sampling, index=r.scheduled, preceding=preceding)

    def _materialize(self, done: _Outstanding) -> None:
        tokens = done.out.tokens.tolist()
        chosen = done.out.chosen_logprobs.tolist() if done.out.chosen_logprobs is not None else None
        top_ids = done.out.top_ids.tolist() if done.out.top_ids is not None else None
        top_lps = done.out.top_logprobs.tolist() if done.out.top_logprobs is not None else None
        now = time.monotonic()
        for i, request in enumerate(done.rows):
            if request.done:
                continue
            token = int(tokens[i])
            request.generated.append(token)
            if not request.first_token_at:
                request.first_token_at = now
            request.last_token_at = now
            logprobs = None
            if request.sampling.logprobs and chosen is not None:
                tops: tuple[TopLogprob, ...] = ()
                k = request.sampling.top_logprobs
                if k and top_ids is not None and top_lps is not None:
                    pairs = sorted(zip(top_lps[i], top_ids[i]), key=lambda p: (-p[0], p[1]))[:k]
                    tops = tuple(TopLogprob(token=self._text_of(t), logprob=float(lp)) for lp, t in pairs)
                logprobs = (TokenLogprob(token=self._text_of(token), logprob=float(chosen[i]), top_logprobs=tops),)
            self._accept(request, token, logprobs)

    def _text_of(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self.tokenizer.decode([token])
            self._token_text[token] = text
        return text

    def _accept(self, request: _Request, token: int, logprobs: tuple[TokenLogprob, ...] | None) -> None:
        if request.cancelled:
            self._finish(request, "cancelled", "", ())
            return
        grammar_done = False
        grammar = request.grammar
        if grammar is not None and token not in self._eos:
            if request.grammar_state == "open":
                request.grammar_state = "deferred" if token == self._think_id else "live"
            if request.grammar_state == "live":
                if not grammar.consume(token):
                    # The mask forbade this token, so this is a bug: end loudly, never emit invalid output.
                    self._fail(request, f"constrained decoding failed: the grammar refused token {token} ({grammar.error})")
                    return
                grammar_done = grammar.stopped
        finish: FinishReason | None = None
        text = ""
        if token in self._eos:
            finish = "stop"
            request.detok.finalize()
            shown, stopped = request.stop.push(request.detok.last_segment)
            text = shown if stopped else shown + request.stop.flush()
        else:
            request.detok.add_token(token)
            text, stopped = request.stop.push(request.detok.last_segment)
            if stopped:
                finish = "stop"
            elif grammar_done or len(request.generated) >= request.max_tokens:
                # A complete grammar admits nothing more: the reply is over.
                finish = "stop" if grammar_done else "length"
                request.detok.finalize()
                shown, stopped = request.stop.push(request.detok.last_segment)
                text += shown if stopped else shown + request.stop.flush()
                if stopped:
                    finish = "stop"
        reply = request.reply
        parts = Parts(content=text) if reply is None else reply.push(text)
        if reply is not None:
            if finish is not None:
                parts.add(reply.flush())
                if finish == "stop" and reply.calls:
                    finish = "tool_calls"
            if request.grammar_state == "deferred" and reply.reasoning_done:
                request.grammar_state = "live"  # the <think> block closed: the grammar takes over
        if finish is None:
            self._chunk(request, text=parts, token_ids=(token,), logprobs=logprobs)
        else:
            self._finish(request, finish, parts, (token,), logprobs)

    def _fail(self, request: _Request, message: str) -> None:
        """End ``request`` with a server error (its row leaves at the next step)."""
        assert not request.done, request.task_id
        request.done = True
        n_prompt, n_gen = len(request.prompt), len(request.generated)
        self._out.append(
            TokenChunk(
                command_id=request.task.command_id,
                task_id=request.task_id,
                seq=request.next_seq,
                finish_reason="error",
                usage=Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen),
                error=ChunkError(message=message, type="server_error", code="internal_error"),
            )
        )
        request.next_seq += 1
        del self._by_id[request.task_id]

    def _call_deltas(self, request: _Request, parts: Parts) -> tuple[ToolCallDelta, ...]:
        deltas = []
        for call in parts.calls:
            deltas.append(ToolCallDelta(index=request.calls_sent, id=call.id, name=call.name, arguments=call.arguments))
            request.calls_sent += 1
        return tuple(deltas)

    def _chunk(
        self,
        request: _Request,
        *,
        text: str | Parts,
        token_ids: tuple[int, ...],
        logprobs: tuple[TokenLogprob, ...] | None = None,
        finish: FinishReason | None = None,
        usage: Usage | None = None,
        stats: GenerationStats | None = None,
    ) -> None:
        parts = text if isinstance(text, Parts) else Parts(content=text)
        self._out.append(
            TokenChunk(
                command_id=request.task.command_id,
                task_id=request.task_id,
                seq=request.next_seq,
                text=parts.content,
                reasoning=parts.reasoning,
                tool_calls=self._call_deltas(request, parts),
                token_ids=token_ids,
                logprobs=logprobs,
                finish_reason=finish,
                usage=usage,
                stats=stats,
            )
        )
        request.next_seq += 1

    def _finish(
        self,
        request: _Request,
        reason: FinishReason,
        text: str | Parts,
        token_ids: tuple[int, ...],
        logprobs: tuple[TokenLogprob, ...] | None = None,
    ) -> None:
        assert not request.done, request.task_id
        request.done = True
        if isinstance(text, str) and request.reply is not None and reason != "cancelled":
            parts = request.reply.push(text).add(request.reply.flush())
        else:
            parts = text if isinstance(text, Parts) else Parts(content=text)
        n_prompt, n_gen = len(request.prompt), len(request.generated)
        prefill_s = (request.first_token_at or time.monotonic()) - (request.prefill_started_at or request.submitted_at)
        decode_s = request.last_token_at - request.first_token_at
        stats = GenerationStats(
            prompt_tps=n_prompt / prefill_s if n_gen and prefill_s > 0 else 0.0,
            generation_tps=(n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else 0.0,
            prompt_tokens=n_prompt,
            generation_tokens=n_gen,
            cached_tokens=request.cached_tokens,
        )
        usage = Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen)
        self._chunk(request, text=parts, token_ids=token_ids, logprobs=logprobs, finish=reason, usage=usage, stats=stats)
        del self._by_id[request.task_id]

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self._emit(out)

    def drain(self) -> None:
        """Run steps until every admitted task has finished."""
        while self.has_work():
            self.step()

    def stop_followers(self) -> None:
        """Distributed only: tell the other ranks to leave ``follow``."""
        if self._plans is not None:
            self._plans(Plan(op=OP_SHUTDOWN).encode())
