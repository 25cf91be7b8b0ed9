"""OpenAI chat completions onto the one internal request (``skulk.api.agent.ChatSpec``).

What this adapter checks beyond the typed decode: message shapes (an
assistant turn may carry ``tool_calls`` and null content; a ``tool`` turn
needs ``tool_call_id``), tools and ``tool_choice``, ``response_format``, the
reasoning knobs, and the OpenAI fields Skulk does not serve, each refused by
name unless it holds its neutral value (docs/api.md, "Fields Skulk does not
serve").
"""

from __future__ import annotations

from typing import Any

from skulk.api.agent import ChatSpec, check_schema, history_call, prepare_spec, tool_spec
from skulk.api.errors import ApiError
from skulk.api.generation import Prepared
from skulk.api.port import NodePort
from skulk.api.schemas import ChatCompletionRequest, ChatMessageIn
from skulk.core.tasks import ChatMessage, ResponseFormat, ToolChoice

__all__ = ["prepare_chat", "chat_message", "refuse_unserved"]


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param} is not supported by Skulk: {why}", code="unsupported_value", param=param)


def refuse_unserved(body: ChatCompletionRequest) -> None:
    """Refuse OpenAI fields Skulk does not serve, unless they hold their neutral value."""
    if body.frequency_penalty not in (None, 0, 0.0):
        raise _unsupported("frequency_penalty", "use repetition_penalty")
    if body.presence_penalty not in (None, 0, 0.0):
        raise _unsupported("presence_penalty", "use repetition_penalty")
    if body.logit_bias:
        raise _unsupported("logit_bias", "biasing individual tokens is not served")
    if body.functions is not None or body.function_call is not None:
        param = "functions" if body.functions is not None else "function_call"
        raise _unsupported(param, "the deprecated functions API is not served; use tools and tool_choice")
    if body.modalities is not None and body.modalities != ["text"]:
        raise _unsupported("modalities", "only text output is served")
    if body.audio is not None:
        raise _unsupported("audio", "only text output is served")
    if body.prediction is not None:
        raise _unsupported("prediction", "predicted outputs are not served")
    if body.web_search_options is not None:
        raise _unsupported("web_search_options", "Skulk has no web search")
    if body.store:
        raise _unsupported("store", "Skulk does not store chat completions")
    # Accepted and ignored (documented): user, metadata and service_tier describe the
    # caller or the billing tier; they never change what is generated.


def _text(content: str | list[Any] | None) -> str | None:
    if content is None or isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


def chat_message(message: ChatMessageIn, i: int) -> ChatMessage:
    """One OpenAI message in the internal shape; 400 naming ``messages[i]...`` when malformed."""
    text = _text(message.content)
    calls = ()
    if message.tool_calls:
        if message.role != "assistant":
            raise ApiError(400, f"only assistant messages carry tool_calls (messages[{i}] is {message.role})", code="invalid_value", param=f"messages[{i}].tool_calls")
        calls = tuple(
            history_call(c.id, c.function.name, c.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")
            for j, c in enumerate(message.tool_calls)
        )
    elif text is None:
        # Absent and null read the same after decoding; both mean "no text" here.
        raise ApiError(
            400,
            f"invalid request at `messages[{i}].content`: Expected `str | array` (null only for an assistant turn with tool_calls), got `null`",
            code="invalid_type",
            param=f"messages[{i}].content",
        )
    elif text == "":
        raise ApiError(400, f"invalid request at `messages[{i}].content`: Expected `str` of length >= 1", code="invalid_value", param=f"messages[{i}].content")
    if message.role == "tool" and not message.tool_call_id:
        raise ApiError(400, f"a tool message needs tool_call_id (messages[{i}])", code="missing_field", param=f"messages[{i}].tool_call_id")
    return ChatMessage(
        role=message.role,
        content=text or "",
        name=message.name,
        tool_calls=calls,
        tool_call_id=message.tool_call_id,
        reasoning=message.reasoning_content,
    )


def _tool_choice(body: ChatCompletionRequest) -> ToolChoice:
    choice = body.tool_choice
    if choice is None:
        return ToolChoice(mode="auto")
    if isinstance(choice, str):
        return ToolChoice(mode=choice)
    return ToolChoice(mode="function", name=choice.function.name)


def _response_format(body: ChatCompletionRequest) -> ResponseFormat:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return ResponseFormat()
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    spec = fmt.json_schema
    if spec is None or spec.schema_ is None:
        raise ApiError(400, "response_format json_schema needs json_schema.schema", code="missing_field", param="response_format.json_schema.schema")
    schema = check_schema(spec.schema_, "response_format.json_schema.schema")
    return ResponseFormat(type="json_schema", schema=schema, name=spec.name, strict=bool(spec.strict))


def _enable_thinking(body: ChatCompletionRequest) -> bool | None:
    kwargs = body.chat_template_kwargs or {}
    unknown = sorted(set(kwargs) - {"enable_thinking"})
    if unknown:
        raise _unsupported(f"chat_template_kwargs.{unknown[0]}", "only enable_thinking is passed to chat templates")
    value = kwargs.get("enable_thinking", body.enable_thinking)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, "enable_thinking must be a boolean", code="invalid_type", param="chat_template_kwargs.enable_thinking")
    return value


def prepare_chat(node: NodePort, body: ChatCompletionRequest, default_max_tokens: int) -> Prepared:
    """Validate an OpenAI chat request and build its command; raises ``ApiError`` when invalid."""
    refuse_unserved(body)
    messages = tuple(chat_message(m, i) for i, m in enumerate(body.messages))
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs requires logprobs: true", code="invalid_value", param="top_logprobs")
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
        raise ApiError(
            400,
            f"max_tokens ({body.max_tokens}) and max_completion_tokens ({body.max_completion_tokens}) disagree; send one",
            code="invalid_value",
            param="max_completion_tokens",
        )
    tools = tuple(
        tool_spec(t.function.name, t.function.description, t.function.parameters, f"tools[{i}].function.parameters", strict=bool(t.function.strict))
        for i, t in enumerate(body.tools or ())
    )
    stop = () if body.stop is None else ((body.stop,) if isinstance(body.stop, str) else tuple(body.stop))
    spec = ChatSpec(
        model=body.model,
        messages=messages,
        stream=body.stream,
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        max_param=max_param,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=body.seed,
        stop=stop,
        repetition_penalty=body.repetition_penalty,
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
        tools=tools,
        tool_choice=_tool_choice(body),
        parallel_tool_calls=body.parallel_tool_calls is not False,
        response_format=_response_format(body),
        enable_thinking=_enable_thinking(body),
        reasoning_effort=body.reasoning_effort,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )
    return prepare_spec(node, spec, default_max_tokens)
