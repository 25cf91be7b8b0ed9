"""A node on a nearly full disk starts, and keeps serving when its disk fills mid-run.

Issue 14, item 5: a data directory with less than ``SKULK_EVENTLOG_MIN_FREE_BYTES``
(2 GiB) free used to crash the node at start-up with ``AttributeError:
'NoneType' object has no attribute 'on_log_failure'`` (the event log reported
its failure from its constructor, before the driver existed). The node must
start in the documented degraded mode instead: one critical line naming the
figure it needs, and serving as usual. Real everything: a tmpfs, zenoh, the
runner subprocess and the HTTP API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from skulk.engine.models import TINY_MODEL_ID
from skulk.runtime.config import load_config
from skulk.runtime.localcluster import http_json
from skulk.runtime.node import NodeRuntime
from tests.support.cluster import free_port_block
from tests.support.tmpfs import fill_disk, small_tmpfs

pytestmark = pytest.mark.cluster


async def _until(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _config(home: Path, models_dir: Path, **extra: str):
    api, zen = free_port_block(2, ["127.0.0.1"]), free_port_block(1, ["127.0.0.1"])
    env = {
        "SKULK_HOME": str(home), "SKULK_MODELS_DIR": str(models_dir), "SKULK_API_HOST": "127.0.0.1",
        "SKULK_API_PORT": str(api), "SKULK_LISTEN": f"tcp/127.0.0.1:{zen}", "SKULK_MULTICAST": "0",
        "SKULK_TELEMETRY_INTERVAL_SECONDS": "1",
        # The disk is the subject, not the model: the generated tiny model starts in seconds, where the
        # real default would first be imported from its wheel (tens of seconds on 2 busy cores).
        "SKULK_AUTO_PLACE": TINY_MODEL_ID,
    }
    env.update(extra)
    return load_config(env)


async def _chat(base: str) -> dict:
    body = {"model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    return await asyncio.to_thread(http_json, base + "/v1/chat/completions", method="POST", body=body, timeout_s=60)


def _ready(runtime: NodeRuntime) -> bool:
    handle = runtime.api_bridge
    return handle is not None and any(type(s).__name__ == "RunnerReady" for s in handle.state.runners.values())


def _eventlog_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.CRITICAL and "event log" in r.getMessage()]


def test_a_node_whose_data_dir_has_under_2_gib_free_starts_degraded_and_serves(
    models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with small_tmpfs(tmp_path / "small", 64 << 20) as small:
        # The default threshold (2 GiB) on a 64 MiB disk: what a new user on a full laptop gets.
        cfg = _config(small / "home", models_dir)
        assert cfg.eventlog_min_free_bytes == 2 << 30
        runtime = NodeRuntime(cfg)
        base = f"http://127.0.0.1:{cfg.api_port}"

        async def main() -> None:
            task = asyncio.create_task(runtime.run())
            try:
                await _until(lambda: runtime.api_bridge is not None and runtime.api_bridge.is_master, 20, "mastership")
                await _until(lambda: _ready(runtime), 90, "the runner")
                reply = await _chat(base)
                assert reply["choices"][0]["finish_reason"] in ("length", "stop"), reply
                assert await asyncio.to_thread(http_json, base + "/node_id") == cfg.node_id
                assert runtime.api_bridge is not None
                metrics = runtime.api_bridge.metrics()
                assert metrics["skulk_eventlog_degraded"] == 1.0
                assert metrics["skulk_eventlog_appended_total"] == 0 and metrics["skulk_eventlog_dropped_total"] > 0
            finally:
                runtime.request_stop()
                code = await asyncio.wait_for(task, 60)
            assert code == 0

        with caplog.at_level(logging.INFO):
            asyncio.run(main())
    lines = _eventlog_lines(caplog)
    assert len(lines) == 1, lines
    # The one line names the figure it has and the figure it needs.
    assert "GiB free under" in lines[0] and "need 2.00 GiB" in lines[0], lines[0]
    assert not [r for r in caplog.records if r.exc_info], "no traceback at start-up"


def test_a_disk_that_fills_mid_run_degrades_the_log_once_and_the_node_serves_on(
    models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with small_tmpfs(tmp_path / "small", 16 << 20) as small:
        cfg = _config(small / "home", models_dir, SKULK_EVENTLOG_MIN_FREE_BYTES="0")
        runtime = NodeRuntime(cfg)
        base = f"http://127.0.0.1:{cfg.api_port}"

        async def main() -> None:
            task = asyncio.create_task(runtime.run())
            try:
                await _until(lambda: runtime.api_bridge is not None and runtime.api_bridge.is_master, 20, "mastership")
                await _until(lambda: _ready(runtime), 90, "the runner")
                assert runtime.api_bridge is not None
                await _chat(base)
                assert runtime.api_bridge.metrics()["skulk_eventlog_degraded"] == 0.0
                assert runtime.api_bridge.metrics()["skulk_eventlog_appended_total"] > 0
                # The disk fills up while the node runs.
                await asyncio.to_thread(fill_disk, small)
                # Every request indexes task events, so the log writes (and fails) again.
                for _ in range(40):
                    await _chat(base)
                    if runtime.api_bridge.metrics()["skulk_eventlog_degraded"] == 1.0:
                        break
                assert runtime.api_bridge.metrics()["skulk_eventlog_degraded"] == 1.0
                # Serving goes on, and the log does not complain again.
                for _ in range(3):
                    reply = await _chat(base)
                    assert reply["choices"][0]["finish_reason"] in ("length", "stop"), reply
                assert runtime.api_bridge.metrics()["skulk_eventlog_dropped_total"] > 0
            finally:
                runtime.request_stop()
                code = await asyncio.wait_for(task, 60)
            assert code == 0

        with caplog.at_level(logging.INFO):
            asyncio.run(main())
    lines = _eventlog_lines(caplog)
    assert len(lines) == 1, lines
    assert "No space left on device" in lines[0], lines[0]
