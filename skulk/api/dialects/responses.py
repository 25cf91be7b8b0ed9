"""OpenAI Responses: ``POST /v1/responses``, non-streamed and streamed.

Translation (onto ``skulk.api.agent.ChatSpec``): ``instructions`` is the first
system turn; ``input`` is a string (one user turn) or items: messages
(``input_text``/``output_text`` parts), ``function_call`` items (an assistant
turn's calls) and ``function_call_output`` items (``tool`` turns); tools are
Responses' flat function tools; ``text.format`` is ``response_format``;
``reasoning.effort`` is ``reasoning_effort``.

Skulk keeps no responses: ``previous_response_id`` and ``background`` are
refused (400 naming them), ``store`` is accepted and ignored (nothing is
stored, so nothing can be retrieved later; send the whole conversation as
``input``). Output items: ``reasoning`` (its ``content``), ``message``
(``output_text``) and one ``function_call`` per call. Errors use OpenAI's
envelope, as on every ``/v1`` endpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response

from skulk.api.agent import ChatSpec, check_schema, history_call, prepare_spec, tool_spec
from skulk.api.body import decode_body, read_body
from skulk.api.appstate import app_state
from skulk.api.dialects.blocks import BlockRenderer
from skulk.api.errors import ApiError
from skulk.api.generation import Prepared
from skulk.api.openai_routes import run_generation
from skulk.core.tasks import ChatMessage, ChunkError, ResponseFormat, TokenChunk, ToolCall, ToolCallDelta, ToolChoice, ToolChoiceMode

__all__ = ["responses", "ResponsesRequest"]

_ENCODER = msgspec.json.Encoder()


class _Req(msgspec.Struct, frozen=True, kw_only=True):
    pass


class ResponsesFunctionTool(_Req, frozen=True, kw_only=True):
    type: Literal["function"]
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_.:-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesNamedFunctionChoice(_Req, frozen=True, kw_only=True):
    type: Literal["function"]
    name: str


class ResponsesTextFormat(_Req, frozen=True, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class ResponsesTextConfig(_Req, frozen=True, kw_only=True):
    format: ResponsesTextFormat | None = None


class ResponsesReasoningConfig(_Req, frozen=True, kw_only=True):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None


class ResponsesRequest(_Req, frozen=True, kw_only=True):
    model: str
    input: str | Annotated[list[dict[str, Any]], Meta(min_length=1, max_length=4096)]
    instructions: str | None = None
    stream: bool = False
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    tools: Annotated[list[ResponsesFunctionTool], Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: ResponsesTextConfig | None = None
    reasoning: ResponsesReasoningConfig | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None


def _content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{param} must be text or a list of text parts", code="invalid_type", param=param)
    parts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(400, f"{param}[{i}]: parts of type {kind!r} are not supported by Skulk (text only)", code="unsupported_value", param=f"{param}[{i}]")
        parts.append(part["text"])
    return "\n".join(parts)


def _messages(body: ResponsesRequest) -> tuple[ChatMessage, ...]:
    out: list[ChatMessage] = []
    if body.instructions:
        out.append(ChatMessage(role="system", content=body.instructions))
    if isinstance(body.input, str):
        if not body.input:
            raise ApiError(400, "input must not be empty", code="invalid_value", param="input")
        out.append(ChatMessage(role="user", content=body.input))
        return tuple(out)
    pending_calls: list[ToolCall] = []

    def flush_calls() -> None:
        if pending_calls:
            out.append(ChatMessage(role="assistant", content="", tool_calls=tuple(pending_calls)))
            pending_calls.clear()

    for i, item in enumerate(body.input):
        param = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise ApiError(400, f"{param} needs call_id and name", code="missing_field", param=param)
            pending_calls.append(history_call(call_id, name, item.get("arguments", "{}"), f"{param}.arguments"))
            continue
        flush_calls()
        if kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise ApiError(400, f"{param}.call_id is required", code="missing_field", param=f"{param}.call_id")
            text = output if isinstance(output, str) else json.dumps(output)
            out.append(ChatMessage(role="tool", content=text, tool_call_id=call_id))
        elif kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ApiError(400, f"{param}.role must be user, assistant, system or developer", code="invalid_value", param=f"{param}.role")
            out.append(ChatMessage(role=role, content=_content_text(item.get("content", ""), f"{param}.content")))
        elif kind == "reasoning":
            continue  # earlier reasoning items are not re-sent to the model (as with OpenAI's stateless use)
        else:
            raise ApiError(400, f"{param}: input items of type {kind!r} are not supported by Skulk", code="unsupported_value", param=f"{param}.type")
    flush_calls()
    if not any(m.role not in ("system", "developer") for m in out):
        raise ApiError(400, "input must hold at least one message", code="invalid_value", param="input")
    return tuple(out)


def _spec(body: ResponsesRequest) -> ChatSpec:
    if body.previous_response_id is not None:
        raise ApiError(400, "previous_response_id is not supported: Skulk keeps no responses; send the conversation as input",
                       code="unsupported_value", param="previous_response_id")
    if body.background:
        raise ApiError(400, "background responses are not supported by Skulk", code="unsupported_value", param="background")
    tools = tuple(tool_spec(t.name, t.description, t.parameters, f"tools[{i}].parameters") for i, t in enumerate(body.tools or ()))
    choice = ToolChoice(mode="auto")
    if isinstance(body.tool_choice, str):
        mode: ToolChoiceMode = body.tool_choice
        choice = ToolChoice(mode=mode)
    elif body.tool_choice is not None:
        choice = ToolChoice(mode="function", name=body.tool_choice.name)
    fmt = ResponseFormat()
    if body.text is not None and body.text.format is not None:
        f = body.text.format
        if f.type == "json_object":
            fmt = ResponseFormat(type="json_object")
        elif f.type == "json_schema":
            if f.schema_ is None:
                raise ApiError(400, "text.format json_schema needs schema", code="missing_field", param="text.format.schema")
            fmt = ResponseFormat(type="json_schema", schema=check_schema(f.schema_, "text.format.schema"), name=f.name, strict=bool(f.strict))
    return ChatSpec(
        model=body.model,
        messages=_messages(body),
        stream=body.stream,
        max_tokens=body.max_output_tokens,
        max_param="max_output_tokens",
        temperature=body.temperature,
        top_p=body.top_p,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        response_format=fmt,
        response_format_param="text.format",
        reasoning_effort=body.reasoning.effort if body.reasoning is not None else None,
    )


def _event(payload: dict[str, Any]) -> bytes:
    return b"event: " + payload["type"].encode() + b"\ndata: " + _ENCODER.encode(payload) + b"\n\n"


@dataclass
class ResponsesRenderer(BlockRenderer):
    """Runner chunks as Responses stream events, or (collected) one response object."""

    REASONING: ClassVar[str] = "reasoning"
    TEXT: ClassVar[str] = "message"

    body: ResponsesRequest
    prepared: Prepared
    created_at: int = field(default_factory=lambda: int(time.time()))
    items: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 0

    @property
    def response_id(self) -> str:
        return "resp_" + self.prepared.command.command_id.replace("-", "")

    def _response(self, status: str, finish: str | None = None) -> dict[str, Any]:
        body = self.body
        out: dict[str, Any] = {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.prepared.model,
            "output": [dict(i) for i in self.items] if status != "in_progress" else [],
            "instructions": body.instructions,
            "tools": [msgspec.to_builtins(t) for t in body.tools or ()],
            "tool_choice": msgspec.to_builtins(body.tool_choice) if body.tool_choice is not None else "auto",
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "max_output_tokens": body.max_output_tokens,
            "previous_response_id": None,
            "text": {"format": {"type": "text"}} if body.text is None else msgspec.to_builtins(body.text),
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "metadata": body.metadata or {},
            "usage": None,
        }
        if status != "in_progress":
            out["usage"] = {
                "input_tokens": self.usage_in,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.usage_out,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.usage_in + self.usage_out,
            }
        return out

    def _ev(self, payload: dict[str, Any]) -> bytes:
        payload["sequence_number"] = self.seq
        self.seq += 1
        return _event(payload)

    def opening(self) -> list[bytes]:
        shell = self._response("in_progress")
        return [self._ev({"type": "response.created", "response": shell}), self._ev({"type": "response.in_progress", "response": shell})]

    def _open(self, kind: str) -> list[bytes]:
        index = len(self.items)
        suffix = f"{self.prepared.command.command_id.replace('-', '')}_{index}"
        if kind == "message":
            item = {"type": "message", "id": "msg_" + suffix, "status": "in_progress", "role": "assistant",
                    "content": [{"type": "output_text", "text": "", "annotations": []}]}
        else:
            item = {"type": "reasoning", "id": "rs_" + suffix, "status": "in_progress", "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}]}
        self.items.append(item)
        events = [self._ev({"type": "response.output_item.added", "output_index": index, "item": _copy(item)})]
        if kind == "message":
            events.append(self._ev({"type": "response.content_part.added", "item_id": item["id"], "output_index": index,
                                    "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}))
        return events

    def _delta(self, kind: str, text: str) -> list[bytes]:
        index = len(self.items) - 1
        item = self.items[index]
        item["content"][0]["text"] += text
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        payload = {"type": name, "item_id": item["id"], "output_index": index, "content_index": 0, "delta": text}
        if kind == "message":
            payload["logprobs"] = []
        return [self._ev(payload)]

    def _end(self, kind: str) -> list[bytes]:
        index = len(self.items) - 1
        item = self.items[index]
        item["status"] = "completed"
        part = item["content"][0]
        text = part["text"]
        events: list[bytes] = []
        if kind == "message":
            events.append(self._ev({"type": "response.output_text.done", "item_id": item["id"], "output_index": index, "content_index": 0, "text": text, "logprobs": []}))
            events.append(self._ev({"type": "response.content_part.done", "item_id": item["id"], "output_index": index, "content_index": 0, "part": dict(part)}))
        else:
            events.append(self._ev({"type": "response.reasoning_text.done", "item_id": item["id"], "output_index": index, "content_index": 0, "text": text}))
        events.append(self._ev({"type": "response.output_item.done", "output_index": index, "item": _copy(item)}))
        return events

    def _tool_call(self, call: ToolCallDelta) -> list[bytes]:
        index = len(self.items)
        item = {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id, "name": call.name,
                "arguments": "", "status": "in_progress"}
        events = [self._ev({"type": "response.output_item.added", "output_index": index, "item": dict(item)})]
        events.append(self._ev({"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": index, "delta": call.arguments}))
        item["arguments"], item["status"] = call.arguments, "completed"
        events.append(self._ev({"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": index,
                                "name": call.name, "arguments": call.arguments}))
        events.append(self._ev({"type": "response.output_item.done", "output_index": index, "item": dict(item)}))
        self.items.append(item)
        return events

    def _error(self, error: ChunkError) -> list[bytes]:
        return [self._ev({"type": "error", "code": error.code, "message": error.message, "param": None})]

    def _finish(self, finish: str) -> list[bytes]:
        events = self._close()
        status = "incomplete" if finish == "length" else "completed"
        name = "response.incomplete" if status == "incomplete" else "response.completed"
        events.append(self._ev({"type": name, "response": self._response(status, finish)}))
        return events

    def lost(self) -> list[bytes]:
        return [self._ev({"type": "error", "code": "stream_lost", "message": "the node lost this request's stream; retry the request", "param": None})]

    def final(self, last: TokenChunk | None, finish: str) -> dict[str, Any]:
        self._close()
        return self._response("incomplete" if finish == "length" else "completed", finish)


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(item))


async def responses(request: Request) -> Response:
    """``POST /v1/responses``."""
    context = app_state(request)
    body = decode_body(await read_body(request, context.config.max_body_bytes), ResponsesRequest)
    prepared = prepare_spec(context.node, _spec(body), context.config.max_output_tokens)
    return await run_generation(request, context, prepared, ResponsesRenderer(body, prepared))

