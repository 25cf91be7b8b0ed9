"""Tool calls in generated text: parsing them out, prompting for them, forcing them.

Theory of operation
-------------------
Each chat-template family writes calls its own way (the *tool format*):

=============  ==============================================================
``hermes``     ``<tool_call>\\n{"name": F, "arguments": {...}}\\n</tool_call>``
               (Qwen 2.5/3, Hermes; one block per call)
``smollm2``    ``<tool_call>[{"name": F, "arguments": {...}}, ...]</tool_call>``
               (SmolLM2: a JSON list in one block)
``llama3_json`` the whole reply is ``{"name": F, "parameters": {...}}``, maybe
               after ``<|python_tag|>``; several calls separated by ``;``
``mistral``    ``[TOOL_CALLS][{"name": F, "arguments": {...}}, ...]`` (v3) or
               ``[TOOL_CALLS]F[ARGS]{...}`` (v11 tokenizers)
``harmony``    gpt-oss; parsed by ``skulk.engine.reasoning.HarmonyParser``
=============  ==============================================================

The parsers are streaming and hold back only what could still become a
call; text that turns out not to be one (a malformed block) is shown as
content, never dropped. Calls are emitted whole, once their block closes.

``tool_prompt`` writes the tools into a system message for templates that
have no notion of tools (Skulk's generated models, SmolLM2's GGUF template),
in the format the model will be parsed with, and ``history_text`` renders
earlier calls and results the same way. ``call_grammar`` is the Lark grammar
(``skulk.engine.grammar``) of a forced call: the format's framing around
JSON that must validate against the tool's ``parameters``, so a forced call
parses and validates even from a model with random weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from skulk.core.tasks import ToolCall, ToolSpec
from skulk.engine.grammar import lark_json
from skulk.engine.reasoning import Parts, held_prefix

__all__ = [
    "TAG_FORMATS",
    "TaggedCallParser",
    "Llama3JsonParser",
    "MistralParser",
    "parse_call_objects",
    "tool_prompt",
    "calls_text",
    "call_grammar",
    "content_grammar",
]

TAG_FORMATS = frozenset({"hermes", "smollm2"})
_TAG_OPEN, _TAG_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL_CALLS = "[TOOL_CALLS]"
_MISTRAL_ARGS = "[ARGS]"
_MISTRAL_CALL_ID = "[CALL_ID]"


def _arguments_text(value: Any) -> str | None:
    """Arguments as compact-ish JSON object text; None when they are not an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def parse_call_objects(text: str, new_id: Callable[[], str]) -> list[ToolCall] | None:
    """Calls from JSON text holding one call object or a list of them; None if it is not that.

    A call object is ``{"name": str, "arguments" | "parameters": object}``
    (arguments may also arrive as a JSON string, as some models write them).
    """
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls: list[ToolCall] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return None
        raw = item.get("arguments", item.get("parameters", {}))
        arguments = _arguments_text(raw)
        if arguments is None:
            return None
        calls.append(ToolCall(id=new_id(), name=item["name"], arguments=arguments))
    return calls


class _WhitespaceHold:
    """Trailing whitespace is held until more text follows: before, between or after calls it is noise."""

    def __init__(self) -> None:
        self.held = ""

    def show(self, out: Parts, text: str) -> None:
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body) :]
        out.content += body


