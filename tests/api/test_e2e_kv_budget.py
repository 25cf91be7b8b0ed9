"""The prefix cache and the KV budget through a REAL node (zenoh, the core, a runner subprocess with MLX).

Shows, over HTTP: a chat's second turn reuses the first turn's KV
(``usage.prompt_tokens_details.cached_tokens``); a request that does not fit
beside a long-running one waits, then gets a 503 ``kv_budget_exhausted`` with
``Retry-After`` (streamed: the same error as its first event), and runs once
there is room; the runner
never crashes; ``/metrics`` and ``/state`` (``nodeKv``, from the node's
telemetry) show the ledger.

The runner's KV budget here: the default model's context ceiling (8,192) plus
allocation slack, since its float32 caches cost more than the card's fp16
reservation covers. Two requests asking for 4,000 tokens each cannot run
together (2 x (4,000 + prompt + 255) positions > 8,447).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.test_e2e_node import MODEL, RealNode, _runner_ready
from tests.support.cluster import shared_models_dir, start_cluster, wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def kv_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    base = tmp_path_factory.mktemp("kv-e2e")
    models = shared_models_dir(tmp_path_factory.mktemp("kv-e2e-models"))
    env = {"SKULK_KV_QUEUE_WAIT_SECONDS": "1", "SKULK_TELEMETRY_INTERVAL_SECONDS": "1"}
    with start_cluster(base, 1, models_dir=models, extra_env=env) as cluster:
        (plan,) = cluster.plans
        wait_for("the node to elect itself and report memory", lambda: (
            (s := httpx.get(plan.url + "/state", timeout=5).json())["session"] and plan.node_id in s["nodeMemory"]), 60)
        r = httpx.post(plan.url + "/place_instance", json={"model_id": MODEL}, timeout=60)
        assert r.status_code == 200, r.text
        iid = r.json()["instance_id"]
        wait_for("the runner to be ready", lambda: _runner_ready(plan.url, iid), 120, interval_s=0.25)
        yield RealNode(url=plan.url, node_id=plan.node_id, instance_id=iid, log=base / "logs" / f"{plan.node_id}.log")


def _chat(node: RealNode, messages: list[dict[str, str]], **kw: Any) -> httpx.Response:
    with node.http() as h:
        return h.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0, **kw})


def test_a_second_chat_turn_reuses_the_first_turns_kv(kv_node: RealNode) -> None:
    history = [{"role": "system", "content": "You answer in one line."}, {"role": "user", "content": "Name a fox."}]
    first = _chat(kv_node, history, max_tokens=8)
    assert first.status_code == 200, first.text
    reply = first.json()
    assert "prompt_tokens_details" not in reply["usage"]
    history += [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]}, {"role": "user", "content": "Another one?"}]
    second = _chat(kv_node, history, max_tokens=8)
    assert second.status_code == 200, second.text
    usage = second.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= reply["usage"]["prompt_tokens"], usage


def test_no_room_in_the_kv_budget_is_a_clean_503_and_the_runner_keeps_serving(kv_node: RealNode) -> None:
    # The long request must still be running when the others arrive, whatever the model's weights: a schema
    # whose one string must be far longer than max_tokens allows keeps the end token masked out (the grammar,
    # not the model, decides), so it can only end by length or by the cancel below.
    endless = {"type": "json_schema", "json_schema": {"name": "essay", "strict": True, "schema": {
        "type": "object", "properties": {"text": {"type": "string", "minLength": 100000}},
        "required": ["text"], "additionalProperties": False}}}
    long = {"model": MODEL, "messages": [{"role": "user", "content": "Go on and on."}], "max_tokens": 4000,
            "temperature": 0, "stream": True, "response_format": endless}
    streamed: list[str] = []
    started = threading.Event()
    finish: list[str] = []

    def run_long() -> None:
        with kv_node.http(timeout_s=300) as h, h.stream("POST", "/v1/chat/completions", json=long) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                streamed.append(line)
                if '"content":"' in line and '"role"' not in line:
                    started.set()
                if '"finish_reason":"' in line:
                    finish.append(line)

    worker = threading.Thread(target=run_long, daemon=True)
    worker.start()
    assert started.wait(120), "the long request never streamed"
    cid = next(line.split()[-1] for line in streamed if line.startswith(": command_id "))

    other = {"model": MODEL, "messages": [{"role": "user", "content": "And you?"}], "max_tokens": 4000, "temperature": 0}
    t0 = time.monotonic()
    with kv_node.http() as h:
        refused = h.post("/v1/chat/completions", json=other)
        refused_stream = h.post("/v1/chat/completions", json={**other, "stream": True})
    assert not finish, "the long request must still be running for this test to mean anything"
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    err = refused.json()["error"]
    assert err["code"] == "kv_budget_exhausted" and err["type"] == "service_unavailable"
    assert err["message"].startswith("kv_budget_exhausted:")
    assert refused_stream.status_code == 200
    (in_band,) = [e for e in refused_stream.text.split("\n\n") if e.startswith('data: {"error"')]
    assert '"code":"kv_budget_exhausted"' in in_band
    assert time.monotonic() - t0 >= 1.0, "refused only after the queue wait"
    # Something small fits beside the long one and runs.
    small = _chat(kv_node, [{"role": "user", "content": "Hi"}], max_tokens=8)
    assert small.status_code == 200, small.text
    # Once the long request is gone, the refused one runs.
    assert httpx.post(f"{kv_node.url}/v1/cancel/{cid}", timeout=30).status_code == 200
    worker.join(60)
    again = _chat(kv_node, other["messages"], max_tokens=4000)
    assert again.status_code == 200, again.text

    metrics = httpx.get(kv_node.url + "/metrics", timeout=10).text
    refusals = [line for line in metrics.splitlines() if line.startswith("skulk_runner_kv_refused_total{")]
    assert refusals and float(refusals[0].rsplit(" ", 1)[1]) >= 2
    assert any(line.startswith("skulk_runner_kv_budget_positions{") for line in metrics.splitlines())

    def ledger() -> dict[str, Any] | None:
        kv = httpx.get(kv_node.url + "/state", timeout=5).json().get("nodeKv", {}).get(kv_node.node_id, {})
        return next(iter(kv.values()), None)

    wait_for("the node's telemetry to carry the runner's KV ledger", lambda: (k := ledger()) is not None and k["refused"] >= 2, 30)
    state = httpx.get(kv_node.url + "/state", timeout=5).json()
    assert all("RunnerFailed" not in s for s in state["runners"].values()), state["runners"]
