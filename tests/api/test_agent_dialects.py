"""Anthropic Messages, OpenAI Responses and Ollama against a REAL node, each with its official client.

Shows (issue 13): each dialect is a thin adapter onto the one generation path, so tool calls,
structured output and the tool round trip work the same through all three, streamed and not;
bad inputs get each dialect's own error shape and the node keeps serving.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest

from tests.api.agent_node import API_KEY, RANDOM_MODEL, REPORT_SCHEMA, WEATHER_PARAMETERS, WEATHER_TOOL, AgentNode

pytestmark = pytest.mark.cluster

MODEL = RANDOM_MODEL
QUESTION = "What is the weather in Paris right now? Use celsius."
ANTHROPIC_TOOL = {"name": "get_weather", "description": "Current weather at a place", "input_schema": WEATHER_PARAMETERS}
RESPONSES_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather at a place", "parameters": WEATHER_PARAMETERS}


def claude(node: AgentNode) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=node.url, api_key=API_KEY, max_retries=0, timeout=180.0)


def oai(node: AgentNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=API_KEY, max_retries=0, timeout=180.0)


def olla(node: AgentNode) -> ollama.Client:
    return ollama.Client(host=node.url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=180.0)


# --- Anthropic -------------------------------------------------------------------------------


def test_anthropic_forced_tool_use(agent_node: AgentNode) -> None:
    msg = claude(agent_node).messages.create(
        model=MODEL, max_tokens=120, messages=[{"role": "user", "content": QUESTION}], tools=[ANTHROPIC_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.stop_reason == "tool_use"
    (use,) = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id
    jsonschema.validate(use.input, WEATHER_PARAMETERS)
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0


def test_anthropic_streamed_tool_use_and_round_trip(agent_node: AgentNode) -> None:
    client = claude(agent_node)
    ask = [{"role": "user", "content": QUESTION}]
    with client.messages.stream(model=MODEL, max_tokens=120, messages=ask, tools=[ANTHROPIC_TOOL], tool_choice={"type": "any"}) as stream:
        kinds = [event.type for event in stream]
        first = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(kinds)
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    jsonschema.validate(use.input, WEATHER_PARAMETERS)
    history: list[Any] = [
        *ask,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 degrees, sunny"}]},
    ]
    final = client.messages.create(model=MODEL, max_tokens=16, messages=history, tools=[ANTHROPIC_TOOL], tool_choice={"type": "none"})
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in final.content] == ["text"] and final.content[0].text
    counted = client.messages.count_tokens(model=MODEL, messages=history, tools=[ANTHROPIC_TOOL])
    assert counted.input_tokens > final.usage.input_tokens // 2 > 0


def test_anthropic_errors_in_anthropic_shape(agent_node: AgentNode) -> None:
    client = claude(agent_node)
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": QUESTION}], tools=[ANTHROPIC_TOOL],
                               tool_choice={"type": "tool", "name": "nope"})
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="nobody/nothing", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["error"]["type"] == "not_found_error"
    with agent_node.http() as h:
        r = h.post("/v1/messages", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in r.json()["error"]["message"]
    ok = client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert ok.stop_reason in ("end_turn", "max_tokens")


# --- OpenAI Responses ---------------------------------------------------------------------------


def test_responses_forced_function_call_and_round_trip(agent_node: AgentNode) -> None:
    client = oai(agent_node)
    first = client.responses.create(model=MODEL, input=QUESTION, instructions="You answer about weather.", tools=[RESPONSES_TOOL],
                                    tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=120)
    assert first.status == "completed"
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    second = client.responses.create(
        model=MODEL, tools=[RESPONSES_TOOL], tool_choice="none", max_output_tokens=16,
        input=[{"role": "user", "content": QUESTION},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "21 degrees, sunny"}],
    )
    assert second.status in ("completed", "incomplete")
    assert second.output_text


def test_responses_streamed(agent_node: AgentNode) -> None:
    events = list(oai(agent_node).responses.create(model=MODEL, input=QUESTION, tools=[RESPONSES_TOOL], tool_choice="required",
                                                   max_output_tokens=120, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    (call,) = [i for i in events[-1].response.output if i.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    text_events = list(oai(agent_node).responses.create(model=MODEL, input="hi", max_output_tokens=6, stream=True))
    deltas = "".join(e.delta for e in text_events if e.type == "response.output_text.delta")
    assert deltas == text_events[-1].response.output_text


def test_responses_json_schema_and_errors(agent_node: AgentNode) -> None:
    client = oai(agent_node)
    reply = client.responses.create(model=MODEL, input="Weather report for Oslo.", max_output_tokens=120,
                                    text={"format": {"type": "json_schema", "name": "report", "schema": REPORT_SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(reply.output_text), REPORT_SCHEMA)
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
    assert bad.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as bad_schema:
        client.responses.create(model=MODEL, input="hi", text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}})
    assert bad_schema.value.param == "text.format.schema"


# --- Ollama ------------------------------------------------------------------------------------


def test_ollama_chat_streamed_and_not_with_schema(agent_node: AgentNode) -> None:
    client = olla(agent_node)
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "Weather report for Oslo."}], format=REPORT_SCHEMA,
                        options={"num_predict": 120, "seed": 3}, stream=False)
    assert reply.done and reply.done_reason == "stop"
    jsonschema.validate(json.loads(reply.message.content), REPORT_SCHEMA)
    parts = list(client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 6}, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert parts[-1].eval_count == 6 or parts[-1].done_reason == "stop"


def test_ollama_tool_round_trip_generate_and_listing(agent_node: AgentNode) -> None:
    client = olla(agent_node)
    history = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"location": "Paris", "units": "celsius"}}}]},
        {"role": "tool", "content": "21 degrees, sunny", "tool_name": "get_weather"},
    ]
    final = client.chat(model=MODEL, messages=history, tools=[WEATHER_TOOL], options={"num_predict": 12}, stream=False)
    assert final.done and final.message.role == "assistant"
    gen = client.generate(model=MODEL, prompt="Once upon a time", options={"num_predict": 5}, stream=False)
    assert gen.done and gen.response and gen.eval_count == 5
    streamed = "".join(p.response for p in client.generate(model=MODEL, prompt="Once", options={"num_predict": 5}, stream=True))
    assert streamed
    names = [m.model for m in client.list().models]
    assert MODEL in names
    shown = client.show(MODEL)
    assert "tools" in (shown.capabilities or [])
    with agent_node.http() as h:
        assert h.get("/api/version").json()["version"]


def test_ollama_errors_in_ollama_shape(agent_node: AgentNode) -> None:
    client = olla(agent_node)
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nobody/nothing", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert missing.value.status_code == 404
    with agent_node.http() as h:
        r = h.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]})
        assert r.status_code == 400 and set(r.json()) == {"error"} and "images" in r.json()["error"]
        r = h.post("/api/chat", content=b"{not json")
        assert r.status_code == 400 and set(r.json()) == {"error"}
    assert client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2}, stream=False).done


def test_plain_http_stream_is_ndjson(agent_node: AgentNode) -> None:
    with agent_node.http() as h, h.stream("POST", "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                                       "options": {"num_predict": 3}}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True
    assert isinstance(httpx.__version__, str)