class TaggedCallParser:
    """``<tool_call>...</tool_call>`` blocks holding a call object or a list of them."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self._new_id = new_id
        self._buf = ""
        self._in_call = False
        self._ws = _WhitespaceHold()
        self.calls_made = 0

    def push(self, text: str) -> Parts:
        self._buf += text
        out = Parts()
        while True:
            if not self._in_call:
                at = self._buf.find(_TAG_OPEN)
                if at >= 0:
                    self._ws.show(out, self._buf[:at])
                    self._buf = self._buf[at + len(_TAG_OPEN) :]
                    self._in_call = True
                    continue
                hold = held_prefix(self._buf, (_TAG_OPEN,))
                self._ws.show(out, self._buf[: len(self._buf) - hold])
                self._buf = self._buf[len(self._buf) - hold :]
                return out
            at = self._buf.find(_TAG_CLOSE)
            if at < 0:
                return out  # a call is shown only once its block is complete
            body, self._buf = self._buf[:at], self._buf[at + len(_TAG_CLOSE) :]
            self._in_call = False
            self._block(out, body, closed=True)

    def _block(self, out: Parts, body: str, *, closed: bool) -> None:
        calls = parse_call_objects(body.strip(), self._new_id)
        if calls:
            out.calls.extend(calls)
            self.calls_made += len(calls)
        else:
            self._ws.show(out, _TAG_OPEN + body + (_TAG_CLOSE if closed else ""))

    def flush(self) -> Parts:
        out = Parts()
        if self._in_call:
            # The reply ended inside a block (EOS before the closing tag): parse what is there.
            self._block(out, self._buf, closed=False)
        else:
            self._ws.show(out, self._buf)
        if self._ws.held and not self.calls_made:
            out.content += self._ws.held
        self._buf, self._in_call, self._ws.held = "", False, ""
        return out


class Llama3JsonParser:
    """A reply that is a JSON call object (or several, ``;``-separated) is a call."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self._new_id = new_id
        self._buf = ""
        self.state = "start"  # start, json (held to the end), content

    def push(self, text: str) -> Parts:
        self._buf += text
        if self.state == "start":
            stripped = self._buf.lstrip()
            if stripped.startswith(_PYTHON_TAG):
                stripped = stripped[len(_PYTHON_TAG) :].lstrip()
            if not stripped or _PYTHON_TAG.startswith(stripped):
                return Parts()
            self.state = "json" if stripped.startswith("{") else "content"
        if self.state == "json":
            return Parts()
        out, self._buf = Parts(content=self._buf), ""
        return out

    def flush(self) -> Parts:
        text, self._buf = self._buf, ""
        if self.state != "json":
            return Parts(content=text)
        body = text.lstrip()
        if body.startswith(_PYTHON_TAG):
            body = body[len(_PYTHON_TAG) :]
        calls: list[ToolCall] = []
        for piece in _split_top_level(body.strip(), ";"):
            parsed = parse_call_objects(piece, self._new_id)
            if not parsed:
                return Parts(content=text)
            calls.extend(parsed)
        return Parts(calls=calls) if calls else Parts(content=text)


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside JSON strings and brackets."""
    parts, depth, start, in_str, escape = [], 0, 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            escape = (not escape) and ch == "\\"
            if ch == '"' and not escape:
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


class MistralParser:
    """``[TOOL_CALLS]`` and everything after it are calls; text before it is content."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self._new_id = new_id
        self._buf = ""
        self._in_calls = False

    def push(self, text: str) -> Parts:
        self._buf += text
        if self._in_calls:
            return Parts()
        at = self._buf.find(_MISTRAL_CALLS)
        if at >= 0:
            out = Parts(content=self._buf[:at])
            self._buf = self._buf[at + len(_MISTRAL_CALLS) :]
            self._in_calls = True
            return out
        hold = held_prefix(self._buf, (_MISTRAL_CALLS,))
        out = Parts(content=self._buf[: len(self._buf) - hold])
        self._buf = self._buf[len(self._buf) - hold :]
        return out

    def flush(self) -> Parts:
        body, self._buf = self._buf, ""
        if not self._in_calls:
            return Parts(content=body)
        calls: list[ToolCall] = []
        for piece in (p.strip() for p in body.split(_MISTRAL_CALLS)):
            if not piece:
                continue
            if piece.startswith("[") or piece.startswith("{"):
                parsed = parse_call_objects(piece, self._new_id)
            elif _MISTRAL_ARGS in piece:
                name, args = piece.split(_MISTRAL_ARGS, 1)
                name = name.split(_MISTRAL_CALL_ID, 1)[0].strip()
                arguments = _arguments_text(args.strip())
                parsed = [ToolCall(id=self._new_id(), name=name, arguments=arguments)] if name and arguments else None
            else:
                parsed = None
            if not parsed:
                return Parts(content=_MISTRAL_CALLS + body)
            calls.extend(parsed)
        return Parts(calls=calls)


