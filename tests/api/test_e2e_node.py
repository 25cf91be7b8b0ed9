"""The API against a REAL node: a node process (zenoh, the core, a runner subprocess running the
embedded default model with MLX), started by tests/support, with the model placed through
``POST /place_instance``.

Shows: the official ``openai`` client streams and non-streams a chat and ``/v1/models`` lists the
model; every documented bad input gets its status and the node keeps serving; a runner's context
refusal is the first SSE event; cancel and client disconnects end requests; the dashboard, in
Debian's Chromium, shows the node and the instance and streams a chat.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from skulk.engine.models import DEFAULT_MODEL_ID
from tests.api.browser import chromium_page, screenshot
from tests.api.sse_parse import parse_sse
from tests.api.test_validation import CHAT_CASES, RAW_CASES
from tests.support.cluster import shared_models_dir, start_cluster, wait_for

pytestmark = pytest.mark.cluster

MODEL = DEFAULT_MODEL_ID


@dataclass
class RealNode:
    url: str
    node_id: str
    instance_id: str
    log: Path

    def http(self, timeout_s: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout_s)


def _runner_ready(url: str, instance_id: str) -> bool:
    state = httpx.get(url + "/state", timeout=5).json()
    inst = state["instances"].get(instance_id)
    if inst is None:
        return False
    (body,) = inst.values()
    runners = body["shardAssignments"]["nodeToRunner"].values()
    return all("RunnerReady" in state["runners"].get(r, {}) for r in runners)


@pytest.fixture(scope="module")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    base = tmp_path_factory.mktemp("api-e2e")
    models = shared_models_dir(tmp_path_factory.mktemp("api-e2e-models"))
    with start_cluster(base, 1, models_dir=models) as cluster:
        (plan,) = cluster.plans
        # The node has elected itself once it reports a session and its own memory.
        wait_for("the node to elect itself and report memory", lambda: (
            (s := httpx.get(plan.url + "/state", timeout=5).json())["session"] and plan.node_id in s["nodeMemory"]), 60)
        r = httpx.post(plan.url + "/place_instance", json={"model_id": MODEL}, timeout=60)
        assert r.status_code == 200, r.text
        iid = r.json()["instance_id"]
        wait_for("the runner to be ready", lambda: _runner_ready(plan.url, iid), 120, interval_s=0.25)
        yield RealNode(url=plan.url, node_id=plan.node_id, instance_id=iid, log=base / "logs" / f"{plan.node_id}.log")


def client(node: RealNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=60.0)


def chat(node: RealNode, **kw: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the fox."}], "max_tokens": 8, **kw}
    with node.http() as h:
        return h.post("/v1/chat/completions", json=body)


def test_openai_client_streams_and_lists_models(real_node: RealNode) -> None:
    oa = client(real_node)
    models = oa.models.list()
    assert models.data[0].id == MODEL, [m.id for m in models.data]
    reply = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello fox"}], max_tokens=12, seed=7)
    choice = reply.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    assert reply.id.startswith("chatcmpl-") and reply.model == MODEL
    stream = oa.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello fox"}], max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert finish in ("length", "stop") and usage is not None and usage.completion_tokens > 0
    assert "".join(text), "some text was streamed"
    # Raw SSE: the command id first, generation stats at the end, [DONE] last.
    s = parse_sse(chat(real_node, stream=True).text)
    assert s.comments[0].startswith("command_id ") and s.events[-1] == "[DONE]"
    stats = json.loads(s.comment("generation_stats"))
    assert stats["generation_tokens"] > 0 and stats["prompt_tokens"] > 0 and stats["generation_tps"] > 0
    # Greedy decoding is deterministic on the same node.
    a = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a fox"}], max_tokens=6, temperature=0)
    b = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a fox"}], max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_every_bad_input_gets_its_status_and_the_node_keeps_serving(real_node: RealNode) -> None:
    with real_node.http() as h:
        for name, body, status, code, param in CHAT_CASES:
            r = h.post("/v1/chat/completions", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
            assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (status, code, param), (name, r.text)
        for name, raw, status, code, param in RAW_CASES:
            if name == "too-large":
                raw = b'{"model": "' + b"x" * (8 * 1024 * 1024 + 1) + b'"}'  # over the default 8 MiB
            r = h.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (name, r.text)
        r = h.post("/v1/chat/completions", json={"model": "nobody/none", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        # The instance's real ceiling is what admission uses.
        state = h.get("/state").json()
        ceiling = state["instances"][real_node.instance_id]["MlxRingInstance"]["contextCeiling"]
        r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": ceiling + 1})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("context_length_exceeded:")
        assert f"{ceiling}" in r.json()["error"]["message"]
        # The node still serves, and no bad request left a task behind.
        good = chat(real_node)
        assert good.status_code == 200, good.text
        assert good.json()["usage"]["completion_tokens"] > 0
        assert h.get("/state").json()["tasks"] == {}


def test_a_prompt_over_the_ceiling_is_refused_by_the_runner_as_the_first_event(real_node: RealNode) -> None:
    with real_node.http() as h:
        state = h.get("/state").json()
        ceiling = state["instances"][real_node.instance_id]["MlxRingInstance"]["contextCeiling"]
        long_prompt = "fox " * (ceiling + 500)
        r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": long_prompt}], "stream": True})
        assert r.status_code == 200
        s = parse_sse(r.text)
        content = [e for e in s.events if e != "[DONE]" and not (isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("role"))]
        assert "error" in content[0], s.events[:3]
        assert content[0]["error"]["code"] == "context_length_exceeded"
        assert content[0]["error"]["message"].startswith("context_length_exceeded:")
        assert s.events[-1] == "[DONE]"
        r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert chat(real_node).status_code == 200


def test_cancel_and_disconnect_end_requests_on_a_real_node(real_node: RealNode) -> None:
    # Greedy: with sampling the random test model sometimes ends the reply (EOS) before the cancel lands.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on and on."}], "max_tokens": 4000, "stream": True,
            "temperature": 0}
    # Cancel through the API from a second connection.
    with real_node.http() as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        cid, lines, cancelled_at = None, [], None
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith(": command_id "):
                cid = line.split()[-1]
            if cid and cancelled_at is None and line.startswith("data: ") and '"content":"' in line and '"role"' not in line:
                resp = httpx.post(f"{real_node.url}/v1/cancel/{cid}", timeout=30)
                assert resp.status_code == 200, resp.text
                cancelled_at = time.monotonic()
    assert cancelled_at is not None and time.monotonic() - cancelled_at < 10
    data = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert lines[-1] in ("", "data: [DONE]") and "data: [DONE]" in lines
    finishes = [c["choices"][0]["finish_reason"] for c in data if c.get("choices")]
    assert finishes[-1] == "cancelled", finishes[-3:]
    # Walk away mid-stream: the node abandons the request and keeps serving.
    with real_node.http() as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"role"' not in line:
                break
    wait_for("the abandoned task to be deleted", lambda: httpx.get(real_node.url + "/state", timeout=5).json()["tasks"] == {}, 20)
    metrics = httpx.get(real_node.url + "/metrics", timeout=5).text
    assert "skulk_api_streams_active 0" in metrics
    assert chat(real_node).status_code == 200


@pytest.mark.browser
def test_dashboard_on_a_real_node(real_node: RealNode) -> None:
    with chromium_page(real_node.url) as page:
        page.goto("/")
        page.wait_for_selector("[data-testid=node-card]")
        assert page.locator("[data-testid=node-card]").get_attribute("data-node") == real_node.node_id
        assert page.locator("[data-testid=master-badge]").count() == 1
        page.wait_for_selector(f"[data-testid=instance-card][data-instance='{real_node.instance_id}']")
        assert page.locator("[data-testid=runner-status]").all_inner_texts() == ["Ready"]
        screenshot(page, "real-node-overview")
        page.goto("/place")
        page.wait_for_selector("[data-testid=preview-row]")
        page.goto("/chat")
        page.wait_for_selector(f"[data-testid=chat-model] option[value='{MODEL}']", state="attached")
        page.fill("[data-testid=chat-max-tokens]", "24")
        page.fill("[data-testid=chat-input]", "Tell me about the skulk of foxes")
        page.click("[data-testid=chat-send]")
        page.wait_for_selector("[data-testid=msg-assistant] .text[data-done='1']", timeout=60_000)
        reply = page.locator("[data-testid=msg-assistant] .text").last
        assert reply.get_attribute("data-finish") in ("length", "stop"), page.inner_text("main")
        assert page.locator("[data-testid=chat-error]").count() == 0
        assert "tok/s" in page.locator("[data-testid=chat-stats]").inner_text()
        screenshot(page, "real-node-chat")
