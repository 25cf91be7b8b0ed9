"""Each dialect renders the runner's split chunks (reasoning, content, tool calls) in its own shape.

In process, over the node double: the runner stand-in plays a reply with reasoning, text and a
tool call, and every dialect, streamed and not, must show the reasoning as reasoning (never in the
content), the call as a call, and its own finish reason. The real runner's parsing is tested in
tests/engine; the official clients against a real node in test_agent_*.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.testclient import TestClient

from skulk.core.commands import SubmitTask
from skulk.core.tasks import ToolCallDelta, Usage
from tests.api.node_double import ScriptedNode
from tests.api.sse_parse import parse_sse
from tests.api.test_streaming import final, tok

MODEL = "skulk/tiny-qwen2"
CALL = ToolCallDelta(index=0, id="call_x1", name="get_weather", arguments='{"location": "Paris"}')


def reply(cmd: SubmitTask) -> list[Any]:
    usage = Usage(prompt_tokens=9, completion_tokens=5, total_tokens=14)
    return [
        tok(cmd, 0, "", reasoning="Weather needs "),
        tok(cmd, 1, "", reasoning="a tool."),
        tok(cmd, 2, "Checking."),
        tok(cmd, 3, "", tool_calls=(CALL,)),
        final(cmd, 4, "tool_calls", usage=usage),
    ]


@pytest.fixture
def scripted(node: ScriptedNode) -> ScriptedNode:
    node.script = reply
    return node


def test_openai_chat(client: TestClient, scripted: ScriptedNode) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    assert message["message"]["reasoning_content"] == "Weather needs a tool."
    assert message["message"]["content"] == "Checking."
    assert message["message"]["tool_calls"] == [{"id": "call_x1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}}]
    events = parse_sse(client.post("/v1/chat/completions", json={**body, "stream": True}).text).chunks
    deltas = [c["choices"][0]["delta"] for c in events if c.get("choices")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Weather needs a tool."
    assert "".join(d.get("content", "") for d in deltas) == "Checking."
    assert [tc for d in deltas for tc in d.get("tool_calls", [])][0]["index"] == 0


def test_anthropic(client: TestClient, scripted: ScriptedNode) -> None:
    body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    msg = client.post("/v1/messages", json=body).json()
    assert [b["type"] for b in msg["content"]] == ["thinking", "text", "tool_use"]
    assert msg["content"][0]["thinking"] == "Weather needs a tool." and msg["content"][1]["text"] == "Checking."
    assert msg["content"][2] == {"type": "tool_use", "id": "call_x1", "name": "get_weather", "input": {"location": "Paris"}}
    assert msg["stop_reason"] == "tool_use" and msg["usage"] == {"input_tokens": 9, "output_tokens": 5}
    text = client.post("/v1/messages", json={**body, "stream": True}).text
    names = [line[len("event: "):] for line in text.splitlines() if line.startswith("event: ")]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 3


def test_responses(client: TestClient, scripted: ScriptedNode) -> None:
    body = {"model": MODEL, "input": "hi"}
    resp = client.post("/v1/responses", json=body).json()
    kinds = [item["type"] for item in resp["output"]]
    assert kinds == ["reasoning", "message", "function_call"]
    assert resp["output"][0]["content"][0]["text"] == "Weather needs a tool."
    assert resp["output"][1]["content"][0]["text"] == "Checking."
    assert resp["output"][2]["call_id"] == "call_x1" and json.loads(resp["output"][2]["arguments"]) == {"location": "Paris"}
    assert resp["status"] == "completed" and resp["usage"]["total_tokens"] == 14


def test_ollama(client: TestClient, scripted: ScriptedNode) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    out = client.post("/api/chat", json=body).json()
    assert out["message"]["thinking"] == "Weather needs a tool." and out["message"]["content"] == "Checking."
    assert out["message"]["tool_calls"][0]["function"] == {"index": 0, "name": "get_weather", "arguments": {"location": "Paris"}}
    assert out["done"] is True and out["prompt_eval_count"] == 9 and out["eval_count"] == 5
    lines = [json.loads(line) for line in client.post("/api/chat", json={**body, "stream": True}).text.splitlines() if line]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert "".join(line["message"].get("thinking", "") for line in lines) == "Weather needs a tool."