# --- prompting ---------------------------------------------------------------------------


def _tool_json(tool: ToolSpec) -> dict[str, Any]:
    return {"type": "function", "function": {"name": tool.name, "description": tool.description, "parameters": json.loads(tool.parameters)}}


def calls_text(tool_format: str, calls: Sequence[ToolCall]) -> str:
    """Earlier calls written as the model would have written them (for templates without tools)."""
    objs = [{"name": c.name, ("parameters" if tool_format == "llama3_json" else "arguments"): json.loads(c.arguments or "{}")} for c in calls]
    if tool_format == "smollm2":
        return _TAG_OPEN + "[" + ", ".join(json.dumps(o, ensure_ascii=False) for o in objs) + "]" + _TAG_CLOSE
    if tool_format == "llama3_json":
        return "; ".join(json.dumps(o, ensure_ascii=False) for o in objs)
    if tool_format == "mistral":
        return _MISTRAL_CALLS + json.dumps(objs, ensure_ascii=False)
    return "\n".join(f"{_TAG_OPEN}\n{json.dumps(o, ensure_ascii=False)}\n{_TAG_CLOSE}" for o in objs)


def tool_prompt(tool_format: str, tools: Sequence[ToolSpec]) -> str:
    """A system-prompt section describing ``tools`` and how to call them in ``tool_format``."""
    listing = "\n".join(json.dumps(_tool_json(t), ensure_ascii=False) for t in tools)
    example = calls_text(tool_format, [ToolCall(id="example", name="function_name", arguments='{"argument": "value"}')])
    return (
        "You may call one or more of these functions to help with the user's request.\n"
        f"<tools>\n{listing}\n</tools>\n"
        f"To call functions, answer with exactly this format and nothing else:\n{example}\n"
        "Results come back in <tool_response></tool_response> tags."
    )


# --- forcing -----------------------------------------------------------------------------


def _call_schema(tool: ToolSpec, arg_key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, arg_key: json.loads(tool.parameters)},
        "required": ["name", arg_key],
        "additionalProperties": False,
    }


def call_grammar(tool_format: str, tools: Sequence[ToolSpec]) -> str:
    """The Lark grammar of one forced call to one of ``tools``.

    One call, not several: a grammar that allowed "another call" would let a
    weak model chain calls until ``max_tokens`` (parallel calls are the
    model's own choice under ``tool_choice: auto``).
    """
    assert tools, "a forced call needs at least one tool"
    if tool_format == "harmony":
        alternatives = " | ".join(f"call_{i}" for i in range(len(tools)))
        rules = [f"start: {alternatives}"]
        for i, tool in enumerate(tools):
            rules.append(
                f'call_{i}: <|channel|> "commentary to=functions.{tool.name} " <|constrain|> "json" <|message|> '
                + lark_json(json.loads(tool.parameters))
            )
        return "\n".join(rules) + "\n"
    arg_key = "parameters" if tool_format == "llama3_json" else "arguments"
    schemas = [_call_schema(t, arg_key) for t in tools]
    call = lark_json(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})
    if tool_format == "smollm2":
        start = f'start: "{_TAG_OPEN}[" call "]{_TAG_CLOSE}"'
    elif tool_format == "llama3_json":
        start = "start: call"
    elif tool_format == "mistral":
        start = f'start: "{_MISTRAL_CALLS}[" call "]"'
    else:
        start = f'start: "{_TAG_OPEN}\\n" call "\\n{_TAG_CLOSE}"'
    return f"{start}\ncall: {call}\n"


def content_grammar(tool_format: str, schema: dict[str, Any]) -> str:
    """The Lark grammar of a reply whose content is JSON valid under ``schema``."""
    if tool_format == "harmony":
        return f'start: <|channel|> "final" <|message|> {lark_json(schema)}\n'
    return f"start: {lark_json(schema)}\n"
