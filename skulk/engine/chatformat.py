"""A model's chat formats: how a request becomes a prompt, and the reply becomes parts.

Theory of operation
-------------------
Every dialect reaches the runner as the same ``GenerationParams``: OpenAI-shaped
messages (with tool calls and tool results), tools, ``tool_choice``,
``response_format`` and the reasoning knobs. This module decides, once per
request and close to the tokens, everything that depends on the model:

- the *formats* (``ChatFormats``): the tool format and reasoning format from
  the model card when it names them (``params.tool_format`` /
  ``reasoning_format``), else detected from the chat template's text;
- the *prompt*: the model's own chat template with ``tools=`` and
  ``enable_thinking`` / ``reasoning_effort`` when the template knows them;
  for a template that has no notion of tools, Skulk writes the tools into
  the system message and earlier calls and results into the turns, in the
  format the reply will be parsed with (``skulk.engine.toolcalls``);
- the *grammar* of a constrained reply (``grammar_for``): JSON for
  ``response_format``, the format's framing of one call for a forced
  ``tool_choice``;
- the *reply parser* (``ReplyParser``): reasoning first (``<think>`` or
  harmony channels), then tool calls out of the content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from skulk.core.tasks import ChatMessage, GenerationParams
from skulk.engine.reasoning import HarmonyParser, Parts, ThinkSplitter
from skulk.engine.toolcalls import (
    Llama3JsonParser,
    MistralParser,
    TaggedCallParser,
    call_grammar,
    calls_text,
    content_grammar,
    tool_prompt,
)

__all__ = [
    "ChatFormats",
    "detect_formats",
    "resolve_formats",
    "render_chat",
    "prompt_opens_reasoning",
    "grammar_for",
    "ReplyParser",
    "call_id_maker",
]

_THINK_OPEN = "<think>"


@dataclass(frozen=True)
class ChatFormats:
    """What a model's replies look like (see the module docstring)."""

    tool: str  # hermes, smollm2, llama3_json, mistral, harmony
    reasoning: str  # think, harmony, none
    template_tools: bool  # the chat template renders tools and tool turns itself
    thinking_toggle: bool  # the template reads enable_thinking


def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default") or next(iter(template.values()), "")
    return template if isinstance(template, str) else ""


def detect_formats(tokenizer: Any) -> ChatFormats:
    """The formats a chat template implies; hermes with Skulk's own tool prompt when it implies none."""
    text = _template_text(tokenizer)
    if "<|channel|>" in text:
        tool, reasoning = "harmony", "harmony"
    else:
        reasoning = "think" if _THINK_OPEN in text else "none"
        if "[TOOL_CALLS]" in text:
            tool = "mistral"
        elif "<|python_tag|>" in text or ("ipython" in text and '"parameters"' in text):
            tool = "llama3_json"
        else:
            tool = "hermes"
    return ChatFormats(
        tool=tool,
        reasoning=reasoning,
        template_tools="tools" in text,
        thinking_toggle="enable_thinking" in text,
    )


def resolve_formats(detected: ChatFormats, params: GenerationParams) -> ChatFormats:
    """``detected`` with the card's choices (carried in ``params``) applied."""
    return ChatFormats(
        tool=params.tool_format or detected.tool,
        reasoning=params.reasoning_format or detected.reasoning,
        template_tools=detected.template_tools,
        thinking_toggle=detected.thinking_toggle,
    )


def _uses_tools(params: GenerationParams) -> bool:
    return bool(params.tools) and params.tool_choice.mode != "none"


def _template_message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments or "{}")}}
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    if m.reasoning:
        out["reasoning_content"] = m.reasoning  # Qwen3's name
        out["thinking"] = m.reasoning  # gpt-oss's name
    return out


def _skulk_tool_messages(params: GenerationParams, formats: ChatFormats) -> list[dict[str, Any]]:
    """Messages for a template without tools: tools in the system turn, calls and results as text."""
    messages: list[dict[str, Any]] = []
    for m in params.messages or ():
        if m.role == "assistant" and m.tool_calls:
            text = calls_text(formats.tool, m.tool_calls)
            messages.append({"role": "assistant", "content": (m.content + "\n" + text) if m.content else text})
        elif m.role == "tool":
            messages.append({"role": "user", "content": f"<tool_response>\n{m.content}\n</tool_response>"})
        else:
            messages.append({"role": m.role, "content": m.content})
    if _uses_tools(params):
        section = tool_prompt(formats.tool, params.tools)
        if messages and messages[0]["role"] in ("system", "developer"):
            messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + section}
        else:
            messages.insert(0, {"role": "system", "content": section})
    return messages


