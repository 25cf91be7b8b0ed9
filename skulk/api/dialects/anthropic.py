"""Anthropic Messages: ``POST /v1/messages`` (JSON and SSE) and ``POST /v1/messages/count_tokens``.

Translation (onto ``skulk.api.agent.ChatSpec``):

- ``system`` (text or text blocks) becomes the first system turn;
- user turns: ``text`` blocks are the text, each ``tool_result`` block becomes a
  ``tool`` turn (its ``tool_use_id``); assistant turns: ``text``, ``tool_use``
  (calls) and ``thinking`` (earlier reasoning) blocks;
- ``tool_choice``: ``auto``, ``any`` (required), ``tool`` (named), ``none``;
  ``disable_parallel_tool_use``; ``thinking: {type: enabled|disabled}`` is
  ``enable_thinking``;
- the reply: ``thinking`` block (reasoning), ``text`` block (content), one
  ``tool_use`` block per call; ``stop_reason`` ``end_turn``, ``max_tokens`` or
  ``tool_use``.

Errors use Anthropic's envelope ``{"type": "error", "error": {"type", "message"}}``.
Unknown fields are ignored, as Anthropic's API does; fields it defines that
Skulk cannot serve (image and document blocks, ``container``, ``mcp_servers``)
are refused by name (docs/api.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response

from skulk.api.agent import ChatSpec, arguments_object, prepare_spec, tool_spec
from skulk.api.body import decode_body, read_body
from skulk.api.appstate import app_state
from skulk.api.dialects import with_errors
from skulk.api.dialects.blocks import BlockRenderer
from skulk.api.errors import ApiError
from skulk.api.generation import Prepared
from skulk.api.openai_routes import run_generation
from skulk.api.wire import json_response
from skulk.core.tasks import ChatMessage, ChunkError, TokenChunk, ToolCall, ToolCallDelta, ToolChoice, ToolChoiceMode

__all__ = ["messages", "count_tokens", "AnthropicMessagesRequest", "error_response", "ANTHROPIC_ERROR_TYPES"]

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
}

_ENCODER = msgspec.json.Encoder()


class AnthropicErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    message: str


class AnthropicErrorEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}``."""

    type: Literal["error"]
    error: AnthropicErrorBody


def error_response(exc: ApiError) -> Response:
    kind = ANTHROPIC_ERROR_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": kind, "message": exc.message}}
    return Response(_ENCODER.encode(body), status_code=exc.status, media_type="application/json", headers=exc.headers)


class _Req(msgspec.Struct, frozen=True, kw_only=True):
    pass


