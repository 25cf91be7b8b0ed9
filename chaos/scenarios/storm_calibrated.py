"""storm_calibrated: the real event storm's twin (``loadtests.storm``), with this machine's measured latency.

Three nodes; the model is placed but stays loading for the whole storm (the
real run holds its runners with ``SKULK_TEST_LOAD_DELAY_SECONDS``); twenty
clients each send a streamed chat and walk away 0.5 s later, three hundred
requests in all, spread over the three nodes. The parity table compares the
task events indexed per abandoned request (created, then cancelled: 2) with
the real storm's, counted from the master's log the same way.

Metrics ``events_per_abandoned_max`` and ``events_per_abandoned_mean``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from skulk.core.commands import SubmitTask
from skulk.core.ids import CommandId, ModelId, TaskId, derive_id
from skulk.core.tasks import ChatMessage, GenerationParams

from chaos.scenarios import Stage, scenario
from chaos.scenarios._calibrated import MODEL, calibrated_cluster, load_profile, prompt_content
from chaos.scenarios._support import place_on
from sim.options import SimOptions

USERS = 20
REQUESTS = 300
ABANDON_AFTER_S = 0.5


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    return calibrated_cluster(
        opts,
        load_profile(),
        runner_load_gbps=0.005,  # 0.9 GB at 5 MB/s: loading for three minutes, past the storm
        client_count=0,
        fault_kinds=(),
    )


def _client(stage: Stage, k: int, budget: list[int]) -> Generator[Any, Any, None]:
    world = stage.world
    content = prompt_content(load_profile())
    n = 0
    while budget[0] > 0:
        budget[0] -= 1
        host = world.hosts[world.host_ids[(k + n) % len(world.host_ids)]]
        n += 1
        params = GenerationParams(messages=(ChatMessage(role="user", content=content),), max_tokens=16, seed=0)
        req = world.clients.submit(host, SubmitTask(command_id=CommandId(f"storm-{k}-{n}"), model_id=ModelId(MODEL),
                                                    params=params), client=k)
        yield req.done | world.env.timeout(ABANDON_AFTER_S)
        if not req.ended:
            world.clients.abandon(req)


@scenario(
    "storm_calibrated",
    "the real event storm's twin: 300 streams abandoned after 0.5 s against a loading model; events per request",
    adjust=_adjust,
)
def storm_calibrated(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    yield from place_on(stage, MODEL)
    yield stage.sleep(2.0)
    budget = [REQUESTS]
    procs = [world.process(_client(stage, k, budget)) for k in range(USERS)]
    for proc in procs:
        yield proc
    yield stage.sleep(6.0)
    checker = stage.checker
    counts = []
    for req in world.clients.requests.values():
        if req.cid.startswith("storm-") and req.abandoned:
            task = TaskId(derive_id("task", req.cid))
            counts.append(sum(checker.task_events.get((s, task), 0) for s in checker.task_sessions.get(task, ())))
    stage.metrics["abandoned"] = len(counts)
    stage.metrics["events_per_abandoned_max"] = max(counts, default=0)
    stage.metrics["events_per_abandoned_mean"] = round(sum(counts) / len(counts), 3) if counts else 0.0
