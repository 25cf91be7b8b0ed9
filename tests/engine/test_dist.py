"""Several real runner processes on loopback: pipeline and tensor ranks match one process.

Each instance's ranks form an ``mx.distributed`` ring over TCP; tasks go to
rank 0 only, which schedules every step and broadcasts it. Greedy tokens must
equal those of a single-process runner on the same model.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path
from typing import Any

import pytest

from skulk.core.instances import KvUse, RunnerReady, ShardMetadata
from skulk.core.tasks import TokenChunk
from skulk.engine.batch import Engine, EngineConfig
from skulk.engine.client import RunnerProcess
from skulk.engine.protocol import EXIT_OK
from tests.engine.helpers import check_stream, free_ports, make_spec, make_task, pipeline_shard, tensor_shard, tokens_of

START_TIMEOUT_S = 120
PROMPTS = [
    "The quick brown fox",
    # Long enough that its prefill plan exceeds one broadcast frame.
    "The river runs north through the valley, past the old mill, under the stone bridge. " * 14,
    "Hello! Hi there. Good morning.",
]
MAX_TOKENS = 16


def start_instance(name: str, shards: list[ShardMetadata], model: Path, env: dict[str, str]) -> list[RunnerProcess]:
    hosts = tuple(f"127.0.0.1:{p}" for p in free_ports(len(shards)))
    procs = [
        RunnerProcess.spawn(make_spec(shard, hosts=hosts, instance=name, connect_deadline_s=60), model, env=env)
        for shard in shards
    ]
    try:
        for proc in procs:
            proc.wait_for_status(RunnerReady, START_TIMEOUT_S)
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    return procs


@pytest.fixture(scope="module")
def single_tokens(single_runner: RunnerProcess) -> list[list[int]]:
    """Greedy tokens of a one-process runner, for every prompt."""
    out = []
    for prompt in PROMPTS:
        chunks = single_runner.generate(make_task(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0), timeout=120)
        check_stream(chunks)
        out.append(tokens_of(chunks))
    return out


LAYOUTS = {
    "pipeline-2": [pipeline_shard(0, 2, 0, 3), pipeline_shard(1, 2, 3, 6)],
    # Uneven on purpose: stages need not be equal.
    "pipeline-3": [pipeline_shard(0, 3, 0, 1), pipeline_shard(1, 3, 1, 4), pipeline_shard(2, 3, 4, 6)],
    "tensor-2": [tensor_shard(0, 2), tensor_shard(1, 2)],
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def instance(request: pytest.FixtureRequest, tiny_path: Path, runner_env: dict[str, str]) -> Iterator[list[RunnerProcess]]:
    procs = start_instance(request.param, LAYOUTS[request.param], tiny_path, runner_env)
    try:
        yield procs
        # Teardown checks the shutdown path: rank 0 broadcasts it, so every
        # other rank leaves cleanly without being told by its own parent.
        assert procs[0].shutdown(timeout=30) == EXIT_OK
        assert all(proc.wait_exit(30) == EXIT_OK for proc in procs[1:])
    finally:
        for proc in procs:
            proc.kill()


def test_greedy_tokens_equal_one_process_sequentially_and_batched(
    instance: list[RunnerProcess], single_tokens: list[list[int]]
) -> None:
    rank0 = instance[0]
    for prompt, expected in zip(PROMPTS, single_tokens):
        chunks = rank0.generate(make_task(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0), timeout=120)
        check_stream(chunks)
        assert tokens_of(chunks) == expected
    # All at once: continuous batching across ranks, in lockstep.
    tasks = [make_task(prompt=p, max_tokens=MAX_TOKENS, temperature=0.0) for p in PROMPTS]
    for task in tasks:
        rank0.submit(task)
    done = rank0.collect([t.task_id for t in tasks], 120)
    assert [tokens_of(done[t.task_id]) for t in tasks] == single_tokens


def test_prefix_cache_hits_across_ranks_answer_as_without_a_cache(instance: list[RunnerProcess], loaded: Any) -> None:
    """Rank 0 decides hits and every rank seeds from its own entries: greedy output is unchanged.

    The reference is an in-process engine with the prefix cache off. Each turn
    extends the previous turn's prompt, so from the second turn on most of the
    prompt comes from the cache on every rank (a rank that seeded wrongly
    would change the hidden states rank 0 samples from).
    """
    plain = Engine(loaded.shard, loaded.tokenizer, EngineConfig(context_ceiling=2048, prefix_cache_bytes=0), lambda chunks: None)
    got: dict[str, list[TokenChunk]] = {}
    plain._emit = lambda chunks: [got.setdefault(c.task_id, []).append(c) for c in chunks]
    rank0 = instance[0]
    prompt = "In the first chapter, the river runs north through the valley."
    cached = []
    for turn in range(3):
        task = make_task(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0)
        chunks = rank0.generate(task, timeout=120)
        final = check_stream(chunks)
        plain.submit(task)
        plain.drain()
        assert tokens_of(chunks) == tokens_of(got[task.task_id]), f"turn {turn}"
        assert final.stats is not None
        cached.append(final.stats.cached_tokens)
        prompt += f" In chapter {turn + 2}, the story goes on."
    assert all(n > 0 for n in cached[1:]), cached
    kv = _last_kv(rank0)
    assert kv.prefix_hits >= 2 and kv.cache_entries >= 1 and kv.bytes_per_position > 0


def _last_kv(proc: RunnerProcess) -> KvUse:
    """Rank 0's KV ledger from its next heartbeat."""
    seen = len(proc.heartbeats)
    deadline = time.monotonic() + 30
    while len(proc.heartbeats) <= seen and time.monotonic() < deadline:
        proc.recv(timeout=0.5)
    kv = proc.heartbeats[-1].kv
    assert kv is not None, "rank 0 reports its KV ledger in heartbeats"
    return kv


