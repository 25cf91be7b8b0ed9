"""Request and response records of the HTTP API, typed once for decoding, encoding and OpenAPI.

Theory of operation
-------------------
The OpenAI-compatible records keep OpenAI's snake_case field names; Skulk's
control records keep Skulk's published names (snake_case request bodies such
as ``model_id``, camelCase where the published wire is camelCase, such as
``runtime.masterNodeId``). Requests are decoded straight into these records
by ``skulk.api.body.decode_body`` (unknown fields are ignored, as OpenAI
clients send extras), so the constraints declared here (``Meta(ge=1)``) are
the validation, and ``skulk.api.openapi`` derives the published schema from
the very same types.

Responses that embed replicated-state records (``/state``, previews,
``/instance/{id}``) are encoded with ``skulk.core.codec.to_wire``; the
records below that mention core types exist so the schema describes them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from skulk.core.cards import ModelCard
from skulk.core.instances import Instance
from skulk.core.state import State

__all__ = [
    "ContentPart",
    "FunctionCallIn",
    "ToolCallIn",
    "FunctionDef",
    "ToolIn",
    "NamedFunction",
    "NamedToolChoice",
    "JsonSchemaFormat",
    "ResponseFormatIn",
    "ChatMessageIn",
    "FunctionCallOut",
    "ToolCallOut",
    "ToolCallChunkOut",
    "StreamOptions",
    "ChatCompletionRequest",
    "CompletionRequest",
    "TopLogprobOut",
    "TokenLogprobOut",
    "ChoiceLogprobs",
    "AssistantMessage",
    "ChatChoice",
    "UsageOut",
    "ChatCompletion",
    "Delta",
    "ChunkChoice",
    "ChatCompletionChunk",
    "CompletionLogprobs",
    "CompletionChoice",
    "Completion",
    "ModelObject",
    "ModelList",
    "GenerationStatsOut",
    "PlaceInstanceRequest",
    "PlaceInstanceResponse",
    "DeleteInstanceResponse",
    "CancelResponse",
    "HealthResponse",
    "Preview",
    "PreviewsResponse",
    "ModelsResponse",
    "RuntimeInfo",
    "NodeDiagnostics",
    "StateResponse",
    "InstanceResponse",
]


# Generous but finite: every list a client sends is bounded.
_MAX_MESSAGES = 4_096
_MAX_STOP = 16


class _Req(msgspec.Struct, frozen=True, kw_only=True):
    """A request record: unknown fields are ignored (OpenAI clients send extras)."""


class _Resp(msgspec.Struct, frozen=True, kw_only=True):
    """A response record; field order is the order on the wire."""


# --- OpenAI-compatible requests ---------------------------------------------------------


class ContentPart(_Req, frozen=True, kw_only=True):
    """One part of a message's content; only text parts are served."""

    type: Literal["text"]
    text: str


Role = Literal["system", "developer", "user", "assistant", "tool"]
NonEmptyText = Annotated[str, Meta(min_length=1)]


