"""The prefix cache and the KV budget in one process (``skulk.engine.prefix_cache``).

Every test drives a real ``Engine`` over the real default model. "Equal"
means token for token what the same engine produces with the prefix cache
off (``prefix_cache_bytes=0``), which is itself checked against mlx-lm in
``test_batch.py``. After every step the bytes the caches really hold (the
decode batch, the prefill cache and every entry, as mlx-lm reports them) are
checked against the ledger's budget.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from skulk.core.kv_budget import KV_BUDGET_EXHAUSTED
from skulk.core.tasks import ChatMessage, Task, TokenChunk
from skulk.engine.batch import Engine, EngineConfig, Plan
from skulk.engine.prefix_cache import SLACK_TOKENS, PrefixIndex
from tests.engine.helpers import check_stream, make_task, text_of, tokens_of

LONG = "Numbers like 0, 1, 2, 3 appear in code and in tables. " * 6


def held_bytes(engine: Engine) -> int:
    """What the caches of rank 0 really hold now, in bytes (as mlx-lm counts them)."""
    state = engine._state
    total = state.prefix.nbytes
    for cache in (state.decode_cache, state.prefill_cache):
        total += sum(c.nbytes for c in cache or [])
    return total


class Harness:
    """An engine, what it emitted per task, and a check of the KV budget after every step."""

    def __init__(self, loaded: Any, **config: Any) -> None:
        config.setdefault("context_ceiling", 4096)
        config.setdefault("prefill_step_tokens", 64)
        config.setdefault("prefill_chunk_tokens", 16)
        self.by_task: dict[str, list[TokenChunk]] = defaultdict(list)
        self.engine = Engine(loaded.shard, loaded.tokenizer, EngineConfig(**config), self._emit)
        self.peak_bytes = 0
        self.max_rows = 0

    def _emit(self, chunks: list[TokenChunk]) -> None:
        for c in chunks:
            self.by_task[c.task_id].append(c)

    def step(self) -> None:
        self.engine.step()
        mx.eval([c.state for cache in (self.engine._state.decode_cache, self.engine._state.prefill_cache) for c in cache or []])
        held = held_bytes(self.engine)
        self.peak_bytes = max(self.peak_bytes, held)
        self.max_rows = max(self.max_rows, len(self.engine.rows) + (self.engine.prefilling is not None))
        snap = self.engine.kv_snapshot()
        if snap.bytes_per_position:
            assert held <= snap.budget_positions * snap.bytes_per_position, (held, snap)
        assert snap.rows_positions + snap.cache_positions <= snap.budget_positions, snap
        # The index and the store hold the same entries with the same positions.
        index = {e.entry_id: e.tokens for e in self.engine.kv.index.entries()}
        store = {i: layers[0].offset for i, layers in self.engine._state.prefix.entries.items()}
        assert index == store, (index, store)

    def run(self, *tasks: Task, stagger: int = 0) -> list[list[TokenChunk]]:
        for i, task in enumerate(tasks):
            self.engine.submit(task)
            for _ in range(stagger if i < len(tasks) - 1 else 0):
                self.step()
        while self.engine.has_work():
            self.step()
        return [self.by_task[t.task_id] for t in tasks]


def greedy(prompt: str, max_tokens: int, **kw: Any) -> Task:
    return make_task(prompt=prompt, max_tokens=max_tokens, temperature=0.0, **kw)


def chat(messages: list[tuple[str, str]], max_tokens: int) -> Task:
    msgs = tuple(ChatMessage(role=r, content=c) for r, c in messages)
    return make_task(kind="chat", messages=msgs, max_tokens=max_tokens, temperature=0.0)


def test_a_multi_turn_chat_reuses_its_history_and_answers_the_same(loaded: Any) -> None:
    cached, plain = Harness(loaded), Harness(loaded, prefix_cache_bytes=0)
    history: list[tuple[str, str]] = [("system", "You are terse."), ("user", "Tell me about foxes.")]
    reused, prompt_lengths = [], []
    for turn in range(5):
        (got,) = cached.run(chat(history, 24))
        (expected,) = plain.run(chat(history, 24))
        final = check_stream(got)
        assert tokens_of(got) == tokens_of(expected), f"turn {turn}"
        assert final.usage == expected[-1].usage
        assert final.stats is not None and expected[-1].stats is not None
        assert expected[-1].stats.cached_tokens == 0
        reused.append(final.stats.cached_tokens)
        prompt_lengths.append(final.usage.prompt_tokens)
        history += [("assistant", text_of(got)), ("user", f"And then what happened on day {turn}?")]
    assert reused[0] == 0
    # From turn 2 on, at least the whole previous prompt comes from the cache. (The
    # random test model's replies are not valid UTF-8, so their re-tokenised text in
    # the next prompt may differ from the generated tokens after a few of them.)
    assert all(reused[k] >= prompt_lengths[k - 1] for k in range(1, 5)), (reused, prompt_lengths)
    snap = cached.engine.kv_snapshot()
    assert snap.hits == 4 and snap.misses == 1 and snap.positions_reused == sum(reused)
    assert snap.stored == 5 and snap.cache_entries >= 1


def test_an_entry_that_a_longer_one_extends_is_superseded(loaded: Any) -> None:
    h = Harness(loaded)
    first_prompt = LONG.strip()
    second_prompt = first_prompt + " And the conversation goes on."
    a, b = loaded.tokenizer.encode(first_prompt), loaded.tokenizer.encode(second_prompt)
    assert b[: len(a)] == a
    # max_tokens 1: the row's cache holds exactly the prompt.
    h.run(greedy(first_prompt, 1))
    (first,) = h.engine.kv.index.entries()
    assert first.tokens == len(a)
    (got,) = h.run(greedy(second_prompt, 6))
    assert got[-1].stats.cached_tokens == len(a)
    (second,) = h.engine.kv.index.entries()
    assert second.tokens > first.tokens and second.entry_id != first.entry_id
    assert h.engine.kv_snapshot().evicted == 1 and h.engine._state.prefix.entries.keys() == {second.entry_id}


def test_exact_and_diverging_prompts_reuse_the_common_prefix(loaded: Any) -> None:
    cached, plain = Harness(loaded), Harness(loaded, prefix_cache_bytes=0)
    prompts = [LONG, LONG, LONG[:-40] + "and then something else entirely", LONG[:100]]
    for prompt in prompts:
        (got,) = cached.run(greedy(prompt, 16))
        (expected,) = plain.run(greedy(prompt, 16))
        assert tokens_of(got) == tokens_of(expected), prompt
    ids = [loaded.tokenizer.encode(p) for p in prompts]
    stats = [cached.by_task[t][-1].stats for t in cached.by_task]
    assert stats[0].cached_tokens == 0
    # The same prompt again: everything but the last token (the first decode input).
    assert stats[1].cached_tokens == len(ids[1]) - 1
    # A prompt that diverges: the common prefix only, trimmed out of a longer entry.
    common = next(i for i, (a, b) in enumerate(zip(ids[0], ids[2])) if a != b)
    assert stats[2].cached_tokens == common
    assert 0 < stats[3].cached_tokens <= len(ids[3]) - 1


def test_cache_hits_join_a_running_batch_and_answer_the_same(loaded: Any) -> None:
    cached, plain = Harness(loaded), Harness(loaded, prefix_cache_bytes=0)
    warm = [greedy(LONG, 8), greedy("The quick brown fox", 8)]
    cached.run(*warm)
    tasks = [greedy(LONG + " More.", 30), greedy("The quick brown fox jumps", 30), greedy("Hello! Hi there.", 30)]
    got = cached.run(*tasks, stagger=3)
    expected = plain.run(*[greedy(t.params.prompt or "", 30) for t in tasks], stagger=3)
    for g, e in zip(got, expected):
        assert tokens_of(g) == tokens_of(e)
    assert [cached.by_task[t.task_id][-1].stats.cached_tokens > 0 for t in tasks] == [True, True, False]


def test_an_entry_is_never_modified_by_the_requests_it_seeds(loaded: Any) -> None:
    h = Harness(loaded)
    h.run(greedy(LONG, 4))
    ((entry_id, layers),) = h.engine._state.prefix.entries.items()
    before = [np.array(c.keys) for c in layers] + [np.array(c.values) for c in layers]
    # Two requests seeded from it, one extending it, one diverging (trimmed): both write after the seed.
    h.run(greedy(LONG + " And more.", 12), greedy(LONG[:60] + " different", 12))
    assert h.by_task and all(s.stats.cached_tokens > 0 for s in [h.by_task[t][-1] for t in list(h.by_task)[1:]])
    after = [np.array(c.keys) for c in layers] + [np.array(c.values) for c in layers]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_entries_hold_exactly_their_positions_and_are_evicted_oldest_first(loaded: Any) -> None:
    prompts = [f"{name} says: " + LONG[: 200 + 10 * i] for i, name in enumerate(("Alpha", "Bravo", "Charlie", "Delta"))]
    firsts = {loaded.tokenizer.encode(p)[0] for p in prompts}
    assert len(firsts) == 4, "the conversations share no prefix"
    probe = Harness(loaded)
    probe.run(greedy(prompts[0], 4))
    per_position = probe.engine.kv_snapshot().bytes_per_position
    entry_positions = probe.engine.kv_snapshot().cache_positions
    assert per_position > 0 and probe.engine._state.prefix.nbytes == entry_positions * per_position

    # Room for two of these entries in the cache, not three.
    h = Harness(loaded, prefix_cache_bytes=int(2.5 * entry_positions * per_position))
    for prompt in prompts:
        h.run(greedy(prompt, 4))
    snap = h.engine.kv_snapshot()
    assert snap.cache_entries == 2 and snap.evicted == 2 and snap.stored == 4 and snap.hits == 0
    assert h.engine._state.prefix.nbytes == snap.cache_positions * snap.bytes_per_position
    assert snap.cache_positions <= 2.5 * entry_positions
    # The two most recent conversations are the ones left: they hit, the oldest misses.
    h.run(greedy(prompts[3], 4), greedy(prompts[0], 4))
    last = [h.by_task[t][-1].stats.cached_tokens for t in list(h.by_task)[-2:]]
    assert last[0] > 0 and last[1] == 0


def test_oversubscribed_requests_queue_then_run_within_the_budget(loaded: Any) -> None:
    # Budget: one request at the ceiling (300 + slack). Each request reserves about 120 + 80
    # positions, so only one runs at a time; the others wait their turn and all complete.
    h = Harness(loaded, context_ceiling=300, kv_queue_wait_s=3600.0)
    prompt = "word " * 60  # 120 tokens
    assert len(loaded.tokenizer.encode(prompt + "0")) <= 130
    tasks = [greedy(prompt + str(i), 80) for i in range(4)]
    chunks = h.run(*tasks)
    assert all(check_stream(c).finish_reason in ("stop", "length") for c in chunks)
    assert h.engine.kv_snapshot().budget_positions == 300 + SLACK_TOKENS
    assert h.engine.kv_snapshot().refused == 0
    assert h.max_rows == 1, "two rows would need 2 x (200 + slack) positions: more than the budget"


def test_a_request_that_waits_too_long_gets_a_clean_503_and_the_engine_keeps_serving(loaded: Any) -> None:
    h = Harness(loaded, context_ceiling=300, kv_queue_wait_s=0.0)
    long_one = greedy("word " * 75, 100)  # 150 + 100 positions
    second = greedy("word " * 50, 60)  # 100 + 60: fits alone, not beside the first
    h.engine.submit(long_one)
    h.step()  # the first request starts
    h.engine.submit(second)
    while h.engine.has_work():
        h.step()
    refused = h.by_task[second.task_id]
    assert len(refused) == 1 and refused[0].finish_reason == "error"
    err = refused[0].error
    assert err is not None and err.code == KV_BUDGET_EXHAUSTED and err.type == "service_unavailable"
    assert err.message.startswith(KV_BUDGET_EXHAUSTED + ":") and err.retry_after_s is not None and err.retry_after_s >= 1
    assert check_stream(h.by_task[long_one.task_id]).finish_reason in ("stop", "length")
    assert h.engine.kv_snapshot().refused == 1
    # Alone, the refused request fits and runs.
    (again,) = h.run(greedy("word " * 50, 60))
    assert check_stream(again).finish_reason in ("stop", "length")


def test_concurrent_rows_and_the_cache_stay_within_the_budget_in_bytes(loaded: Any) -> None:
    h = Harness(loaded, context_ceiling=512, kv_queue_wait_s=3600.0)
    prompts = [f"Stream {i}: " + LONG[: 80 + 30 * i] for i in range(6)]
    h.run(*[greedy(p, 40) for p in prompts], stagger=1)
    h.run(*[greedy(p + " again", 40) for p in prompts], stagger=1)
    snap = h.engine.kv_snapshot()
    assert h.peak_bytes <= snap.budget_positions * snap.bytes_per_position
    assert snap.hits >= 1


def test_clearing_the_cache_forgets_every_entry(loaded: Any) -> None:
    h = Harness(loaded)
    h.run(greedy(LONG, 4), greedy("Another prompt entirely", 4))
    assert h.engine.kv_snapshot().cache_entries == 2
    h.engine.clear_prefix_cache()
    snap = h.engine.kv_snapshot()
    assert snap.cache_entries == 0 and snap.stored == 0 and h.engine._state.prefix.entries == {}
    (got,) = h.run(greedy(LONG, 4))
    assert got[-1].stats.cached_tokens == 0


def test_the_index_finds_the_longest_reusable_prefix() -> None:
    index = PrefixIndex()
    a, _ = index.add([1, 2, 3, 4, 5])
    b, _ = index.add([1, 2, 9])
    assert index.lookup([1, 2, 3, 4, 5, 6]) == (hit := index.lookup([1, 2, 3, 4, 5, 6])) and hit.entry_id == a
    assert hit.positions == 5
    assert index.lookup([1, 2, 3, 7, 7]).positions == 3  # trimmed from the longer entry
    assert index.lookup([1, 2, 9, 9]).entry_id == b
    assert index.lookup([1, 2, 3, 4, 5]).positions == 4  # never the last prompt token
    assert index.lookup([7, 1, 2]) is None
    assert index.lookup([1]) is None  # nothing before the first decode input
    # A longer sequence supersedes the entries that are its prefixes.
    c, superseded = index.add([1, 2, 3, 4, 5, 6, 7])
    assert superseded == (a,) and len(index) == 2
    assert [e.entry_id for e in index.entries()] == [b, c]
    index.remove(b)
    assert index.lookup([1, 2, 9, 9]).positions == 2  # only the common prefix with c is left


@pytest.mark.parametrize(
    "plan",
    [
        Plan(store=((0, 7, 120), (2, 8, 5)), evict=(1, 3)),
        Plan(drop_prefill=True, prefill_start=True, seed_entry=0, seed_positions=3),
        Plan(keep=(1,), prefill_start=True, prefill_tokens=(5, 6), seed_entry=4, seed_positions=99, inputs=(3,)),
    ],
)
def test_plans_with_cache_operations_round_trip(plan: Plan) -> None:
    assert Plan.decode(plan.encode()) == plan


def test_a_cancelled_prefill_frees_its_cache(loaded: Any) -> None:
    h = Harness(loaded, prefill_step_tokens=16, prefill_chunk_tokens=16)
    task = greedy(LONG * 2, 8)
    h.engine.submit(task)
    h.step()
    h.step()
    assert h.engine.prefilling is not None and h.engine._state.prefill_cache is not None
    h.engine.cancel(task.task_id)
    h.step()
    assert h.engine._state.prefill_cache is None
    assert check_stream(h.by_task[task.task_id]).finish_reason == "cancelled"
