"""The generation engine in-process (a world of one): correctness against mlx-lm.

Each test drives a real ``Engine`` over the real default model. Greedy
references come from mlx-lm's own ``generate_step`` on the same weights, so
"equal" means token for token.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors

from skulk.core.tasks import ChatMessage, Task, TokenChunk
from skulk.engine.batch import Engine, EngineConfig, Plan
from tests.engine.helpers import check_stream, make_task, text_of, tokens_of

PROMPTS = [
    "The quick brown fox",
    "Hello! Hi there. Good morning.",
    "What is the capital of France? The capital of France is",
    "Numbers like 0, 1, 2, 3 appear in code and in tables. " * 6,
    "A",
]


class Harness:
    """An engine plus everything it emitted, by task and by step."""

    def __init__(self, loaded: Any, **config: Any) -> None:
        config.setdefault("context_ceiling", 4096)
        self.by_task: dict[str, list[TokenChunk]] = defaultdict(list)
        self.log: list[tuple[int, TokenChunk]] = []
        self.engine = Engine(loaded.shard, loaded.tokenizer, EngineConfig(**config), self._emit)

    def _emit(self, chunks: list[TokenChunk]) -> None:
        for c in chunks:
            self.by_task[c.task_id].append(c)
            self.log.append((self.engine.steps, c))

    def run(self, *tasks: Task) -> list[list[TokenChunk]]:
        for task in tasks:
            self.engine.submit(task)
        self.engine.drain()
        assert not self.engine.has_work()
        return [self.by_task[t.task_id] for t in tasks]


def reference(loaded: Any, ids: list[int], max_tokens: int, **kwargs: Any) -> list[int]:
    """Greedy tokens from mlx-lm's generate_step, cut after the first EOS."""
    out = []
    for token, _ in generate_step(mx.array(ids), loaded.shard.model, max_tokens=max_tokens, **kwargs):
        out.append(int(token))
        if token in loaded.tokenizer.eos_token_ids:
            break
    return out


def greedy(prompt: str, max_tokens: int, **kw: Any) -> Task:
    return make_task(prompt=prompt, max_tokens=max_tokens, temperature=0.0, **kw)


def test_greedy_output_equals_mlx_lm(loaded: Any) -> None:
    h = Harness(loaded, prefill_step_tokens=64, prefill_chunk_tokens=16)
    for prompt in PROMPTS:
        (chunks,) = h.run(greedy(prompt, 48))
        final = check_stream(chunks)
        ids = loaded.tokenizer.encode(prompt)
        expected = reference(loaded, ids, 48, prefill_step_size=64)
        assert tokens_of(chunks) == expected, prompt
        assert final.finish_reason == ("stop" if expected[-1] in loaded.tokenizer.eos_token_ids else "length")
        shown = [t for t in expected if t not in loaded.tokenizer.eos_token_ids]
        assert text_of(chunks) == loaded.tokenizer.decode(shown)
        assert final.usage.prompt_tokens == len(ids) and final.usage.completion_tokens == len(expected)


def test_chat_tasks_use_the_chat_template(loaded: Any) -> None:
    messages = (ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Tell me a story."))
    h = Harness(loaded)
    (chunks,) = h.run(make_task("chat", messages=messages, max_tokens=24, temperature=0.0))
    ids = loaded.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True)
    assert loaded.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert tokens_of(chunks) == reference(loaded, ids, 24)
    assert check_stream(chunks).usage.prompt_tokens == len(ids)


def test_concurrent_greedy_outputs_equal_sequential_ones(loaded: Any) -> None:
    # Batched arithmetic may reorder float reductions; with this model's
    # logit margins the greedy tokens still agree exactly (the property the
    # issue asks for); the logprob check below bounds the numeric drift.
    lengths = [40, 25, 33, 12, 50]
    sequential = Harness(loaded)
    alone = [sequential.run(greedy(p, n, logprobs=True))[0] for p, n in zip(PROMPTS, lengths)]
    together = Harness(loaded, prefill_chunk_tokens=16)
    batched = together.run(*[greedy(p, n, logprobs=True) for p, n in zip(PROMPTS, lengths)])
    for a, b in zip(alone, batched):
        check_stream(b)
        assert tokens_of(a) == tokens_of(b)
        lp_a = [c.logprobs[0].logprob for c in a]
        lp_b = [c.logprobs[0].logprob for c in b]
        assert max(abs(x - y) for x, y in zip(lp_a, lp_b)) < 1e-4
    # They really shared steps: far fewer steps than the sum of their lengths.
    assert together.engine.steps < sum(lengths)


