"""One whole node in this process: boot, election, auto-placement, serving, shutdown.

Real everything (zenoh, disk, runner subprocess, the HTTP API on a free port);
only the number of nodes is small.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest

from skulk.engine.models import DEFAULT_MODEL_ID, TINY_MODEL_ID
from skulk.runtime.config import load_config
from skulk.runtime.driver import NODE_RECORD_FILENAME
from skulk.runtime.eventlog import replay
from skulk.runtime.localcluster import http_json
from skulk.runtime.node import NodeRuntime
from tests.support.cluster import free_port_block


async def _until(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.cluster
def test_a_single_node_elects_itself_places_the_default_model_and_serves(
    models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api, zen = free_port_block(2, ["127.0.0.1"]), free_port_block(1, ["127.0.0.1"])
    home = tmp_path / "home"
    home.mkdir()
    # The node record cannot be written (a directory is in the way): the node
    # must say so once, loudly, and serve on.
    (home / NODE_RECORD_FILENAME).mkdir()
    cfg = load_config({
        "SKULK_HOME": str(home), "SKULK_MODELS_DIR": str(models_dir), "SKULK_API_HOST": "127.0.0.1",
        "SKULK_API_PORT": str(api), "SKULK_LISTEN": f"tcp/127.0.0.1:{zen}", "SKULK_MULTICAST": "0",
        "SKULK_EVENTLOG_MIN_FREE_BYTES": "0", "SKULK_TELEMETRY_INTERVAL_SECONDS": "1",
    })
    assert cfg.auto_place == DEFAULT_MODEL_ID
    runtime = NodeRuntime(cfg)
    base = f"http://127.0.0.1:{api}"

    async def main() -> None:
        task = asyncio.create_task(runtime.run())
        try:
            await _until(lambda: runtime.api_bridge is not None and runtime.api_bridge.is_master, 20, "mastership")
            node = runtime.api_bridge
            assert node is not None
            await _until(lambda: any(type(s).__name__ == "RunnerReady" for s in node.state.runners.values()),
                         90, "the auto-placed model's runner to be ready")
            (inst,) = node.state.instances.values()
            assert inst.shard_assignments.model_id == DEFAULT_MODEL_ID
            body = {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6}
            reply = await asyncio.to_thread(http_json, base + "/v1/chat/completions", method="POST", body=body,
                                            timeout_s=60)
            # Sampling (temperature 1) may end the answer early: either ending
            # is right, as long as the usage agrees with it.
            finish = reply["choices"][0]["finish_reason"]
            assert finish in ("length", "stop"), reply
            used = reply["usage"]["completion_tokens"]
            assert used == 6 if finish == "length" else 1 <= used <= 6, reply
            assert await asyncio.to_thread(http_json, base + "/node_id") == cfg.node_id
            metrics = node.metrics()
            assert metrics["skulk_eventlog_appended_total"] > 0 and metrics["skulk_eventlog_degraded"] == 0
            assert metrics["skulk_persist_failures_total"] >= 1
            assert metrics["skulk_master_session_started_unixtime"] > 0
        finally:
            runtime.request_stop()
            code = await asyncio.wait_for(task, 60)
        assert code == 0
        assert runtime.supervisor is not None and runtime.supervisor.runners == {}
        assert runtime.supervisor.escalations == {"sigterm": 0, "sigkill": 0}

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len([m for m in critical if "node record" in m]) == 1, critical
    # Shutting down is not a crash: no restart was scheduled for the stopped runner.
    assert not [r for r in caplog.records if "restarting in" in r.getMessage()]
    # The disk log replays to the state the node served.
    out = replay(home / "eventlog")
    assert out.session is not None and out.session.master == cfg.node_id
    assert DEFAULT_MODEL_ID in json.dumps([i.shard_assignments.model_id for i in out.state.instances.values()])


def test_local_model_directories_get_cards(models_dir: Path, tmp_path: Path) -> None:
    import shutil

    from skulk.runtime.node import load_node_cards

    local = tmp_path / "models"
    shutil.copytree(models_dir / TINY_MODEL_ID, local / "lab" / "my-model")
    cfg = load_config({"SKULK_HOME": str(tmp_path / "home"), "SKULK_MODELS_DIR": str(local)})
    cards = load_node_cards(cfg)
    assert "lab/my-model" in cards and TINY_MODEL_ID in cards
    assert cards["lab/my-model"].n_layers == cards[TINY_MODEL_ID].n_layers
    assert list(cards) == sorted(cards)
