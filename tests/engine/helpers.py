"""Builders and checks shared by the engine tests (tasks, specs, ports, streams, models)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId, TaskId
from skulk.core.instances import PipelineShardMetadata, RunnerSpec, ShardMetadata, TensorShardMetadata
from skulk.core.tasks import GenerationParams, Task, TokenChunk
from skulk.engine.models import TINY_MODEL_ID, PRESETS

TINY = PRESETS[TINY_MODEL_ID]

_counter = iter(range(1_000_000))


def make_task(kind: str = "completion", task_id: str | None = None, **params: Any) -> Task:
    """A task with fresh ids; ``params`` are ``GenerationParams`` fields."""
    n = next(_counter)
    tid = task_id or f"task-{n}"
    return Task(
        task_id=TaskId(tid),
        command_id=CommandId(f"cmd-{tid}"),
        origin=NodeId("node-test"),
        instance_id=InstanceId("inst-test"),
        model_id=ModelId(TINY_MODEL_ID),
        kind=kind,  # type: ignore[arg-type]
        params=GenerationParams(**params),
    )


def make_spec(
    shard: ShardMetadata | None = None,
    *,
    hosts: tuple[str, ...] = (),
    context_ceiling: int = 2048,
    max_concurrent: int = 8,
    connect_deadline_s: float = 60.0,
    instance: str = "inst-test",
) -> RunnerSpec:
    shard = shard or pipeline_shard(0, 1, 0, TINY.num_hidden_layers)
    return RunnerSpec(
        instance_id=InstanceId(instance),
        runner_id=RunnerId(f"runner-{instance}-{shard.device_rank}"),
        node_id=NodeId(f"node-{shard.device_rank}"),
        model_id=ModelId(TINY_MODEL_ID),
        shard=shard,
        hosts=hosts,
        context_ceiling=context_ceiling,
        max_concurrent_requests=max_concurrent,
        group_connect_deadline_s=connect_deadline_s,
    )


def pipeline_shard(rank: int, world: int, start: int, end: int) -> PipelineShardMetadata:
    return PipelineShardMetadata(
        model_id=ModelId(TINY_MODEL_ID),
        device_rank=rank,
        world_size=world,
        start_layer=start,
        end_layer=end,
        n_layers=TINY.num_hidden_layers,
    )


def tensor_shard(rank: int, world: int) -> TensorShardMetadata:
    return TensorShardMetadata(
        model_id=ModelId(TINY_MODEL_ID), device_rank=rank, world_size=world, n_layers=TINY.num_hidden_layers
    )


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def session_models_root(factory: pytest.TempPathFactory) -> Path:
    """The session's root for generated models, one directory whoever asks.

    The engine tests and the tests of the tools that measure it (``tests/bench``)
    both need the generated models; generation is idempotent per root, so a
    shared root makes each model once per session (the speculation pair takes
    about 10 s).
    """
    root = factory.getbasetemp() / "generated-models"
    root.mkdir(exist_ok=True)
    return root


def tokens_of(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text_of(chunks: list[TokenChunk]) -> str:
    return "".join(c.text for c in chunks)


def check_stream(chunks: list[TokenChunk]) -> TokenChunk:
    """Assert the protocol's per-task invariants; returns the final chunk.

    Sequence numbers are dense from 0, exactly the last chunk is final, and a
    final chunk carries usage.
    """
    assert chunks, "no chunks"
    assert [c.seq for c in chunks] == list(range(len(chunks))), [c.seq for c in chunks]
    assert all(c.finish_reason is None for c in chunks[:-1])
    final = chunks[-1]
    assert final.finish_reason is not None
    assert final.usage is not None
    assert len({c.task_id for c in chunks}) == 1
    return final