class AnthropicToolDef(_Req, frozen=True, kw_only=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None


class AnthropicToolChoiceIn(_Req, frozen=True, kw_only=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class AnthropicThinkingIn(_Req, frozen=True, kw_only=True):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class AnthropicMessageIn(_Req, frozen=True, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicMessagesRequest(_Req, frozen=True, kw_only=True):
    """``POST /v1/messages`` (and, without ``max_tokens``, ``count_tokens``)."""

    model: str
    messages: Annotated[list[AnthropicMessageIn], Meta(min_length=1, max_length=4096)]
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    system: str | list[dict[str, Any]] | None = None
    stream: bool = False
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    stop_sequences: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=16)] | None = None
    tools: Annotated[list[AnthropicToolDef], Meta(max_length=128)] | None = None
    tool_choice: AnthropicToolChoiceIn | None = None
    thinking: AnthropicThinkingIn | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    container: Any = None
    mcp_servers: Any = None


def _text_of(blocks: str | list[dict[str, Any]], param: str) -> str:
    if isinstance(blocks, str):
        return blocks
    parts = []
    for i, block in enumerate(blocks):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise ApiError(400, f"{param}[{i}] must be a text block", code="invalid_value", param=f"{param}[{i}]")
        parts.append(block["text"])
    return "\n".join(parts)


def _unsupported_block(kind: str, param: str) -> ApiError:
    return ApiError(400, f"{param}: content blocks of type {kind!r} are not supported by Skulk (text only)", code="unsupported_value", param=param)


def _messages(body: AnthropicMessagesRequest) -> tuple[ChatMessage, ...]:
    out: list[ChatMessage] = []
    if body.system:
        out.append(ChatMessage(role="system", content=_text_of(body.system, "system")))
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            if not m.content and m.role == "user":
                raise ApiError(400, f"messages[{i}].content must not be empty", code="invalid_value", param=f"messages[{i}].content")
            out.append(ChatMessage(role=m.role, content=m.content))
            continue
        texts: list[str] = []
        calls: list[ToolCall] = []
        reasoning: list[str] = []
        for j, block in enumerate(m.content):
            param = f"messages[{i}].content[{j}]"
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_result" and m.role == "user":
                call_id = block.get("tool_use_id")
                if not isinstance(call_id, str) or not call_id:
                    raise ApiError(400, f"{param}.tool_use_id is required", code="missing_field", param=f"{param}.tool_use_id")
                result = block.get("content", "")
                text = result if isinstance(result, str) else _text_of(result, f"{param}.content")
                if block.get("is_error"):
                    text = f"error: {text}"
                out.append(ChatMessage(role="tool", content=text, tool_call_id=call_id))
            elif kind == "tool_use" and m.role == "assistant":
                call_id, name = block.get("id"), block.get("name")
                if not isinstance(call_id, str) or not isinstance(name, str):
                    raise ApiError(400, f"{param} needs id and name", code="missing_field", param=param)
                calls.append(ToolCall(id=call_id, name=name, arguments=arguments_object(block.get("input", {}), f"{param}.input")))
            elif kind in ("thinking", "redacted_thinking") and m.role == "assistant":
                if isinstance(block.get("thinking"), str):
                    reasoning.append(block["thinking"])
            else:
                raise _unsupported_block(str(kind), param)
        if texts or calls or reasoning:
            out.append(ChatMessage(role=m.role, content="\n".join(texts), tool_calls=tuple(calls), reasoning="".join(reasoning) or None))
    if not out or all(m.role == "system" for m in out):
        raise ApiError(400, "messages must hold at least one user turn", code="invalid_value", param="messages")
    return tuple(out)


_CHOICE_MODES: dict[str, ToolChoiceMode] = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}


def _spec(body: AnthropicMessagesRequest, *, stream: bool, max_tokens: int | None) -> ChatSpec:
    if body.container is not None:
        raise ApiError(400, "container is not supported by Skulk", code="unsupported_value", param="container")
    if body.mcp_servers is not None:
        raise ApiError(400, "mcp_servers is not supported by Skulk", code="unsupported_value", param="mcp_servers")
    tools = tuple(tool_spec(t.name, t.description, t.input_schema, f"tools[{i}].input_schema") for i, t in enumerate(body.tools or ()))
    choice, parallel = ToolChoice(mode="auto"), True
    if body.tool_choice is not None:
        tc = body.tool_choice
        mode = _CHOICE_MODES[tc.type]
        if tc.type == "tool" and not tc.name:
            raise ApiError(400, "tool_choice of type tool needs a name", code="missing_field", param="tool_choice.name")
        choice = ToolChoice(mode=mode, name=tc.name if tc.type == "tool" else None)
        parallel = not tc.disable_parallel_tool_use
    thinking = None if body.thinking is None else body.thinking.type != "disabled"
    return ChatSpec(
        model=body.model,
        messages=_messages(body),
        stream=stream,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=tuple(body.stop_sequences or ()),
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        enable_thinking=thinking,
    )


_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "cancelled": "end_turn"}


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _ENCODER.encode(payload) + b"\n\n"


