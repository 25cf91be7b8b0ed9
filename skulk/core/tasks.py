"""Generation requests and their results: what a task asks for and what comes back.

These records cross every layer: the API builds ``GenerationParams`` from an
OpenAI request, the master indexes a ``Task`` carrying them, the runner
generates, and ``TokenChunk`` records travel back on the data topic (never
through the ordered event log) to the node that accepted the request.
"""

from __future__ import annotations

import math
from typing import Literal

from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, TaskId
from skulk.core.records import Record

__all__ = [
    "ToolCall",
    "ToolSpec",
    "ChatMessage",
    "ResponseFormat",
    "ToolChoice",
    "GenerationParams",
    "ToolCallDelta",
    "TopLogprob",
    "TokenLogprob",
    "Usage",
    "GenerationStats",
    "ChunkError",
    "FinishReason",
    "TokenChunk",
    "TaskKind",
    "Task",
]

FinishReason = Literal["stop", "length", "cancelled", "error", "tool_calls"]
TaskKind = Literal["chat", "completion"]
# How a reply is shaped: "text" (free), "json_object" (any JSON object), "json_schema" (``schema``).
ResponseFormatType = Literal["text", "json_object", "json_schema"]
# tool_choice: "none", "auto", "required", or "function" (``ToolChoice.name`` names it).
ToolChoiceMode = Literal["none", "auto", "required", "function"]


class ToolCall(Record, frozen=True, kw_only=True):
    """A function call: in a conversation's history, or parsed from generated text.

    ``arguments`` is JSON text (an object), as every dialect carries it.
    """

    id: str
    name: str
    arguments: str = "{}"


class ToolSpec(Record, frozen=True, kw_only=True):
    """A function the model may call; ``parameters`` is a JSON Schema as JSON text."""

    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'
    # Strict (OpenAI ``strict: true``): forced calls follow the schema exactly; always true here,
    # since a forced call is grammar-constrained; kept so a dialect can round-trip it.
    strict: bool = False


class ChatMessage(Record, frozen=True, kw_only=True):
    """One turn of a conversation, in the OpenAI shape every dialect is translated to.

    ``tool_calls`` are an assistant turn's calls; ``tool_call_id`` (and ``name``)
    tie a ``tool`` turn's result to its call; ``reasoning`` is an assistant
    turn's earlier reasoning text, for templates that render it.
    """

    role: str
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning: str | None = None


class ResponseFormat(Record, frozen=True, kw_only=True):
    """Structured output: ``schema`` (JSON text) is set exactly for ``json_schema``."""

    type: ResponseFormatType = "text"
    schema: str | None = None
    name: str | None = None
    strict: bool = False


class ToolChoice(Record, frozen=True, kw_only=True):
    mode: ToolChoiceMode = "auto"
    name: str | None = None


class GenerationParams(Record, frozen=True, kw_only=True):
    """Sampling and shaping knobs, named after the OpenAI request fields.

    ``max_tokens`` None means "as many as fit": the runner clamps it to what is
    left of the instance's context ceiling (and the node's default output cap),
    ending with ``finish_reason="length"``.
    """

    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    # Agents: tools the model may call, how it must (``tool_choice``), structured output,
    # and the reasoning knobs a chat template may honour (None: the template's default).
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    response_format: ResponseFormat = ResponseFormat()
    enable_thinking: bool | None = None
    reasoning_effort: str | None = None
    # The model's chat formats (from its card; "" lets the runner detect them from the template).
    tool_format: str = ""
    reasoning_format: str = ""

    def problem(self) -> str | None:
        """Why these parameters cannot be run (None when they can).

        The master checks this before indexing a task, so nothing that a
        runner (or the wire codec: msgpack integers are 64-bit) could not
        handle ever takes an index, whatever the API in front let through.
        """
        if self.messages is None and self.prompt is None:
            return "a task needs messages or a prompt"
        if self.messages is not None and not self.messages:
            return "messages must not be empty"
        if self.max_tokens is not None and not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            return f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}"
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            return "seed must fit in 64 bits"
        if not 0 <= self.top_k <= MAX_TOKENS_LIMIT:
            return f"top_k must be between 0 and {MAX_TOKENS_LIMIT}"
        if not 0 <= self.top_logprobs <= 20:
            return "top_logprobs must be between 0 and 20"
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature >= 0):
            return "temperature must be a finite number >= 0"
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            return "top_p must be in (0, 1]"
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            return "min_p must be in [0, 1]"
        if self.repetition_penalty is not None and not (
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0
        ):
            return "repetition_penalty must be a finite number > 0"
        if len(self.stop) > MAX_STOP_SEQUENCES:
            return f"at most {MAX_STOP_SEQUENCES} stop sequences"
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            return "tool names must be unique"
        choice = self.tool_choice
        if (choice.mode == "function") != (choice.name is not None):
            return "tool_choice names a function exactly when its mode is 'function'"
        if choice.mode == "function" and choice.name not in names:
            return f"tool_choice names {choice.name!r}, which is not among the tools"
        if choice.mode == "required" and not self.tools:
            return "tool_choice 'required' needs at least one tool"
        if (self.response_format.type == "json_schema") != (self.response_format.schema is not None):
            return "response_format carries a schema exactly when its type is json_schema"
        return None


MAX_TOKENS_LIMIT = 2**31 - 1
MAX_STOP_SEQUENCES = 16


class TopLogprob(Record, frozen=True, kw_only=True):
    token: str
    logprob: float


class TokenLogprob(Record, frozen=True, kw_only=True):
    token: str
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()


class Usage(Record, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerationStats(Record, frozen=True, kw_only=True):
    prompt_tps: float
    generation_tps: float
    prompt_tokens: int
    generation_tokens: int
    # Speculative decoding: share of drafted tokens the target accepted (None: not speculating).
    acceptance_rate: float | None = None
    draft_depth: int | None = None
    # Prompt tokens whose KV came from the runner's prefix cache (not prefilled again).
    cached_tokens: int = 0


class ToolCallDelta(Record, frozen=True, kw_only=True):
    """A tool call the runner parsed out of the generated text (sent whole, once)."""

    index: int
    id: str
    name: str
    arguments: str


class ChunkError(Record, frozen=True, kw_only=True):
    """An OpenAI-style error carried in-band on a stream."""

    message: str
    type: str = "server_error"
    code: str | None = None
    # Seconds after which a retry may succeed (503 ``kv_budget_exhausted``); the API's Retry-After.
    retry_after_s: int | None = None


class TokenChunk(Record, frozen=True, kw_only=True):
    """One step of output for one request.

    ``seq`` counts chunks of the request from 0 so a receiver can drop
    duplicates and notice gaps. The last chunk of a request has a
    ``finish_reason``; it may carry ``usage`` and ``stats`` and, on failure,
    ``error``. The runner has already split the text: ``text`` is the reply's
    content, ``reasoning`` its reasoning (``<think>``, harmony analysis), and
    ``tool_calls`` the calls parsed out of it; ``finish_reason`` is
    ``"tool_calls"`` when the reply ended by calling tools.
    """

    command_id: CommandId
    task_id: TaskId
    seq: int
    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    stats: GenerationStats | None = None
    error: ChunkError | None = None


class Task(Record, frozen=True, kw_only=True):
    """A request the master accepted and assigned to an instance."""

    task_id: TaskId
    command_id: CommandId
    origin: NodeId
    instance_id: InstanceId
    model_id: ModelId
    kind: TaskKind
    params: GenerationParams
    # "pending" until the runner starts it, then "running"; "failed" before deletion.
    status: str = "pending"
    error_message: str | None = None
