"""The runner process over its IPC pipes: lifecycle, serving, parent death, wedges.

Every test starts real ``python -m skulk.engine.runner`` subprocesses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from skulk.core.instances import (
    GROUP_CONNECT_TIMEOUT,
    RunnerFailed,
    RunnerIdle,
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerShutdown,
    RunnerShuttingDown,
    RunnerWarmingUp,
)
from skulk.engine.client import RunnerFailedError, RunnerProcess
from skulk.engine.protocol import EXIT_OK, EXIT_WEDGED, Heartbeat
from tests.engine.helpers import check_stream, make_spec, make_task, pipeline_shard, text_of, tokens_of

START_TIMEOUT_S = 120


@pytest.fixture
def runner(single_runner: RunnerProcess) -> RunnerProcess:
    return single_runner


def test_lifecycle_statuses_in_order(runner: RunnerProcess) -> None:
    kinds = [type(s) for s in runner.statuses]
    assert kinds[0] is RunnerIdle
    loading = [s for s in runner.statuses if isinstance(s, RunnerLoading)]
    assert loading[-1].layers_loaded == loading[-1].layers_total == 6
    order = [RunnerIdle, RunnerLoading, RunnerLoaded, RunnerWarmingUp, RunnerReady]
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions)
    ready = next(s for s in runner.statuses if isinstance(s, RunnerReady))
    assert ready.context_ceiling == 1024


def test_serves_tasks_and_reports_running_then_ready(runner: RunnerProcess, loaded: Any) -> None:
    before = len(runner.statuses)
    chunks = runner.generate(make_task(prompt="The quick brown fox", max_tokens=16, temperature=0.0), timeout=60)
    final = check_stream(chunks)
    assert final.finish_reason == "length" and final.usage.completion_tokens == 16
    assert text_of(chunks) == loaded.tokenizer.decode(tokens_of(chunks))
    # Status changes may trail the final chunk by a moment; a Ready left over
    # from an earlier test may also arrive late, so look for Running -> Ready.
    running = runner.wait_for_status(RunnerRunning, 10, since=before)
    assert running.active_tasks >= 1
    after_running = before + next(i for i, s in enumerate(runner.statuses[before:]) if s is running) + 1
    ready = runner.wait_for_status(RunnerReady, 10, since=after_running)
    assert ready.context_ceiling == 1024


def test_refusals_and_cancellations_over_ipc_leave_it_serving(runner: RunnerProcess) -> None:
    refused = runner.generate(make_task(prompt="The quick brown fox. " * 400, max_tokens=8), timeout=60)
    assert len(refused) == 1 and refused[0].finish_reason == "error"
    assert refused[0].error is not None and refused[0].error.code == "context_length_exceeded"
    long = make_task(prompt="Hello", max_tokens=200, temperature=0.0)
    runner.submit(long)
    while len(runner.chunks(long.task_id)) < 3:
        assert runner.recv(timeout=30) is not None
    runner.cancel(long.task_id)
    final = check_stream(runner.collect(long.task_id, 30)[long.task_id])
    assert final.finish_reason == "cancelled" and final.usage.completion_tokens < 200
    again = runner.generate(make_task(prompt="Hello", max_tokens=5, temperature=0.0), timeout=60)
    assert check_stream(again).finish_reason == "length"


def test_heartbeats_arrive(runner: RunnerProcess) -> None:
    deadline = time.monotonic() + 5
    seen = len(runner.heartbeats)
    while len(runner.heartbeats) < seen + 2 and time.monotonic() < deadline:
        runner.recv(timeout=1)
    beats = runner.heartbeats[seen:]
    assert len(beats) >= 2 and all(isinstance(b, Heartbeat) and b.rank == 0 for b in beats)
    assert beats[-1].uptime_s > beats[0].uptime_s and beats[-1].steps >= beats[0].steps


def test_shutdown_reports_and_exits_zero(tiny_path: Path, runner_env: dict[str, str]) -> None:
    proc = RunnerProcess.spawn(make_spec(), tiny_path, env=runner_env)
    proc.wait_for_status(RunnerReady, START_TIMEOUT_S)
    long = make_task(prompt="Hello", max_tokens=500, temperature=0.0)
    proc.submit(long)
    proc.recv(timeout=30)
    assert proc.shutdown(timeout=30) == EXIT_OK
    kinds = [type(s) for s in proc.statuses]
    assert kinds[-2:] == [RunnerShuttingDown, RunnerShutdown]
    assert check_stream(proc.chunks(long.task_id)).finish_reason == "cancelled"


def test_a_wedged_step_exits_86(tiny_path: Path, runner_env: dict[str, str]) -> None:
    env = dict(runner_env, SKULK_TEST_WEDGE_AT_STEP="3", SKULK_PIPELINE_EVAL_TIMEOUT_SECONDS="1")
    proc = RunnerProcess.spawn(make_spec(), tiny_path, env=env)
    try:
        proc.wait_for_status(RunnerReady, START_TIMEOUT_S)
        proc.submit(make_task(prompt="Hello", max_tokens=50))
        started = time.monotonic()
        assert proc.wait_exit(30) == EXIT_WEDGED
        assert time.monotonic() - started < 15
        failed = proc.statuses[-1]
        assert isinstance(failed, RunnerFailed) and failed.permanent and "wedged" in failed.error_message
        assert failed.code == "wedged"
    finally:
        proc.kill()


_PARENT = """
import sys, time
from pathlib import Path
from skulk.core.codec import decode_json
from skulk.core.instances import RunnerSpec, RunnerReady
from skulk.engine.client import RunnerProcess
proc = RunnerProcess.spawn(decode_json(RunnerSpec, sys.argv[1]), Path(sys.argv[2]))
proc.wait_for_status(RunnerReady, 120)
print(proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("pdeathsig", ["1", "0"], ids=["prctl", "pipe-eof"])
def test_runner_exits_when_its_parent_dies(tiny_path: Path, runner_env: dict[str, str], pdeathsig: str) -> None:
    from skulk.core.codec import encode_json

    env = dict(os.environ, **runner_env, SKULK_RUNNER_PDEATHSIG=pdeathsig)
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, encode_json(make_spec()).decode(), str(tiny_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.1)
        assert not _alive(child), f"runner {child} outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie waiting for init to reap it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_group_connect_deadline_names_the_unreachable_rank(tiny_path: Path, runner_env: dict[str, str]) -> None:
    from tests.engine.helpers import free_ports

    ports = free_ports(2)
    hosts = tuple(f"127.0.0.1:{p}" for p in ports)
    spec = make_spec(pipeline_shard(0, 2, 0, 3), hosts=hosts, connect_deadline_s=2.0)
    proc = RunnerProcess.spawn(spec, tiny_path, env=runner_env)
    try:
        with pytest.raises(RunnerFailedError) as failure:
            proc.wait_for_status(RunnerReady, 60)
        message = failure.value.status.error_message
        assert failure.value.status.code == GROUP_CONNECT_TIMEOUT  # the master re-places on fresh ports
        assert "deadline of 2s expired" in message
        assert f"rank 1 at {hosts[1]} is unreachable" in message
        assert failure.value.status.unreachable_rank == 1  # so re-placement avoids the hop into rank 1
        assert proc.wait_exit(20) != EXIT_OK
    finally:
        proc.kill()


def test_the_connect_guard_blames_a_rank_the_network_did_not_reach_before_one_that_refused() -> None:
    import socket

    from skulk.engine._connect_guard import Probe, first_unreachable, probe_peers
    from tests.engine.helpers import free_ports

    listening = socket.create_server(("127.0.0.1", 0))
    try:
        closed = free_ports(1)[0]
        hosts = [
            "127.0.0.1:1",  # rank 0: the reporter itself, never probed
            f"127.0.0.1:{closed}",  # rank 1: the host answers, nobody listens (perhaps killed by its own guard)
            f"127.0.0.1:{listening.getsockname()[1]}",  # rank 2: fine
        ]
        probes = probe_peers(hosts, 0, timeout_s=2.0)
    finally:
        listening.close()
    assert probes == [Probe(1, "connection refused (runner not listening)", refused=True), Probe(2, None)]
    assert first_unreachable(probes) == 1  # only a refusal: still the best guess
    assert first_unreachable(probes[1:]) is None
    # A timeout or a routing error is evidence against the link; a refusal proves the path works.
    assert first_unreachable([*probes, Probe(3, "no answer within 1.0s")]) == 3
    assert first_unreachable([Probe(2, "[Errno 113] No route to host"), Probe(3, "no answer within 1.0s")]) == 2