def render_chat(tokenizer: Any, params: GenerationParams, formats: ChatFormats) -> str:
    """The prompt text of a chat request (raises ``ValueError`` if the template refuses it)."""
    assert params.messages, "a chat needs messages"
    kwargs: dict[str, Any] = {}
    if params.enable_thinking is not None:
        kwargs["enable_thinking"] = params.enable_thinking
    if params.reasoning_effort is not None:
        kwargs["reasoning_effort"] = params.reasoning_effort
    if not getattr(tokenizer, "has_chat_template", False):
        messages = _skulk_tool_messages(params, formats)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    if formats.template_tools:
        messages = [_template_message(m) for m in params.messages]
        if _uses_tools(params):
            kwargs["tools"] = [
                {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": json.loads(t.parameters)}}
                for t in params.tools
            ]
    else:
        messages = _skulk_tool_messages(params, formats)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    except Exception as exc:  # a template that rejects these messages (jinja raise_exception)
        raise ValueError(f"the chat template rejected the messages: {exc}") from exc
    if not isinstance(text, str):
        raise ValueError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def prompt_opens_reasoning(prompt_text: str, formats: ChatFormats) -> bool:
    """Did the template itself open a ``<think>`` block (so the reply starts inside it)?"""
    if formats.reasoning != "think":
        return False
    tail = prompt_text.rstrip()
    return tail.endswith(_THINK_OPEN)


def grammar_for(params: GenerationParams, formats: ChatFormats) -> str | None:
    """The Lark grammar the reply must follow, or None when it is free."""
    choice = params.tool_choice
    if params.tools and choice.mode in ("required", "function"):
        tools = [t for t in params.tools if choice.mode == "required" or t.name == choice.name]
        assert tools, (choice, [t.name for t in params.tools])
        return call_grammar(formats.tool, tools)
    fmt = params.response_format
    if fmt.type == "json_object":
        return content_grammar(formats.tool, {"type": "object"})
    if fmt.type == "json_schema":
        assert fmt.schema is not None
        return content_grammar(formats.tool, json.loads(fmt.schema))
    return None


def call_id_maker(task_id: str) -> Callable[[], str]:
    """Tool-call ids for one request: stable, unique within it, unlikely to collide across."""
    stem = hashlib.sha256(task_id.encode()).hexdigest()[:16]
    counter = iter(range(1 << 30))
    return lambda: f"call_{stem}{next(counter):02d}"


class _Passthrough:
    reasoning_done = True

    def push(self, text: str) -> Parts:
        return Parts(content=text)

    def flush(self) -> Parts:
        return Parts()


class ReplyParser:
    """Generated text in, ``Parts`` out: reasoning split first, then tool calls from the content."""

    def __init__(self, formats: ChatFormats, params: GenerationParams, new_id: Callable[[], str], *, in_reasoning: bool) -> None:
        self.calls = 0
        # parallel_tool_calls false: at most one call is returned (later ones are not calls the client asked for).
        self._max_calls = None if params.parallel_tool_calls else 1
        self._tools: Any = _Passthrough()
        self._reasoning: Any = _Passthrough()
        if formats.tool == "harmony" or formats.reasoning == "harmony":
            self._reasoning = HarmonyParser(new_id)  # one parser for both: channels carry both
            return
        if formats.reasoning == "think":
            self._reasoning = ThinkSplitter(in_reasoning=in_reasoning)
        if _uses_tools(params):
            parser_cls = {"llama3_json": Llama3JsonParser, "mistral": MistralParser}.get(formats.tool, TaggedCallParser)
            self._tools = parser_cls(new_id)

    @property
    def reasoning_done(self) -> bool:
        return bool(self._reasoning.reasoning_done)

    @property
    def in_reasoning_start(self) -> bool:
        """Still at the very start, where a ``<think>`` block may open."""
        return isinstance(self._reasoning, ThinkSplitter) and self._reasoning.state == "start"

    def _through_tools(self, parts: Parts) -> Parts:
        if parts.content:
            tooled = self._tools.push(parts.content)
            parts.content = tooled.content
            parts.calls.extend(tooled.calls)
        return self._count(parts)

    def _count(self, parts: Parts) -> Parts:
        if self._max_calls is not None:
            parts.calls = parts.calls[: max(0, self._max_calls - self.calls)]
        self.calls += len(parts.calls)
        return parts

    def push(self, text: str) -> Parts:
        return self._through_tools(self._reasoning.push(text))

    def flush(self) -> Parts:
        parts = self._through_tools(self._reasoning.flush())
        return parts.add(self._count(self._tools.flush()))

