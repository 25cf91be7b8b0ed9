"""What a client sees of a generation: SSE framing, in-band errors, abandonment and cancellation.

The node double plays what a runner said (``ScriptedNode.script``); these
tests check the API's rendering and its duty to abandon a request whose client
has gone (DESIGN.md invariant 6) and to end every stream, never hang
(invariant 8).
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from skulk.core.commands import CancelTask, SubmitTask
from skulk.core.ids import TaskId, derive_id
from skulk.core.tasks import ChunkError, GenerationStats, TokenChunk, TokenLogprob, TopLogprob, Usage
from tests.api.conftest import ServedApp
from tests.api.node_double import ScriptedNode
from tests.api.sse_parse import parse_sse

MODEL = "skulk/tiny-qwen2"


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], **extra}


def final(cmd: SubmitTask, seq: int, reason: str = "stop", **kw: Any) -> TokenChunk:
    return TokenChunk(command_id=cmd.command_id, task_id=TaskId(derive_id("task", cmd.command_id)), seq=seq, finish_reason=reason, **kw)  # type: ignore[arg-type]


def tok(cmd: SubmitTask, seq: int, text: str, **kw: Any) -> TokenChunk:
    return TokenChunk(command_id=cmd.command_id, task_id=TaskId(derive_id("task", cmd.command_id)), seq=seq, text=text, token_ids=(seq,), **kw)


def wait_for(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_stream_framing_usage_and_stats(client: TestClient, node: ScriptedNode) -> None:
    r = client.post("/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    s = parse_sse(r.text)
    cid = node.tasks_submitted()[0].command_id
    assert s.order[0] == "comment" and s.comments[0] == f"command_id {cid}", "the command id comes first"
    assert s.events[-1] == "[DONE]", "[DONE] is the last event"
    chunks = s.chunks
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == f"chatcmpl-{cid}" and c["model"] == MODEL for c in chunks)
    assert s.text() == "Hello, world!"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    stats = json.loads(s.comment("generation_stats"))
    assert stats == {"prompt_tps": 700.0, "generation_tps": 50.0, "prompt_tokens": 7, "generation_tokens": 4}
    # The stats comment follows the final chunk and precedes [DONE].
    assert s.order[-2:] == ["comment", "data"]


def test_stream_without_include_usage_has_no_usage_chunk(client: TestClient) -> None:
    s = parse_sse(client.post("/v1/chat/completions", json=chat_body(stream=True)).text)
    assert all(c["choices"] for c in s.chunks), "no usage-only chunk unless asked"
    assert all(c["usage"] is None for c in s.chunks)


def test_generation_params_carry_every_knob(client: TestClient, node: ScriptedNode) -> None:
    body = chat_body(
        max_completion_tokens=32, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=1234,
        stop="\n\n", logprobs=True, top_logprobs=2, repetition_penalty=1.1,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    )
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    (task,) = node.tasks_submitted()
    p = task.params
    assert task.model_id == MODEL and task.kind == "chat" and task.instance_id is None
    assert [(m.role, m.content) for m in p.messages or ()] == [("system", "Be brief."), ("user", "a\nb")]
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (32, 0.7, 0.9, 40, 0.05, 1234)
    assert (p.stop, p.logprobs, p.top_logprobs, p.repetition_penalty) == (("\n\n",), True, 2, 1.1)
    # Omitted knobs stay "unset" so the runner applies its defaults and clamps max_tokens.
    client.post("/v1/chat/completions", json=chat_body(stop=["a", "b"]))
    q = node.tasks_submitted()[1].params
    assert (q.max_tokens, q.temperature, q.top_p, q.top_k, q.min_p, q.stop) == (None, None, 1.0, 0, 0.0, ("a", "b"))


def test_runner_context_refusal_is_the_first_event(client: TestClient, node: ScriptedNode) -> None:
    message = "context_length_exceeded: the prompt has 9000 tokens, which fills this instance's context window of 8192 tokens"

    def refuse(cmd: SubmitTask) -> list[TokenChunk | float]:
        return [final(cmd, 0, "error", error=ChunkError(message=message, type="invalid_request_error", code="context_length_exceeded"))]

    node.script = refuse
    s = parse_sse(client.post("/v1/chat/completions", json=chat_body(stream=True)).text)
    data = [e for e in s.events if e != "[DONE]"]
    # The role delta precedes it (it carries no text); the first event with content is the error.
    assert [("error" in e) for e in data] == [False, True]
    assert s.errors == [{"message": message, "type": "invalid_request_error", "param": None, "code": "context_length_exceeded"}]
    assert s.events[-1] == "[DONE]"
    # Not streamed: the same refusal is an HTTP 400 envelope.
    r = client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("context_length_exceeded:")
    assert node.abandoned == [], "a finished request is not abandoned"


def test_master_change_mid_stream_ends_with_an_error_event(client: TestClient, node: ScriptedNode) -> None:
    changed = "the cluster's master changed (session a@1 -> b@2) while this request was in flight; retry the request"

    def failover(cmd: SubmitTask) -> list[TokenChunk | float]:
        return [tok(cmd, 0, "Hel"), tok(cmd, 1, "lo"), final(cmd, 2, "error", error=ChunkError(message=changed, code="session_changed"))]

    node.script = failover
    s = parse_sse(client.post("/v1/chat/completions", json=chat_body(stream=True)).text)
    assert s.text() == "Hello"
    assert s.errors[0]["code"] == "session_changed" and "retry" in s.errors[0]["message"]
    assert s.events[-1] == "[DONE]"
    r = client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 503, r.text
    assert r.json()["error"] == {"message": changed, "type": "server_error", "param": None, "code": "session_changed"}


def test_logprobs_are_rendered_in_openai_shape(client: TestClient, node: ScriptedNode) -> None:
    def with_logprobs(cmd: SubmitTask) -> list[TokenChunk | float]:
        lp = (TokenLogprob(token="Hi", logprob=-0.25, top_logprobs=(TopLogprob(token="Hi", logprob=-0.25), TopLogprob(token="Yo", logprob=-1.5))),)
        return [tok(cmd, 0, "Hi", logprobs=lp), final(cmd, 1, usage=Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4))]

    node.script = with_logprobs
    s = parse_sse(client.post("/v1/chat/completions", json=chat_body(stream=True, logprobs=True, top_logprobs=2)).text)
    content = [c for c in s.chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert len(content) == 1
    (entry,) = content[0]["choices"][0]["logprobs"]["content"]
    assert entry["token"] == "Hi" and entry["logprob"] == -0.25 and entry["bytes"] == [72, 105]
    assert [t["token"] for t in entry["top_logprobs"]] == ["Hi", "Yo"]
    body = client.post("/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=2)).json()
    assert body["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1] == {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    # Without logprobs requested, none are shown even if the runner sent some.
    plain = client.post("/v1/chat/completions", json=chat_body()).json()
    assert plain["choices"][0]["logprobs"] is None


def test_text_completion_streamed_and_not(client: TestClient, node: ScriptedNode) -> None:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "Hello, world!"
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["total_tokens"] == 11
    assert node.tasks_submitted()[0].kind == "completion" and node.tasks_submitted()[0].params.prompt == "Once"
    s = parse_sse(client.post("/v1/completions", json={"model": MODEL, "prompt": ["Once"], "stream": True}).text)
    assert s.text() == "Hello, world!" and all(c["object"] == "text_completion" for c in s.chunks)
    assert s.chunks[-1]["choices"][0]["finish_reason"] == "stop" and s.events[-1] == "[DONE]"


def test_stream_closed_by_the_node_without_final_chunk_ends_with_an_error(client: TestClient, node: ScriptedNode) -> None:
    node.script = lambda cmd: [tok(cmd, 0, "partial")]
    s = parse_sse(client.post("/v1/chat/completions", json=chat_body(stream=True)).text)
    assert s.errors and s.errors[0]["code"] == "stream_lost"
    assert s.events[-1] == "[DONE]"
    r = client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 502 and r.json()["error"]["code"] == "stream_lost"


def slow_words(cmd: SubmitTask) -> list[TokenChunk | float]:
    out: list[TokenChunk | float] = []
    for i in range(50):
        out += [tok(cmd, i, f" w{i}"), 0.1]
    out.append(final(cmd, 50))
    return out


def test_client_disconnect_mid_stream_abandons_the_request(served: ServedApp) -> None:
    node = served.node
    node.script = slow_words
    with httpx.Client(base_url=served.base_url, timeout=10.0) as http:
        with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            seen = 0
            for line in lines:
                if line.startswith("data: ") and '"content":" w' in line:
                    seen += 1
                    if seen == 2:
                        break
    cid = node.tasks_submitted()[0].command_id
    wait_for(lambda: node.abandoned == [cid])
    assert cid not in node.open_streams
    # The node keeps serving.
    node.script = ScriptedNode().script
    assert httpx.post(served.base_url + "/v1/chat/completions", json=chat_body(), timeout=10).status_code == 200
    metrics = httpx.get(served.base_url + "/metrics").text
    assert "skulk_api_abandoned_total 1" in metrics and "skulk_api_streams_active 0" in metrics


def test_client_disconnect_while_waiting_non_streamed_abandons(served: ServedApp) -> None:
    node = served.node
    node.script = lambda cmd: [5.0, final(cmd, 0)]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.base_url + "/v1/chat/completions", json=chat_body(), timeout=0.5)
    cid = node.tasks_submitted()[0].command_id
    wait_for(lambda: node.abandoned == [cid])


def test_cancel_endpoint_ends_the_stream_as_cancelled(served: ServedApp) -> None:
    node = served.node
    node.script = slow_words
    with httpx.Client(base_url=served.base_url, timeout=10.0) as http:
        with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
            body = []
            cid = None
            for line in r.iter_lines():
                body.append(line)
                if line.startswith(": command_id "):
                    cid = line.split()[-1]
                if cid and '"content":" w1"' in line:
                    resp = httpx.post(f"{served.base_url}/v1/cancel/{cid}", timeout=10)
                    assert resp.status_code == 200, resp.text
                    assert resp.json()["command_id"] == cid
    lines = [line for line in body if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1] if line.startswith("data: ")]
    assert all("error" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "cancelled"
    assert len(chunks) < 45, "the stream stopped early"
    cancels = [c for c in node.submitted if isinstance(c, CancelTask)]
    assert [c.target for c in cancels] == [cid], "the master is told too (the request may live on another node)"


def test_stats_comment_carries_speculation_figures(client: TestClient, node: ScriptedNode) -> None:
    stats = GenerationStats(prompt_tps=100.0, generation_tps=80.0, prompt_tokens=5, generation_tokens=2, acceptance_rate=0.5, draft_depth=3)
    node.script = lambda cmd: [tok(cmd, 0, "ab"), final(cmd, 1, stats=stats)]
    s = parse_sse(client.post("/v1/chat/completions", json=chat_body(stream=True)).text)
    assert json.loads(s.comment("generation_stats")) == {
        "prompt_tps": 100.0, "generation_tps": 80.0, "prompt_tokens": 5, "generation_tokens": 2,
        "acceptance_rate": 0.5, "draft_depth": 3,
    }