def test_tasks_go_to_rank_zero_only(instance: list[RunnerProcess]) -> None:
    other = instance[-1]
    chunks = other.generate(make_task(prompt="Hello", max_tokens=4), timeout=30)
    final = check_stream(chunks)
    assert final.finish_reason == "error" and final.error is not None and final.error.code == "wrong_rank"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_idle_followers_sleep_instead_of_spinning(instance: list[RunnerProcess]) -> None:
    # MLX's ring backend busy-polls inside a collective (an idle follower used
    # to burn about 70% of a core); rank 0's idle ticks let followers sleep.
    time.sleep(1.0)  # let the tick interval grow to its maximum
    before = [_cpu_seconds(p.pid) for p in instance]
    time.sleep(3.0)
    used = [_cpu_seconds(p.pid) - b for p, b in zip(instance, before)]
    assert all(u < 0.45 for u in used), used  # a spinning rank used >= 2 s here on an idle machine
    # And they still answer promptly after the idle spell.
    chunks = instance[0].generate(make_task(prompt="Hello", max_tokens=4, temperature=0.0), timeout=60)
    assert check_stream(chunks).finish_reason in ("length", "stop")


def test_pipeline_ranks_that_hold_only_their_own_weight_files_match_one_process(
    tiny_path: Path, runner_env: dict[str, str], single_tokens: list[list[int]], tmp_path: Path
) -> None:
    """Issue 14: a node fetches only its stage's weight files; the ranks still compute the same tokens."""
    import shutil

    from skulk.engine.shard import partial_weights
    from tests.support.hub import shard_repo

    full = shard_repo(tiny_path, tmp_path / "full", 3)  # files: layers 0-1 + embedding, 2-3, 4-5 + norm + head
    shards = LAYOUTS["pipeline-3"]  # ranks hold [0, 1), [1, 4), [4, 6)
    keep = [
        {"model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"},  # rank 0: layer 0, embed, head
        {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"},  # rank 1: layers 1-3
        {"model-00003-of-00003.safetensors"},  # rank 2: layers 4-5
    ]
    dirs = []
    for rank, files in enumerate(keep):
        d = shutil.copytree(full, tmp_path / f"rank{rank}")
        for f in d.glob("model-*.safetensors"):
            if f.name not in files:
                f.unlink()
        assert partial_weights(d, shards[rank]) is True
        dirs.append(d)
    # A rank missing a file it needs is refused before it loads anything.
    with pytest.raises(ValueError, match="model-00002-of-00003.safetensors"):
        partial_weights(dirs[2], shards[1])
    with pytest.raises(ValueError, match="every layer"):
        partial_weights(dirs[2], None)

    hosts = tuple(f"127.0.0.1:{p}" for p in free_ports(3))
    procs = [RunnerProcess.spawn(make_spec(shard, hosts=hosts, instance="partial", connect_deadline_s=60), d,
                                 env=runner_env) for shard, d in zip(shards, dirs)]
    try:
        for proc in procs:
            proc.wait_for_status(RunnerReady, START_TIMEOUT_S)
        for prompt, expected in zip(PROMPTS, single_tokens):
            chunks = procs[0].generate(make_task(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0), timeout=120)
            check_stream(chunks)
            assert tokens_of(chunks) == expected
        assert procs[0].shutdown(timeout=30) == EXIT_OK
    finally:
        for proc in procs:
            proc.kill()


def test_constrained_rows_stay_in_step_and_match_one_process(
    instance: list[RunnerProcess], single_runner: RunnerProcess
) -> None:
    # Only rank 0 samples, so only rank 0 holds grammars; the other ranks follow its plans.
    # A forced call and a json_schema reply, batched with a free row, give the one-process
    # tokens and valid output on every layout.
    import json

    import jsonschema

    from tests.engine.test_constrained import SCHEMA, forced, shaped

    def tasks() -> list[Any]:
        return [forced(temperature=0.0), shaped(temperature=0.0), make_task(prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0)]

    expected = [tokens_of(single_runner.generate(t, timeout=120)) for t in tasks()]
    batch = tasks()
    for task in batch:
        instance[0].submit(task)
    done = instance[0].collect([t.task_id for t in batch], 120)
    assert [tokens_of(done[t.task_id]) for t in batch] == expected
    (call,) = [c for chunk in done[batch[0].task_id] for c in chunk.tool_calls]
    jsonschema.validate(json.loads(call.arguments), SCHEMA)
    jsonschema.validate(json.loads("".join(c.text for c in done[batch[1].task_id])), SCHEMA)
