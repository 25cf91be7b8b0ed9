"""A runner's KV refusal reaches clients as 503 ``kv_budget_exhausted`` with ``Retry-After``.

The runner refuses in-band (an error chunk carrying ``retry_after_s``). Not
streamed, the API answers HTTP 503 with ``Retry-After``, which OpenAI's
clients retry by themselves (checked with the official client). Streamed,
the response started at once (status 200 and the command id, so a client can
cancel a queued request), so the refusal is the first event after the role
delta, as a context refusal is. Cached prompt tokens appear in
``usage.prompt_tokens_details.cached_tokens`` and the generation stats.
"""

from __future__ import annotations

import json
from typing import Any

import openai
from starlette.testclient import TestClient

from skulk.core.commands import SubmitTask
from skulk.core.tasks import ChunkError, GenerationStats, TokenChunk, Usage
from tests.api.conftest import ServedApp
from tests.api.node_double import ScriptedNode
from tests.api.sse_parse import parse_sse
from tests.api.test_streaming import MODEL, chat_body, final, tok

REFUSAL = ChunkError(
    message="kv_budget_exhausted: this request needs 5000 KV positions (prompt + max_tokens) beside 3 running request(s)",
    type="service_unavailable",
    code="kv_budget_exhausted",
    retry_after_s=7,
)


def refuse(cmd: SubmitTask) -> list[TokenChunk | float]:
    return [final(cmd, 0, "error", error=REFUSAL, usage=Usage(prompt_tokens=12, completion_tokens=0, total_tokens=12))]


def expect_503(r: Any) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "7"
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"error": {"message": REFUSAL.message, "type": "service_unavailable", "param": None, "code": "kv_budget_exhausted"}}


def test_a_kv_refusal_is_a_503_with_retry_after_or_the_first_stream_event(client: TestClient, node: ScriptedNode) -> None:
    node.script = refuse
    expect_503(client.post("/v1/chat/completions", json=chat_body()))
    expect_503(client.post("/v1/completions", json={"model": MODEL, "prompt": "Once"}))
    for path, body in (("/v1/chat/completions", chat_body(stream=True)), ("/v1/completions", {"model": MODEL, "prompt": "Once", "stream": True})):
        r = client.post(path, json=body)
        assert r.status_code == 200
        s = parse_sse(r.text)
        assert s.comments[0].startswith("command_id "), "the command id came first, before the refusal"
        assert s.errors == [{"message": REFUSAL.message, "type": "service_unavailable", "param": None, "code": "kv_budget_exhausted"}]
        assert s.events[-1] == "[DONE]"
    assert node.abandoned == [], "a refused request ended; nothing to abandon"
    metrics = client.get("/metrics").text
    assert 'skulk_api_requests_total{method="POST",route="/v1/chat/completions",status="503"} 1' in metrics
    assert "skulk_api_streams_active 0" in metrics


def test_the_openai_client_retries_after_the_503_by_itself(served: ServedApp) -> None:
    calls: list[str] = []
    short = ChunkError(message=REFUSAL.message, type=REFUSAL.type, code=REFUSAL.code, retry_after_s=1)

    def once_then_serve(cmd: SubmitTask) -> list[TokenChunk | float]:
        calls.append(cmd.command_id)
        if len(calls) == 1:
            return [final(cmd, 0, "error", error=short)]
        return [tok(cmd, 0, "Hi"), final(cmd, 1, usage=Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4))]

    served.node.script = once_then_serve
    oa = openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=1, timeout=10.0)
    reply = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hi" and len(calls) == 2
    # Without retries the client raises the 503 with the code.
    calls.clear()
    oa = openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0, timeout=10.0)
    try:
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    except openai.InternalServerError as err:
        assert err.status_code == 503 and err.code == "kv_budget_exhausted"
    else:
        raise AssertionError("a 503 raises")


def test_cached_prompt_tokens_are_reported_in_usage_and_stats(client: TestClient, node: ScriptedNode) -> None:
    stats = GenerationStats(prompt_tps=900.0, generation_tps=50.0, prompt_tokens=40, generation_tokens=1, cached_tokens=32)
    usage = Usage(prompt_tokens=40, completion_tokens=1, total_tokens=41)
    node.script = lambda cmd: [tok(cmd, 0, "Hi"), final(cmd, 1, usage=usage, stats=stats)]
    body = client.post("/v1/chat/completions", json=chat_body()).json()
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41, "prompt_tokens_details": {"cached_tokens": 32}}
    s = parse_sse(client.post("/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True})).text)
    (line,) = [c for c in s.comments if c.startswith("generation_stats ")]
    assert json.loads(line.split(" ", 1)[1])["cached_tokens"] == 32
    assert [c for c in s.chunks if c.get("usage")][-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}


def test_metrics_show_each_runners_kv_budget_and_prefix_cache(client: TestClient, node: ScriptedNode) -> None:
    kv = {"budgetPositions": 8447, "rowsPositions": 1510, "cachePositions": 900, "cacheEntries": 2, "bytesPerPosition": 3072,
          "prefixHits": 5, "prefixMisses": 2, "positionsReused": 4000, "refused": 1}  # fmt: skip
    node.runner_rows = [
        {"runnerId": "r0", "instanceId": "i1", "rank": 0, "kv": kv},
        {"runnerId": "r1", "instanceId": "i1", "rank": 1, "kv": None},  # a follower reports no ledger
    ]
    text = client.get("/metrics").text
    labels = '{instance="i1",rank="0",runner="r0"}'
    assert f"skulk_runner_kv_budget_positions{labels} 8447" in text
    assert f"skulk_runner_kv_budget_bytes{labels} {8447 * 3072}" in text
    assert f"skulk_runner_kv_cache_bytes{labels} {900 * 3072}" in text
    assert f"skulk_runner_kv_rows_positions{labels} 1510" in text
    assert f"skulk_runner_prefix_hits_total{labels} 5" in text and "# TYPE skulk_runner_prefix_hits_total counter" in text
    assert f"skulk_runner_prefix_tokens_reused_total{labels} 4000" in text
    assert f"skulk_runner_kv_refused_total{labels} 1" in text
    assert 'runner="r1"' not in text
