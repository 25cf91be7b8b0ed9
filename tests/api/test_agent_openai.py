"""Tools, structured output and reasoning through the official ``openai`` client, against a REAL node.

Shows (issue 13): a forced ``get_weather(location, units)`` call comes back as a parsed tool call
whose arguments validate against its schema, streamed and not, from the random-weight model and
from the default model (the grammar makes it valid, not luck); a ``json_schema`` response
validates; a full tool round trip (call, ``tool`` result, final answer) completes; bad tool and
schema inputs get OpenAI's 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.api.agent_node import API_KEY, MODELS, RANDOM_MODEL, REPORT_SCHEMA, WEATHER_PARAMETERS, WEATHER_TOOL, AgentNode

pytestmark = pytest.mark.cluster

ASK = [{"role": "user", "content": "What is the weather in Paris right now? Use celsius."}]


def client(node: AgentNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=API_KEY, max_retries=0, timeout=180.0)


def _check_weather_call(name: str, arguments: str) -> dict[str, Any]:
    assert name == "get_weather"
    args = json.loads(arguments)
    jsonschema.validate(args, WEATHER_PARAMETERS)
    return args


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_call_is_a_valid_parsed_tool_call(agent_node: AgentNode, model: str, choice: str) -> None:
    tool_choice: Any = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else "required"
    reply = client(agent_node).chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER_TOOL], tool_choice=tool_choice, max_tokens=120, seed=7
    )
    (only,) = reply.choices
    assert only.finish_reason == "tool_calls", only
    assert only.message.content is None
    (call,) = only.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    _check_weather_call(call.function.name, call.function.arguments)


@pytest.mark.parametrize("model", MODELS)
def test_forced_call_streamed_as_tool_call_deltas(agent_node: AgentNode, model: str) -> None:
    stream = client(agent_node).chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=120, seed=3, stream=True
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    content = ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                slot = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += delta.id or ""
                slot["name"] += (delta.function.name or "") if delta.function else ""
                slot["arguments"] += (delta.function.arguments or "") if delta.function else ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert content == ""
    assert list(calls) == [0]
    _check_weather_call(calls[0]["name"], calls[0]["arguments"])


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response_validates(agent_node: AgentNode, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT_SCHEMA, "strict": True}}
    oa = client(agent_node)
    kwargs: dict[str, Any] = dict(
        model=RANDOM_MODEL, messages=[{"role": "user", "content": "Weather report for Oslo."}], response_format=fmt,
        max_tokens=120, seed=11,
    )
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(stream=True, **kwargs) if c.choices)
    else:
        reply = oa.chat.completions.create(**kwargs)
        assert reply.choices[0].finish_reason == "stop"
        text = reply.choices[0].message.content or ""
    jsonschema.validate(json.loads(text), REPORT_SCHEMA)


def test_json_object_response_is_an_object(agent_node: AgentNode) -> None:
    reply = client(agent_node).chat.completions.create(
        model=RANDOM_MODEL, messages=[{"role": "user", "content": "JSON please"}], response_format={"type": "json_object"},
        max_tokens=60, temperature=0, seed=1,
    )
    text = reply.choices[0].message.content or ""
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # a random model may write a long object; what it wrote is still the start of one
        assert text.startswith("{")


@pytest.mark.parametrize("model", MODELS)
def test_tool_round_trip(agent_node: AgentNode, model: str) -> None:
    oa = client(agent_node)
    first = oa.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=120, seed=5
    )
    (call,) = first.choices[0].message.tool_calls or []
    args = _check_weather_call(call.function.name, call.function.arguments)
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"location": args["location"], "temperature": 21})},
    ]
    final = oa.chat.completions.create(model=model, messages=history, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=24, seed=5)
    choice = final.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.tool_calls is None
    assert choice.message.content


def test_bad_tool_inputs_are_400_naming_the_field(agent_node: AgentNode) -> None:
    oa = client(agent_node)
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[{"type": "function", "function": {"name": "bad", "parameters": {"type": "object", "properties": {"x": {"type": "nonsense"}}}}}]),
         "tools[0].function.parameters"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema.schema"),
        (dict(messages=[*ASK, {"role": "tool", "content": "21 degrees"}]), "messages[1].tool_call_id"),
        (dict(messages=[*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]}]),
         "messages[1].tool_calls[0].function.arguments"),
        (dict(frequency_penalty=0.5), "frequency_penalty"),
        (dict(logit_bias={"1": 5}), "logit_bias"),
    ]
    for extra, param in cases:
        body: dict[str, Any] = {"model": RANDOM_MODEL, "messages": ASK, "max_tokens": 4, **extra}
        with pytest.raises(openai.BadRequestError) as bad:
            oa.chat.completions.create(**body)
        assert bad.value.param == param, (extra, bad.value.body)
    # The node keeps serving.
    ok = oa.chat.completions.create(model=RANDOM_MODEL, messages=ASK, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")