def test_a_long_prefill_does_not_stall_running_streams(loaded: Any) -> None:
    h = Harness(loaded, prefill_chunk_tokens=16)
    runner = greedy(PROMPTS[0], 120)
    h.engine.submit(runner)
    for _ in range(3):
        h.engine.step()
    long_prompt = "The river runs north through the valley, past the old mill. " * 24
    n_prompt = len(loaded.tokenizer.encode(long_prompt))
    late = greedy(long_prompt, 4)
    submitted_at = h.engine.steps
    h.engine.submit(late)
    h.engine.drain()
    first_late = min(step for step, c in h.log if c.task_id == late.task_id)
    running_tokens = [step for step, c in h.log if c.task_id == runner.task_id and submitted_at < step <= first_late]
    chunks_needed = math.ceil((n_prompt - 1) / 16)
    # The running stream produced a token in (nearly) every step of the prefill.
    assert first_late - submitted_at >= chunks_needed
    assert len(running_tokens) >= chunks_needed - 1
    assert tokens_of(h.by_task[late.task_id]) == reference(loaded, loaded.tokenizer.encode(long_prompt), 4)


def test_stop_sequences_cut_the_text_and_end_with_stop(loaded: Any) -> None:
    prompt = PROMPTS[1]
    (full,) = Harness(loaded).run(greedy(prompt, 60))
    text = text_of(full)
    assert len(text) > 40
    stop = text[20:26]
    cut = text.find(stop)
    (stopped,) = Harness(loaded).run(greedy(prompt, 60, stop=(stop, "never-appears")))
    final = check_stream(stopped)
    assert final.finish_reason == "stop"
    assert text_of(stopped) == text[:cut]
    assert len(tokens_of(stopped)) < len(tokens_of(full))
    # A stop string that never appears changes nothing.
    (same,) = Harness(loaded).run(greedy(prompt, 60, stop=("never-appears",)))
    assert text_of(same) == text and check_stream(same).finish_reason == check_stream(full).finish_reason


def test_an_eos_token_ends_with_stop_and_is_not_shown(loaded: Any) -> None:
    (full,) = Harness(loaded).run(greedy(PROMPTS[0], 30))
    tokens = tokens_of(full)
    eos = tokens[10]
    first = tokens.index(eos)
    tokenizer = copy.copy(loaded.tokenizer)
    tokenizer.eos_token_ids = set(loaded.tokenizer.eos_token_ids) | {eos}
    emitted: list[TokenChunk] = []
    engine = Engine(loaded.shard, tokenizer, EngineConfig(context_ceiling=4096), emitted.extend)
    engine.submit(greedy(PROMPTS[0], 30))
    engine.drain()
    final = check_stream(emitted)
    assert final.finish_reason == "stop"
    assert tokens_of(emitted) == tokens[: first + 1]
    assert text_of(emitted) == loaded.tokenizer.decode(tokens[:first])


def test_cancellation_mid_stream_ends_the_task_and_spares_the_others(loaded: Any) -> None:
    h = Harness(loaded)
    victim, bystander = greedy(PROMPTS[0], 200), greedy(PROMPTS[2], 40)
    h.engine.submit(victim)
    h.engine.submit(bystander)
    for _ in range(8):
        h.engine.step()
    assert h.engine.cancel(victim.task_id)
    h.engine.drain()
    final = check_stream(h.by_task[victim.task_id])
    assert final.finish_reason == "cancelled"
    assert 0 < final.usage.completion_tokens < 20
    assert tokens_of(h.by_task[bystander.task_id]) == reference(loaded, loaded.tokenizer.encode(PROMPTS[2]), 40)
    assert not h.engine.cancel(victim.task_id)  # finished: unknown now
    assert not h.engine.cancel("no-such-task")


def test_cancelling_a_queued_task_ends_it_at_once(loaded: Any) -> None:
    h = Harness(loaded, max_concurrent=1)
    first, queued = greedy(PROMPTS[0], 30), greedy(PROMPTS[1], 30)
    h.engine.submit(first)
    h.engine.submit(queued)
    h.engine.step()
    assert h.engine.queued_tasks == 1
    assert h.engine.cancel(queued.task_id)
    final = check_stream(h.by_task[queued.task_id])
    assert final.finish_reason == "cancelled" and final.usage.completion_tokens == 0
    h.engine.drain()
    assert check_stream(h.by_task[first.task_id]).finish_reason in ("length", "stop")


def test_admission_refusals_leave_the_engine_serving(loaded: Any) -> None:
    h = Harness(loaded, context_ceiling=64, default_max_tokens=16)
    too_long = greedy("The quick brown fox jumps over the lazy dog. " * 10, 4)
    too_many = greedy(PROMPTS[0], 100)
    zero = greedy(PROMPTS[0], 0)
    clamped = make_task(prompt=PROMPTS[0], temperature=0.0)  # no max_tokens: clamped, ends with length
    fine = greedy(PROMPTS[0], 10)
    results = h.run(too_long, too_many, zero, clamped, fine)
    for chunks, code in zip(results[:3], ("context_length_exceeded", "context_length_exceeded", "invalid_value")):
        assert len(chunks) == 1
        final = check_stream(chunks)
        assert final.finish_reason == "error" and final.error is not None
        assert final.error.code == code and final.error.type == "invalid_request_error"
    assert results[0][0].error.message.startswith("context_length_exceeded:")
    assert check_stream(results[3]).usage.completion_tokens == 16  # the default output cap
    assert check_stream(results[3]).finish_reason == "length"
    assert tokens_of(results[4]) == reference(loaded, loaded.tokenizer.encode(PROMPTS[0]), 10)


