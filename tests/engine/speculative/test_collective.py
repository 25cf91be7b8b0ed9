"""Speculation across two real runner processes (pipeline and tensor ranks) on loopback, in lockstep.

Rank 0 decides every draft and accept decision and broadcasts it; greedy
tokens must equal plain single-process decoding of the same model, and the
final stats must show that speculation really ran. Two more instances check
the all-or-nothing rule (one rank cannot load its drafter) and the card's
``speculative_multi_node = false`` opt-out: they serve plainly, with the same
tokens.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from skulk.core.instances import RunnerReady, ShardMetadata, SpeculationConfig
from skulk.engine.client import RunnerProcess
from skulk.engine.protocol import EXIT_OK
from skulk.engine.speculative.models import update_card_runtime
from skulk.engine.speculative.mtp import MTP_SIDECAR
from tests.engine.helpers import check_stream, free_ports, make_spec, make_task, pipeline_shard, tensor_shard, tokens_of
from tests.engine.speculative.helpers import PROMPTS, Run, greedy

START_TIMEOUT_S = 180
MAX_TOKENS = 24

LAYOUTS = {
    "pipeline": [pipeline_shard(0, 2, 0, 3), pipeline_shard(1, 2, 3, 6)],
    "tensor": [tensor_shard(0, 2), tensor_shard(1, 2)],
}


def start(
    name: str,
    layout: str,
    config: SpeculationConfig,
    model_dirs: list[Path],
    env: dict[str, str],
    log_dir: Path,
) -> list[RunnerProcess]:
    shards: list[ShardMetadata] = LAYOUTS[layout]
    hosts = tuple(f"127.0.0.1:{p}" for p in free_ports(len(shards)))
    procs = []
    try:
        for shard, model in zip(shards, model_dirs):
            spec = msgspec.structs.replace(
                make_spec(shard, hosts=hosts, instance=name, connect_deadline_s=90), speculation=config
            )
            log = open(log_dir / f"{name}-rank{shard.device_rank}.log", "w")  # noqa: SIM115 (closed by the child's exit)
            procs.append(RunnerProcess.spawn(spec, model, env=env, stderr=log))
        for proc in procs:
            proc.wait_for_status(RunnerReady, START_TIMEOUT_S)
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    return procs


def stop(procs: list[RunnerProcess]) -> None:
    try:
        assert procs[0].shutdown(timeout=30) == EXIT_OK
        assert all(proc.wait_exit(30) == EXIT_OK for proc in procs[1:])
    finally:
        for proc in procs:
            proc.kill()


@pytest.fixture(scope="module")
def plain_tokens(spec_loaded: Any) -> list[list[int]]:  # noqa: F811
    run = Run(spec_loaded)
    return [tokens_of(run.run(greedy(p, MAX_TOKENS))[0]) for p in PROMPTS]


CASES = [("pipeline", "draft_model"), ("pipeline", "mtp"), ("tensor", "draft_model"), ("tensor", "mtp")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{b}" for a, b in CASES])
def instance(
    request: pytest.FixtureRequest,
    spec_dirs: tuple[Path, Path],  # noqa: F811
    runner_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[RunnerProcess]]:
    layout, drafter = request.param
    config = SpeculationConfig(drafter=drafter, depth=3, draft_model_id=str(spec_dirs[1]))  # type: ignore[arg-type]
    procs = start(f"spec-{layout}-{drafter}", layout, config, [spec_dirs[0]] * 2, runner_env, tmp_path_factory.mktemp("logs"))
    try:
        yield procs
    finally:
        stop(procs)


def test_greedy_speculation_across_ranks_equals_plain(instance: list[RunnerProcess], plain_tokens: list[list[int]]) -> None:
    rank0 = instance[0]
    for prompt, expected in zip(PROMPTS, plain_tokens):
        chunks = rank0.generate(greedy(prompt, MAX_TOKENS), timeout=120)
        final = check_stream(chunks)
        assert tokens_of(chunks) == expected, prompt
        assert final.stats is not None and final.stats.draft_depth == 3
        assert final.stats.acceptance_rate is not None
    # Concurrent streams: plain batched steps, then rounds for the last one, in lockstep.
    tasks = [greedy(p, n) for p, n in zip(PROMPTS, (8, 16, MAX_TOKENS))]
    for task in tasks:
        rank0.submit(task)
    done = rank0.collect([t.task_id for t in tasks], 120)
    assert [tokens_of(done[t.task_id]) for t in tasks] == [e[: len(tokens_of(done[t.task_id]))] for t, e in zip(tasks, plain_tokens)]
    assert [len(tokens_of(done[t.task_id])) for t in tasks] == [min(n, len(e)) for n, e in zip((8, 16, MAX_TOKENS), plain_tokens)]
    # Sampled speculation across ranks: seeded, so reproducible.
    sampled = [tokens_of(rank0.generate(make_task(prompt=PROMPTS[1], max_tokens=16, temperature=0.9, seed=31), timeout=120)) for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0]) > 0


def test_one_rank_unable_means_nobody_speculates(
    spec_dirs: tuple[Path, Path],  # noqa: F811
    runner_env: dict[str, str],
    plain_tokens: list[list[int]],
    tmp_path: Path,
) -> None:
    # Rank 1's copy of the checkpoint has no MTP heads: it cannot draft.
    bare = tmp_path / "no-mtp"
    shutil.copytree(spec_dirs[0], bare)
    (bare / MTP_SIDECAR).unlink()
    config = SpeculationConfig(drafter="mtp", depth=3)
    procs = start("spec-unable", "tensor", config, [spec_dirs[0], bare], runner_env, tmp_path)
    try:
        chunks = procs[0].generate(greedy(PROMPTS[0], MAX_TOKENS), timeout=120)
        assert tokens_of(chunks) == plain_tokens[0]
        assert check_stream(chunks).stats.acceptance_rate is None
    finally:
        stop(procs)
    log0 = (tmp_path / "spec-unable-rank0.log").read_text()
    log1 = (tmp_path / "spec-unable-rank1.log").read_text()
    assert "1 of 2 ranks can speculate; speculation is off for all" in log0
    assert "rank 1 cannot speculate" in log1 and "MTP" in log1


def test_card_can_opt_out_of_multi_node_speculation(
    spec_dirs: tuple[Path, Path],  # noqa: F811
    runner_env: dict[str, str],
    plain_tokens: list[list[int]],
    tmp_path: Path,
) -> None:
    opted_out = tmp_path / "opted-out"
    shutil.copytree(spec_dirs[0], opted_out)
    update_card_runtime(opted_out, speculative_multi_node=False)
    config = SpeculationConfig(drafter="draft_model", depth=3, draft_model_id=str(spec_dirs[1]))
    procs = start("spec-optout", "pipeline", config, [opted_out, opted_out], runner_env, tmp_path)
    try:
        chunks = procs[0].generate(greedy(PROMPTS[1], MAX_TOKENS), timeout=120)
        assert tokens_of(chunks) == plain_tokens[1]
        assert check_stream(chunks).stats.acceptance_rate is None
    finally:
        stop(procs)
    assert "speculative_multi_node = false" in (tmp_path / "spec-optout-rank0.log").read_text()
