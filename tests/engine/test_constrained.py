"""Constrained decoding, tool-call parsing and reasoning in the engine (a world of one, in process).

Shows: constrained and free requests share one continuous batch with a mask per row (free rows
produce exactly the tokens they produce alone); a forced call and a json_schema reply are valid
from random weights; reasoning from a template that opens ``<think>`` goes to ``reasoning``.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from skulk.core.tasks import ChatMessage, ResponseFormat, TokenChunk, ToolChoice, ToolSpec
from skulk.engine.batch import Engine, EngineConfig
from tests.engine.helpers import make_task, tokens_of

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"location": {"type": "string", "maxLength": 30}, "units": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["location", "units"],
    "additionalProperties": False,
}
TOOL = ToolSpec(name="get_weather", description="weather", parameters=json.dumps(SCHEMA))
ASK = (ChatMessage(role="user", content="Weather in Paris?"),)


def run(loaded: Any, tasks: list[Any], **config: Any) -> dict[str, list[TokenChunk]]:
    out: list[TokenChunk] = []
    engine = Engine(loaded.shard, loaded.tokenizer, EngineConfig(context_ceiling=4096, **config), out.extend)
    for task in tasks:
        engine.submit(task)
    engine.drain()
    by: dict[str, list[TokenChunk]] = {}
    for chunk in out:
        by.setdefault(chunk.task_id, []).append(chunk)
    return by


def forced(**kw: Any) -> Any:
    return make_task("chat", messages=ASK, tools=(TOOL,), tool_choice=ToolChoice(mode="function", name="get_weather"), max_tokens=80, **kw)


def shaped(**kw: Any) -> Any:
    fmt = ResponseFormat(type="json_schema", schema=json.dumps(SCHEMA))
    return make_task("chat", messages=ASK, response_format=fmt, max_tokens=80, **kw)


def test_masks_are_per_row_in_a_continuous_batch(loaded: Any) -> None:
    plain = [make_task("chat", messages=(ChatMessage(role="user", content=f"Story {i}"),), max_tokens=24, temperature=0.0) for i in range(3)]
    alone = {t.task_id: tokens_of(run(loaded, [t])[t.task_id]) for t in plain}
    constrained = [forced(temperature=0.0), shaped(temperature=0.7, seed=4), forced(temperature=1.0, seed=9)]
    mixed = run(loaded, [constrained[0], plain[0], constrained[1], plain[1], constrained[2], plain[2]], max_concurrent=6)
    for t in plain:
        assert tokens_of(mixed[t.task_id]) == alone[t.task_id], "a free row must not feel its neighbours' masks"
    for t in (constrained[0], constrained[2]):
        final = mixed[t.task_id][-1]
        assert final.finish_reason == "tool_calls"
        (call,) = [c for chunk in mixed[t.task_id] for c in chunk.tool_calls]
        assert call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), SCHEMA)
        assert "".join(c.text for c in mixed[t.task_id]) == ""
    text = "".join(c.text for c in mixed[constrained[1].task_id])
    assert mixed[constrained[1].task_id][-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_constrained_greedy_is_the_same_alone_and_batched(loaded: Any) -> None:
    task = forced(temperature=0.0)
    alone = tokens_of(run(loaded, [task])[task.task_id])
    again = forced(temperature=0.0)
    batched = run(loaded, [again, make_task("chat", messages=ASK, max_tokens=30, temperature=0.0)], max_concurrent=2)
    assert tokens_of(batched[again.task_id]) == alone


def test_a_bad_grammar_is_refused_with_an_invalid_request_error(loaded: Any) -> None:
    bad = ToolSpec(name="broken", parameters=json.dumps({"type": "object", "properties": {"x": {"type": "nonsense"}}}))
    task = make_task("chat", messages=ASK, tools=(bad,), tool_choice=ToolChoice(mode="required"), max_tokens=8)
    (final,) = run(loaded, [task])[task.task_id]
    assert final.finish_reason == "error" and final.error is not None
    assert final.error.type == "invalid_request_error" and final.error.code == "invalid_grammar"


def test_reasoning_from_a_template_that_opens_think(loaded: Any, monkeypatch: Any) -> None:
    tokenizer = loaded.tokenizer
    template = (
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- if enable_thinking is not defined or enable_thinking %}<think>\n"
        "{%- else %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}"
    )
    monkeypatch.setattr(tokenizer._tokenizer, "chat_template", template)
    thinking = make_task("chat", messages=ASK, max_tokens=16, temperature=1.0, seed=1, reasoning_format="think", enable_thinking=True)
    chunks = run(loaded, [thinking])[thinking.task_id]
    assert "".join(c.reasoning for c in chunks) and "".join(c.text for c in chunks) == ""
    off = make_task("chat", messages=ASK, max_tokens=16, temperature=1.0, seed=1, reasoning_format="think", enable_thinking=False)
    chunks = run(loaded, [off])[off.task_id]
    assert "".join(c.reasoning for c in chunks) == "" and "".join(c.text for c in chunks)


QWEN_LIKE_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>\n{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}\n</tools><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{%- for c in m.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n'
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_history_renders_through_a_template_with_tools(loaded: Any, monkeypatch: Any) -> None:
    from skulk.core.tasks import GenerationParams, ToolCall
    from skulk.engine.chatformat import detect_formats, render_chat, resolve_formats

    monkeypatch.setattr(loaded.tokenizer._tokenizer, "chat_template", QWEN_LIKE_TOOLS_TEMPLATE)
    history = (
        *ASK,
        ChatMessage(role="assistant", content="", tool_calls=(ToolCall(id="call_1", name="get_weather", arguments='{"location": "Paris"}'),)),
        ChatMessage(role="tool", content="21 degrees", tool_call_id="call_1"),
    )
    params = GenerationParams(messages=history, tools=(TOOL,))
    formats = resolve_formats(detect_formats(loaded.tokenizer), params)
    assert formats.template_tools and formats.tool == "hermes"
    text = render_chat(loaded.tokenizer, params, formats)
    assert '"name": "get_weather"' in text and '"maxLength": 30' in text, "the tool's schema reaches the template"
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n21 degrees\n</tool_response>" in text
    # And a forced call through that template parses and validates.
    task = make_task("chat", messages=history, tools=(TOOL,), tool_choice=ToolChoice(mode="required"), max_tokens=80, temperature=0.0)
    chunks = run(loaded, [task])[task.task_id]
    (call,) = [c for chunk in chunks for c in chunk.tool_calls]
    jsonschema.validate(json.loads(call.arguments), SCHEMA)