def test_invalid_requests_are_refused_in_band(loaded: Any) -> None:
    h = Harness(loaded)
    bad_top_p = make_task(prompt="x", max_tokens=4, top_p=0.0)
    no_messages = make_task("chat", messages=(), max_tokens=4)
    no_prompt = make_task(max_tokens=4)
    for chunks in h.run(bad_top_p, no_messages, no_prompt):
        final = check_stream(chunks)
        assert final.finish_reason == "error" and final.error.type == "invalid_request_error"
    assert "top_p" in h.by_task[bad_top_p.task_id][0].error.message


def test_the_concurrency_ceiling_queues_extra_tasks(loaded: Any) -> None:
    h = Harness(loaded, max_concurrent=2)
    tasks = [greedy(p, 12) for p in PROMPTS[:4]]
    for task in tasks:
        h.engine.submit(task)
    peak = 0
    while h.engine.has_work():
        h.engine.step()
        peak = max(peak, len(h.engine.rows) + (h.engine.prefilling is not None))
    assert peak == 2
    for task, prompt in zip(tasks, PROMPTS):
        assert tokens_of(h.by_task[task.task_id]) == reference(loaded, loaded.tokenizer.encode(prompt), 12)


def test_logprobs_match_mlx_lm(loaded: Any) -> None:
    ids = loaded.tokenizer.encode(PROMPTS[2])
    (chunks,) = Harness(loaded).run(greedy(PROMPTS[2], 12, logprobs=True, top_logprobs=5))
    ref = list(generate_step(mx.array(ids), loaded.shard.model, max_tokens=12))
    for chunk, (token, logprobs) in zip(chunks, ref):
        (lp,) = chunk.logprobs
        assert math.isclose(lp.logprob, logprobs[token].item(), rel_tol=1e-5, abs_tol=1e-5)
        assert len(lp.top_logprobs) == 5
        values = [t.logprob for t in lp.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert math.isclose(values[0], lp.logprob, abs_tol=1e-6)  # greedy picked the top token
        assert lp.token == loaded.tokenizer.decode([int(token)])


def test_seeded_sampling_is_reproducible_alone_or_batched(loaded: Any) -> None:
    def sampled(seed: int) -> Task:
        return make_task(prompt=PROMPTS[1], max_tokens=30, temperature=0.9, top_p=0.95, seed=seed)

    (alone,) = Harness(loaded).run(sampled(7))
    (again,) = Harness(loaded).run(sampled(7))
    _, batched, _ = Harness(loaded).run(greedy(PROMPTS[0], 20), sampled(7), sampled(8))
    (other,) = Harness(loaded).run(sampled(8))
    assert tokens_of(alone) == tokens_of(again) == tokens_of(batched)
    assert tokens_of(other) != tokens_of(alone)
    greedy_tokens = tokens_of(Harness(loaded).run(greedy(PROMPTS[1], 30))[0])
    assert tokens_of(alone) != greedy_tokens  # it really sampled


def test_repetition_penalty_matches_mlx_lm(loaded: Any) -> None:
    # Exercises the pipelined path: the penalty's context includes the token
    # still being computed when the next step is built.
    ids = loaded.tokenizer.encode(PROMPTS[1])
    (chunks,) = Harness(loaded).run(greedy(PROMPTS[1], 40, repetition_penalty=1.8))
    expected = reference(loaded, ids, 40, logits_processors=make_logits_processors(repetition_penalty=1.8))
    assert tokens_of(chunks) == expected
    assert expected != reference(loaded, ids, 40)  # the penalty changed something


def test_generation_stats(loaded: Any) -> None:
    (chunks,) = Harness(loaded).run(greedy(PROMPTS[3], 20))
    final = check_stream(chunks)
    assert final.stats is not None
    assert final.stats.prompt_tokens == final.usage.prompt_tokens
    assert final.stats.generation_tokens == final.usage.completion_tokens == 20
    assert final.stats.prompt_tps > 0 and final.stats.generation_tps > 0
    assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens


@pytest.mark.parametrize(
    "plan",
    [
        Plan(),
        Plan(keep=(), prefill_start=True, prefill_tokens=(5, 6, 7), join=True, inputs=(1,)),
        Plan(keep=(0, 2), prefill_tokens=tuple(range(300)), inputs=(4, 5)),
    ],
)
def test_plans_round_trip(plan: Plan) -> None:
    assert Plan.decode(plan.encode()) == plan
