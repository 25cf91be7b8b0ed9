"""Generation requests and their results: what a task asks for and what comes back.

These records cross every layer: the API builds ``GenerationParams`` from an
OpenAI request, the master indexes a ``Task`` carrying them, the runner
generates, and ``TokenChunk`` records travel back on the data topic (never
through the ordered event log) to the node that accepted the request.
"""

from __future__ import annotations

from typing import Literal

from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, TaskId
from skulk.core.records import Record

__all__ = [
    "ChatMessage",
    "GenerationParams",
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

FinishReason = Literal["stop", "length", "cancelled", "error"]
TaskKind = Literal["chat", "completion"]


class ChatMessage(Record, frozen=True, kw_only=True):
    role: str
    content: str


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


class ChunkError(Record, frozen=True, kw_only=True):
    """An OpenAI-style error carried in-band on a stream."""

    message: str
    type: str = "server_error"
    code: str | None = None


class TokenChunk(Record, frozen=True, kw_only=True):
    """One step of output for one request.

    ``seq`` counts chunks of the request from 0 so a receiver can drop
    duplicates and notice gaps. The last chunk of a request has a
    ``finish_reason``; it may carry ``usage`` and ``stats`` and, on failure,
    ``error``.
    """

    command_id: CommandId
    task_id: TaskId
    seq: int
    text: str = ""
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