@dataclass
class MessagesRenderer(BlockRenderer):
    """Runner chunks as Anthropic SSE events, or (collected) one message object."""

    REASONING: ClassVar[str] = "thinking"
    TEXT: ClassVar[str] = "text"

    prepared: Prepared
    blocks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def message_id(self) -> str:
        return "msg_" + self.prepared.command.command_id.replace("-", "")

    def _shell(self) -> dict[str, Any]:
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.prepared.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }

    def opening(self) -> list[bytes]:
        return [_event("message_start", {"type": "message_start", "message": self._shell()}), _event("ping", {"type": "ping"})]

    def _open(self, kind: str) -> list[bytes]:
        block = {"type": kind, kind: ""} if kind == "thinking" else {"type": "text", "text": ""}
        if kind == "thinking":
            block["signature"] = ""
        self.blocks.append(block)
        return [_event("content_block_start", {"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": dict(block)})]

    def _delta(self, kind: str, text: str) -> list[bytes]:
        key = "thinking" if kind == "thinking" else "text"
        self.blocks[-1][key] += text
        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else {"type": "text_delta", "text": text}
        return [_event("content_block_delta", {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta})]

    def _end(self, kind: str) -> list[bytes]:
        events = []
        if kind == "thinking":
            events.append(_event("content_block_delta", {"type": "content_block_delta", "index": len(self.blocks) - 1,
                                                         "delta": {"type": "signature_delta", "signature": ""}}))
        events.append(_event("content_block_stop", {"type": "content_block_stop", "index": len(self.blocks) - 1}))
        return events

    def _tool_call(self, call: ToolCallDelta) -> list[bytes]:
        block = {"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments or "{}")}
        self.blocks.append(block)
        index = len(self.blocks) - 1
        return [
            _event("content_block_start", {"type": "content_block_start", "index": index,
                                           "content_block": {**block, "input": {}}}),
            _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                           "delta": {"type": "input_json_delta", "partial_json": call.arguments}}),
            _event("content_block_stop", {"type": "content_block_stop", "index": index}),
        ]

    def _error(self, error: ChunkError) -> list[bytes]:
        kind = "invalid_request_error" if error.type == "invalid_request_error" else "api_error"
        return [_event("error", {"type": "error", "error": {"type": kind, "message": error.message}})]

    def _finish(self, finish: str) -> list[bytes]:
        events = self._close()
        delta = {"stop_reason": _STOP_REASONS.get(finish, "end_turn"), "stop_sequence": None}
        events.append(_event("message_delta", {"type": "message_delta", "delta": delta,
                                               "usage": {"input_tokens": self.usage_in, "output_tokens": self.usage_out}}))
        events.append(_event("message_stop", {"type": "message_stop"}))
        return events

    def lost(self) -> list[bytes]:
        return [_event("error", {"type": "error", "error": {"type": "api_error",
                                                           "message": "the node lost this request's stream; retry the request"}})]

    def final(self, last: TokenChunk | None, finish: str) -> dict[str, Any]:
        message = self._shell()
        message["content"] = [dict(b) for b in self.blocks]
        message["stop_reason"] = _STOP_REASONS.get(finish, "end_turn")
        message["usage"] = {"input_tokens": self.usage_in, "output_tokens": self.usage_out}
        return message


@with_errors(error_response)
async def messages(request: Request) -> Response:
    """``POST /v1/messages``."""
    context = app_state(request)
    body = decode_body(await read_body(request, context.config.max_body_bytes), AnthropicMessagesRequest)
    if body.max_tokens is None:
        raise ApiError(400, "max_tokens: Field required", code="missing_field", param="max_tokens")
    prepared = prepare_spec(context.node, _spec(body, stream=body.stream, max_tokens=body.max_tokens), context.config.max_output_tokens)
    return await run_generation(request, context, prepared, MessagesRenderer(prepared))


@with_errors(error_response)
async def count_tokens(request: Request) -> Response:
    """``POST /v1/messages/count_tokens``: the prompt's length as the model's runner tokenises it.

    The prompt (template, tools, system) is rendered where the tokenizer lives, on the
    runner, through the one generation path: a request for a single token whose usage
    reports the prompt's length. Exact, at the price of one decode step.
    """
    context = app_state(request)
    body = decode_body(await read_body(request, context.config.max_body_bytes), AnthropicMessagesRequest)
    spec = _spec(body, stream=False, max_tokens=1)
    spec.tool_choice = ToolChoice(mode="auto") if spec.tool_choice.mode != "none" else spec.tool_choice
    prepared = prepare_spec(context.node, spec, context.config.max_output_tokens)
    renderer = MessagesRenderer(prepared)
    response = await run_generation(request, context, prepared, renderer)
    if response.status_code != 200:
        return response
    return json_response({"input_tokens": renderer.usage_in})