class FunctionCallIn(_Req, frozen=True, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    # JSON text of an object, as OpenAI sends it.
    arguments: str = "{}"


class ToolCallIn(_Req, frozen=True, kw_only=True):
    """An earlier call in an assistant turn of the history."""

    id: Annotated[str, Meta(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCallIn


ToolName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_.:-]{1,64}$", description="letters, digits, _ . : -; 1 to 64")]


class FunctionDef(_Req, frozen=True, kw_only=True):
    name: ToolName
    description: str | None = None
    # A JSON Schema (object) for the arguments; omitted: no arguments.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(_Req, frozen=True, kw_only=True):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Req, frozen=True, kw_only=True):
    name: str


class NamedToolChoice(_Req, frozen=True, kw_only=True):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Req, frozen=True, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    description: str | None = None
    # "schema" on the wire; ``schema`` would shadow a msgspec attribute name in some tools.
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class ResponseFormatIn(_Req, frozen=True, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatMessageIn(_Req, frozen=True, kw_only=True):
    role: Role
    # Text, or text parts (joined with newlines); never empty, except that an assistant
    # turn with tool_calls may have null or empty content.
    content: str | Annotated[list[ContentPart], Meta(min_length=1)] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCallIn], Meta(max_length=128)] | None = None
    tool_call_id: str | None = None
    # An assistant turn's earlier reasoning (rendered by templates that know it).
    reasoning_content: str | None = None


class StreamOptions(_Req, frozen=True, kw_only=True):
    include_usage: bool = False


Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
# Integers must fit the cluster's wire (msgpack: 64 bits). A larger seed or top_k used to pass
# decoding here, reach the master, be indexed into a task, and then fail to serialise: the
# master's disk log degraded, followers never received the event (replication stalled), and
# the request hung. Found by fuzzing a real node (loadtests/fuzz.py, issue 8).
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
TopK = Annotated[int, Meta(ge=0, le=_INT64_MAX)]
Seed = Annotated[int, Meta(ge=_INT64_MIN, le=_INT64_MAX)]
MinP = Annotated[float, Meta(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
Penalty = Annotated[float, Meta(gt=0.0)]
Stop = NonEmptyText | Annotated[list[NonEmptyText], Meta(max_length=_MAX_STOP)]


class ChatCompletionRequest(_Req, frozen=True, kw_only=True):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` wins over ``max_tokens``."""

    model: str
    messages: Annotated[list[ChatMessageIn], Meta(min_length=1, max_length=_MAX_MESSAGES)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    repetition_penalty: Penalty | None = None
    n: Annotated[int, Meta(ge=1, le=1, description="only 1 is served")] | None = None
    user: str | None = None
    tools: Annotated[list[ToolIn], Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormatIn | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # vLLM's convention: keyword arguments for the chat template; only enable_thinking is read.
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    # Defined by OpenAI, not served: refused when set to anything but their neutral value
    # (see docs/api.md, "Fields Skulk does not serve").
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


class CompletionRequest(_Req, frozen=True, kw_only=True):
    """``POST /v1/completions`` (legacy text completion). ``logprobs`` is a count here."""

    model: str
    prompt: NonEmptyText | Annotated[list[NonEmptyText], Meta(min_length=1, max_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    repetition_penalty: Penalty | None = None
    echo: bool = False
    n: Annotated[int, Meta(ge=1, le=1, description="only 1 is served")] | None = None
    user: str | None = None


# --- OpenAI-compatible responses --------------------------------------------------------


class TopLogprobOut(_Resp, frozen=True, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(_Resp, frozen=True, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprobOut] = []


class ChoiceLogprobs(_Resp, frozen=True, kw_only=True):
    content: list[TokenLogprobOut] | None = None


class FunctionCallOut(_Resp, frozen=True, kw_only=True):
    name: str
    arguments: str


class ToolCallOut(_Resp, frozen=True, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ToolCallChunkOut(_Resp, frozen=True, kw_only=True):
    """A streamed tool call: Skulk sends each call whole, in one delta."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(_Resp, frozen=True, kw_only=True, omit_defaults=True):
    # No defaults on role and content: they are always on the wire (content null with calls).
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Resp, frozen=True, kw_only=True):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class PromptTokensDetails(_Resp, frozen=True, kw_only=True):
    """OpenAI's breakdown of the prompt: tokens served from the prefix cache."""

    cached_tokens: int


class UsageOut(_Resp, frozen=True, kw_only=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Present when part of the prompt came from the runner's prefix cache.
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletion(_Resp, frozen=True, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut | None = None
    system_fingerprint: str | None = None


class Delta(_Resp, frozen=True, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallChunkOut] | None = None


class ChunkChoice(_Resp, frozen=True, kw_only=True):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Resp, frozen=True, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageOut | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(_Resp, frozen=True, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Resp, frozen=True, kw_only=True):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(_Resp, frozen=True, kw_only=True):
    """A text completion, and (with ``finish_reason`` null) one streamed chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut | None = None
    system_fingerprint: str | None = None


class ModelObject(_Resp, frozen=True, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "skulk"
    # Skulk extras: is an instance placed, and its context ceiling (largest over instances).
    placed: bool = False
    context_length: int | None = None


class ModelList(_Resp, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class GenerationStatsOut(_Resp, frozen=True, kw_only=True, omit_defaults=True):
    """The body of the ``: generation_stats {...}`` SSE comment line."""

    prompt_tps: float
    generation_tps: float
    prompt_tokens: int
    generation_tokens: int
    acceptance_rate: float | None = None
    draft_depth: int | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


# --- Skulk control ------------------------------------------------------------------------


class PlaceInstanceRequest(_Req, frozen=True, kw_only=True):
    """``POST /place_instance``: place ``model_id`` across the cluster."""

    model_id: str
    sharding: Literal["Pipeline", "Tensor"] = "Pipeline"
    instance_meta: Literal["MlxRing", "MlxJaccl"] = "MlxRing"
    min_nodes: Annotated[int, Meta(ge=1, le=1024)] = 1
    excluded_nodes: Annotated[list[str], Meta(max_length=1024)] = []


class PlaceInstanceResponse(_Resp, frozen=True, kw_only=True):
    message: str
    command_id: str
    model_id: str
    instance_id: str | None = None


class DeleteInstanceResponse(_Resp, frozen=True, kw_only=True):
    message: str
    command_id: str
    instance_id: str


class HealthResponse(_Resp, frozen=True, kw_only=True):
    status: Literal["ok"]
    node_id: str


class CancelResponse(_Resp, frozen=True, kw_only=True):
    message: str
    command_id: str


class Preview(_Resp, frozen=True, kw_only=True):
    """One candidate placement; ``error`` set (and ``instance`` null) when it cannot fit."""

    sharding: Literal["Pipeline", "Tensor"]
    instance_meta: Literal["MlxRing", "MlxJaccl"]
    node_count: int
    error: str | None = None
    # True when the refusal is "not yet known" (telemetry or links pending), not "impossible".
    pending: bool = False
    instance: Instance | None = None
    memory_delta_by_node: dict[str, int] = {}
    # Bytes of model files each node would fetch (from a peer or the hub) before its runner starts.
    transfer_bytes_by_node: dict[str, int] = {}


class PreviewsResponse(_Resp, frozen=True, kw_only=True):
    previews: list[Preview]


class ModelsResponse(_Resp, frozen=True, kw_only=True):
    """``GET /models``: the model cards this node knows (camelCase, as cards are records)."""

    models: list[ModelCard]


class RuntimeInfo(_Resp, frozen=True, kw_only=True, rename="camel"):
    master_node_id: str | None
    node_id: str
    is_master: bool
    friendly_name: str
    skulk_version: str
    session_clock: int | None = None
    last_index: int = -1


class NodeDiagnostics(_Resp, frozen=True, kw_only=True):
    runtime: RuntimeInfo
    runners: list[dict[str, Any]]


# Documentation-only aliases: these are encoded with the core codec (tagged unions).
StateResponse = State
InstanceResponse = Instance
