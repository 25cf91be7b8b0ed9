"""Reply parsing per template family, and the grammars of forced calls (no MLX).

The parsers are streaming: whatever the split of the text into pieces, the parts they return
add up to the same content, reasoning and calls (checked by splitting at every position).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import llguidance
import pytest

from skulk.core.tasks import GenerationParams, ToolChoice, ToolSpec
from skulk.engine.chatformat import ChatFormats, ReplyParser, detect_formats
from skulk.engine.grammar import json_schema_grammar
from skulk.engine.reasoning import HarmonyParser, Parts, ThinkSplitter
from skulk.engine.toolcalls import Llama3JsonParser, MistralParser, TaggedCallParser, call_grammar, calls_text

TOOL = ToolSpec(name="get_weather", parameters=json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}))


def ids() -> Callable[[], str]:
    counter = iter(range(100))
    return lambda: f"call_{next(counter)}"


def feed(make: Callable[[], Any], text: str, cut: list[int]) -> tuple[str, str, list[tuple[str, str]]]:
    parser = make()
    out = Parts()
    bounds = [0, *cut, len(text)]
    for a, b in zip(bounds, bounds[1:]):
        out.add(parser.push(text[a:b]))
    out.add(parser.flush())
    return out.content, out.reasoning, [(c.name, c.arguments) for c in out.calls]


def every_split(make: Callable[[], Any], text: str) -> tuple[str, str, list[tuple[str, str]]]:
    whole = feed(make, text, [])
    for i in range(1, len(text)):
        assert feed(make, text, [i]) == whole, i
    assert feed(make, text, list(range(1, len(text)))) == whole, "one character at a time"
    return whole


def test_think_block_is_reasoning() -> None:
    content, reasoning, _ = every_split(ThinkSplitter, "\n<think>\nweigh it up</think>\n\nThe answer.")
    assert (content, reasoning) == ("The answer.", "\nweigh it up")
    assert every_split(ThinkSplitter, "No thinking here <think>x</think>")[:2] == ("No thinking here <think>x</think>", "")
    opened = every_split(lambda: ThinkSplitter(in_reasoning=True), "still thinking</think>done")
    assert opened[:2] == ("done", "still thinking")


def test_hermes_and_smollm2_blocks() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    content, _, calls = every_split(lambda: TaggedCallParser(ids()), text)
    assert content == "Let me check." and calls == [("get_weather", '{"city": "Paris"}')]
    smol = '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]</tool_call>'
    assert every_split(lambda: TaggedCallParser(ids()), smol) == ("", "", [("a", "{}"), ("b", '{"x": 1}')])
    broken = "<tool_call>{not json}</tool_call> then text"
    assert every_split(lambda: TaggedCallParser(ids()), broken)[0] == broken, "a malformed block is shown, never dropped"
    unclosed = '<tool_call>{"name": "a", "arguments": {"k": "v"}}'
    assert every_split(lambda: TaggedCallParser(ids()), unclosed)[2] == [("a", '{"k": "v"}')]


def test_llama3_json_and_mistral() -> None:
    llama = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "b", "parameters": {}}'
    assert every_split(lambda: Llama3JsonParser(ids()), llama)[2] == [("get_weather", '{"city": "Oslo"}'), ("b", "{}")]
    assert every_split(lambda: Llama3JsonParser(ids()), "{ not a call")[0] == "{ not a call"
    v3 = 'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]'
    assert every_split(lambda: MistralParser(ids()), v3) == ("Sure. ", "", [("get_weather", '{"city": "Rome"}')])
    v11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]b[ARGS]{}'
    assert every_split(lambda: MistralParser(ids()), v11)[2] == [("get_weather", '{"city": "Rome"}'), ("b", "{}")]


def test_harmony_channels() -> None:
    text = (
        "<|channel|>analysis<|message|>User wants weather.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
    )
    content, reasoning, calls = every_split(lambda: HarmonyParser(ids()), text)
    assert (content, reasoning, calls) == ("", "User wants weather.", [("get_weather", '{"city": "Paris"}')])
    final = "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>Hello!"
    assert every_split(lambda: HarmonyParser(ids()), final)[:2] == ("Hello!", "Easy.")


def test_reply_parser_routes_reasoning_then_tools() -> None:
    formats = ChatFormats(tool="hermes", reasoning="think", template_tools=True, thinking_toggle=True)
    params = GenerationParams(prompt="x", tools=(TOOL,))
    text = '<think>need weather</think>\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    parsed = every_split(lambda: ReplyParser(formats, params, ids(), in_reasoning=False), text)
    assert parsed == ("", "need weather", [("get_weather", "{}")])
    no_tools = GenerationParams(prompt="x", tools=(TOOL,), tool_choice=ToolChoice(mode="none"))
    plain = every_split(lambda: ReplyParser(formats, no_tools, ids(), in_reasoning=False), "<tool_call>x</tool_call>")
    assert plain[0] == "<tool_call>x</tool_call>", "with tool_choice none nothing is parsed as a call"


def test_detected_formats() -> None:
    class Tok:
        def __init__(self, template: str) -> None:
            self.chat_template = template

    assert detect_formats(Tok("{{ '<tool_call>' }}{% if tools %}{% endif %}<think>")).tool == "hermes"
    assert detect_formats(Tok("[TOOL_CALLS] {{ tools }}")).tool == "mistral"
    assert detect_formats(Tok("<|python_tag|>{{ tools }}")).tool == "llama3_json"
    harmony = detect_formats(Tok("<|channel|>analysis"))
    assert (harmony.tool, harmony.reasoning) == ("harmony", "harmony")
    plain = detect_formats(Tok("{{ messages }}"))
    assert (plain.tool, plain.reasoning, plain.template_tools) == ("hermes", "none", False)


@pytest.mark.parametrize("fmt", ["hermes", "smollm2", "llama3_json", "mistral"])
def test_forced_call_grammars_compile_and_accept_what_the_parser_reads(fmt: str) -> None:
    grammar = llguidance.LLMatcher.grammar_from_lark(call_grammar(fmt, [TOOL]))
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""
    from skulk.core.tasks import ToolCall

    text = calls_text(fmt, [ToolCall(id="x", name="get_weather", arguments='{"city": "Paris"}')])
    parser = {"llama3_json": Llama3JsonParser, "mistral": MistralParser}.get(fmt, TaggedCallParser)
    assert feed(lambda: parser(ids()), text, [])[2] == [("get_weather", '{"city": "Paris"}')]
    assert llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(json_schema_grammar({"type": "object"}))) == ""


def test_harmony_forced_call_grammar_uses_special_tokens(tiny_path: Any) -> None:
    # gpt-oss's markers are special tokens; the grammar must name them as tokens (not text).
    from tokenizers import AddedToken, Tokenizer

    tk = Tokenizer.from_file(str(tiny_path / "tokenizer.json"))
    markers = ["<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>", "<|call|>", "<|return|>"]
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in markers])
    ll = llguidance.LLTokenizer(tk.to_str(), eos_token=[tk.token_to_id("<|call|>")])
    grammar = llguidance.LLMatcher.grammar_from_lark(call_grammar("harmony", [TOOL]))
    assert llguidance.LLMatcher.validate_grammar(grammar, ll) == ""
    matcher = llguidance.LLMatcher(ll, grammar)
    text = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
    assert matcher.consume_tokens(tk.encode(text).ids) and matcher.is_accepting(), matcher.get_error()
    assert feed(lambda: HarmonyParser(ids()), text, [])[2] == [("get_weather", '{"city": "Paris"}')]
    wrong = llguidance.LLMatcher(ll, grammar)
    assert not wrong.consume_tokens(tk.encode("<|channel|>final<|message|>hello").ids), "only the call is allowed"


def test_parallel_tool_calls_false_returns_one_call() -> None:
    formats = ChatFormats(tool="hermes", reasoning="none", template_tools=True, thinking_toggle=False)
    text = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>'
    both = GenerationParams(prompt="x", tools=(TOOL,))
    assert [c[0] for c in every_split(lambda: ReplyParser(formats, both, ids(), in_reasoning=False), text)[2]] == ["a", "b"]
    one = GenerationParams(prompt="x", tools=(TOOL,), parallel_tool_calls=False)
    assert [c[0] for c in every_split(lambda: ReplyParser(formats, one, ids(), in_reasoning=False), text)[2]] == ["a"]
