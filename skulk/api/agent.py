"""The one internal generation request every dialect translates into.

Theory of operation
-------------------
OpenAI chat, OpenAI Responses, Anthropic Messages and Ollama each have their
own wire shapes, but they all ask the same thing of the cluster: generate a
reply to these messages, maybe with tools, maybe in a shape. Each dialect
adapter (``skulk.api.openai_routes``, ``skulk.api.dialects.*``) translates its
request into a ``ChatSpec`` and calls ``prepare_spec``, which does, once for
all of them:

- model lookup and context admission (``skulk.api.generation``);
- tool and schema checks: a tool's ``parameters`` and a response schema must
  compile into a grammar (llguidance, the same library the runner masks
  with), so a bad schema is a 400 naming the field before anything is
  dispatched;
- the model card's chat formats (``[chat]``) copied into the params, so the
  runner parses the reply as the card says.

What comes back is the same ``Prepared`` command the OpenAI path submits;
the dialect's renderer turns the runner's chunks (content, reasoning, tool
calls already separated) into its own stream or response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from skulk.api.errors import ApiError
from skulk.api.generation import Prepared, admit_request, check_model
from skulk.api.port import NodePort
from skulk.core.commands import SubmitTask
from skulk.core.ids import ModelId
from skulk.core.tasks import ChatMessage, GenerationParams, ResponseFormat, ToolCall, ToolChoice, ToolSpec

__all__ = ["ChatSpec", "prepare_spec", "check_schema", "tool_spec", "arguments_object", "history_call", "EMPTY_PARAMETERS"]

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def check_schema(schema: Any, param: str) -> str:
    """``schema`` as JSON text, after checking it compiles into a grammar; 400 naming ``param`` if not."""
    if not isinstance(schema, dict):
        raise ApiError(400, f"{param} must be a JSON Schema object", code="invalid_type", param=param)
    import llguidance

    try:
        text = json.dumps(schema)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text)
        problem = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError, RecursionError) as exc:
        problem = str(exc) or type(exc).__name__
    if problem and not problem.startswith("WARNING"):
        raise ApiError(400, f"{param} is not a JSON Schema Skulk can enforce: {problem}", code="invalid_schema", param=param)
    return text


def tool_spec(name: str, description: str | None, parameters: Any, param: str, *, strict: bool = False) -> ToolSpec:
    """A checked ``ToolSpec``; ``param`` is the path of the tool's parameters in the request."""
    schema = EMPTY_PARAMETERS if parameters is None else parameters
    if isinstance(schema, dict) and schema.get("type", "object") != "object":
        raise ApiError(400, f"{param} must describe an object (type: object)", code="invalid_value", param=param)
    return ToolSpec(name=name, description=description or "", parameters=check_schema(schema, param), strict=strict)


def arguments_object(arguments: Any, param: str) -> str:
    """A call's arguments as JSON object text, from text or an object; 400 naming ``param`` if not an object."""
    value = arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise ApiError(400, f"{param} must be JSON text of an object", code="invalid_value", param=param) from None
    if not isinstance(value, dict):
        raise ApiError(400, f"{param} must be a JSON object", code="invalid_value", param=param)
    return json.dumps(value, ensure_ascii=False)


@dataclass
class ChatSpec:
    """A dialect-neutral chat request (every field already checked by the adapter)."""

    model: str
    messages: tuple[ChatMessage, ...]
    stream: bool = False
    max_tokens: int | None = None
    max_param: str = "max_tokens"
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    tool_choice_param: str = "tool_choice"
    parallel_tool_calls: bool = True
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    response_format_param: str = "response_format"
    enable_thinking: bool | None = None
    reasoning_effort: str | None = None
    include_usage: bool = False


def _check_tools(spec: ChatSpec) -> None:
    names = [t.name for t in spec.tools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ApiError(400, f"tool names must be unique; repeated: {dupes}", code="invalid_value", param="tools")
    choice = spec.tool_choice
    if choice.mode == "function" and choice.name not in names:
        raise ApiError(
            400,
            f"{spec.tool_choice_param} names the function {choice.name!r}, which is not among the tools {names}",
            code="invalid_value",
            param=spec.tool_choice_param,
        )
    if choice.mode == "required" and not spec.tools:
        raise ApiError(400, f"{spec.tool_choice_param} requires a tool call but no tools were given", code="invalid_value", param=spec.tool_choice_param)
    forced = choice.mode in ("required", "function")
    if forced and spec.response_format.type != "text":
        raise ApiError(
            400,
            f"{spec.tool_choice_param} forces a tool call while {spec.response_format_param} constrains the text; send one of them",
            code="invalid_value",
            param=spec.response_format_param,
        )


def prepare_spec(node: NodePort, spec: ChatSpec, default_max_tokens: int) -> Prepared:
    """Check ``spec`` against the cluster and build the command every dialect submits."""
    assert spec.messages, "an adapter never builds a chat without messages"
    _check_tools(spec)
    instances = check_model(node, spec.model)
    admit_request(instances, spec.max_tokens, spec.max_param, default_max_tokens)
    card = node.cards.get(spec.model)
    params = GenerationParams(
        messages=spec.messages,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=1.0 if spec.top_p is None else spec.top_p,
        top_k=spec.top_k or 0,
        min_p=spec.min_p or 0.0,
        seed=spec.seed,
        stop=spec.stop,
        repetition_penalty=spec.repetition_penalty,
        logprobs=spec.logprobs,
        top_logprobs=spec.top_logprobs,
        tools=spec.tools,
        tool_choice=spec.tool_choice,
        parallel_tool_calls=spec.parallel_tool_calls,
        response_format=spec.response_format,
        enable_thinking=spec.enable_thinking,
        reasoning_effort=spec.reasoning_effort,
        tool_format=card.tool_format if card is not None else "",
        reasoning_format=card.reasoning_format if card is not None else "",
    )
    problem = params.problem()
    if problem is not None:
        raise ApiError(400, problem, code="invalid_value")
    command = SubmitTask(command_id=node.new_command_id(), model_id=ModelId(spec.model), kind="chat", params=params)
    return Prepared(
        command=command,
        model=spec.model,
        kind="chat",
        stream=spec.stream,
        include_usage=spec.include_usage,
        want_logprobs=spec.logprobs,
    )


def history_call(call_id: str, name: str, arguments: Any, param: str) -> ToolCall:
    """An earlier call in the history, its arguments checked."""
    return ToolCall(id=call_id, name=name, arguments=arguments_object(arguments, param))
