"""Runner supervision with the real runner subprocess (issue 5, item 6).

The supervisor carries out the core's decisions and reports back; these tests
watch exactly what it feeds the core: statuses, chunks, and one exit per
runner, always after everything the runner wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId, TaskId
from skulk.core.inputs import RunnerExited, RunnerOutput, RunnerStatusObserved
from skulk.core.instances import PipelineShardMetadata, RunnerFailed, RunnerReady, RunnerSpec
from skulk.core.tasks import ChatMessage, GenerationParams, Task
from skulk.engine.models import TINY_MODEL_ID, PRESETS
from skulk.runtime.supervisor import Supervisor, find_local_models, write_hostfile



def _spec(runner: str, model: str = TINY_MODEL_ID) -> RunnerSpec:
    layers = PRESETS[TINY_MODEL_ID].num_hidden_layers
    return RunnerSpec(
        instance_id=InstanceId("inst-1"),
        runner_id=RunnerId(runner),
        node_id=NodeId("n1"),
        model_id=ModelId(model),
        shard=PipelineShardMetadata(model_id=ModelId(model), device_rank=0, world_size=1, start_layer=0,
                                    end_layer=layers, n_layers=layers),
        context_ceiling=2048,
    )


class Fed(list):
    def of(self, kind: type) -> list:
        return [x for x in self if isinstance(x, kind)]


async def _until(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _supervisor(fed: Fed, models_dir: Path, tmp_path: Path, grace: float = 5.0) -> Supervisor:
    return Supervisor(feed=fed.append, models_dir=models_dir, work_dir=tmp_path / "runners",
                      env={"SKULK_RUNNER_HEARTBEAT_SECONDS": "0.2"}, stop_grace_s=grace)


def test_a_runner_reports_ready_serves_a_task_and_stops_gracefully(models_dir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        fed = Fed()
        sup = _supervisor(fed, models_dir, tmp_path)
        sup.start(_spec("r1"))
        await _until(lambda: any(isinstance(s.status, RunnerReady) for s in fed.of(RunnerStatusObserved)), 90, "ready")
        statuses = [type(s.status).__name__ for s in fed.of(RunnerStatusObserved)]
        assert statuses[0] == "RunnerIdle" and statuses[-1] == "RunnerReady", statuses
        assert "RunnerLoading" in statuses
        await _until(lambda: sup.runners[RunnerId("r1")].heartbeat is not None, 10, "a heartbeat")
        row = sup.diagnostics()[0]
        assert row["runnerId"] == "r1" and row["pid"] == sup.pids()[RunnerId("r1")] and row["status"] == "RunnerReady"
        task = Task(task_id=TaskId("t1"), command_id=CommandId("c1"), origin=NodeId("n1"),
                    instance_id=InstanceId("inst-1"), model_id=ModelId(TINY_MODEL_ID), kind="chat",
                    params=GenerationParams(messages=(ChatMessage(role="user", content="hi"),), max_tokens=5))
        sup.dispatch(RunnerId("r1"), task)
        await _until(lambda: any(o.chunk.finish_reason for o in fed.of(RunnerOutput)), 60, "the last chunk")
        chunks = [o.chunk for o in fed.of(RunnerOutput)]
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 5
        pid = sup.pids()[RunnerId("r1")]
        sup.stop(RunnerId("r1"), "instance removed")
        await _until(lambda: fed.of(RunnerExited), 30, "the exit")
        assert fed.of(RunnerExited) == [RunnerExited(runner_id=RunnerId("r1"), exit_code=0)]
        after_exit = fed[fed.index(fed.of(RunnerExited)[0]) + 1 :]
        assert after_exit == [], "nothing about a runner is fed after its exit"
        assert type(fed.of(RunnerStatusObserved)[-1].status).__name__ == "RunnerShutdown"
        assert sup.escalations == {"sigterm": 0, "sigkill": 0}
        assert sup.runners == {}
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped: not even a zombie

    asyncio.run(main())


def test_a_runner_that_ignores_shutdown_is_terminated_then_killed_and_reaped(models_dir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        fed = Fed()
        sup = _supervisor(fed, models_dir, tmp_path, grace=0.5)
        sup.start(_spec("r2"))
        await _until(lambda: any(isinstance(s.status, RunnerReady) for s in fed.of(RunnerStatusObserved)), 90, "ready")
        pid = sup.pids()[RunnerId("r2")]
        os.kill(pid, signal.SIGSTOP)  # a wedged runner: reads nothing, reacts to nothing but SIGKILL
        started = time.monotonic()
        sup.stop(RunnerId("r2"), "test")
        await _until(lambda: fed.of(RunnerExited), 20, "the exit")
        assert fed.of(RunnerExited) == [RunnerExited(runner_id=RunnerId("r2"), exit_code=-signal.SIGKILL)]
        assert sup.escalations == {"sigterm": 1, "sigkill": 1}
        assert 0.9 <= time.monotonic() - started < 10
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    asyncio.run(main())


def test_a_runner_that_cannot_start_reports_a_failure_and_an_exit(models_dir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        fed = Fed()
        sup = _supervisor(fed, models_dir, tmp_path)
        sup.start(_spec("r3", model="nobody/missing-model"))
        await _until(lambda: fed.of(RunnerExited), 20, "the exit")
        (status,) = fed.of(RunnerStatusObserved)
        assert isinstance(status.status, RunnerFailed) and "missing-model" in status.status.error_message
        assert fed.of(RunnerExited) == [RunnerExited(runner_id=RunnerId("r3"), exit_code=1)]

    asyncio.run(main())


def test_a_runner_stopped_before_it_spawned_never_spawns_and_still_exits(models_dir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        fed = Fed()
        sup = _supervisor(fed, models_dir, tmp_path)
        sup.start(_spec("r4"))
        sup.stop(RunnerId("r4"), "instance removed")
        await _until(lambda: fed.of(RunnerExited), 20, "the exit")
        assert fed == [RunnerExited(runner_id=RunnerId("r4"), exit_code=0)]
        assert sup.exits == [(RunnerId("r4"), 0)]

    asyncio.run(main())


def test_hostfile_and_local_models(models_dir: Path, tmp_path: Path) -> None:
    path = write_hostfile(tmp_path / "h" / "hostfile.json", ("10.0.0.1:52500", "[fd00::2]:52500"))
    assert json.loads(path.read_text()) == [["10.0.0.1:52500"], ["[fd00::2]:52500"]]
    # The session's models directory also holds whatever other tests imported into it (a node's
    # auto-placed default model): compare with what was there before the junk.
    before = find_local_models(models_dir)
    assert TINY_MODEL_ID in before
    (models_dir / ".staging-x").mkdir(exist_ok=True)
    (models_dir / "org" / "incomplete").mkdir(parents=True, exist_ok=True)
    (models_dir / "org" / "incomplete" / "config.json").write_text("{}")
    assert find_local_models(models_dir) == before
