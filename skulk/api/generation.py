"""OpenAI requests in, ``SubmitTask`` out; ``TokenChunk`` records in, OpenAI responses out.

Theory of operation
-------------------
``prepare_completion`` (and, for chats of every dialect, ``skulk.api.agent``) validate what the typed decode
cannot (roles, empty content, conflicting fields), find the instances that
could serve the model in the node's replicated state, run context admission
against their ceiling (DESIGN.md section 2: an explicit ``max_tokens`` that
cannot fit is refused here with 400, before anything is dispatched) and build
the ``SubmitTask``. Nothing reaches the node until a request has passed.

``Renderer`` turns the node's ``TokenChunk`` stream into OpenAI chunks (chat
or text completion), and accumulates the non-streamed response. A chunk with
an ``error`` becomes an in-band error event when streaming (the first event,
for a runner's context refusal) or an HTTP error otherwise. The stream always
ends with ``data: [DONE]``; if the node's stream ends without a final chunk
(a request abandoned through ``/v1/cancel``) it ends as cancelled, never by
hanging.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from skulk.api.errors import ApiError, error_body, status_for_code
from skulk.api.port import NodePort, RequestStream
from skulk.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    FunctionCallOut,
    GenerationStatsOut,
    PromptTokensDetails,
    ToolCallChunkOut,
    ToolCallOut,
    TokenLogprobOut,
    TopLogprobOut,
    UsageOut,
)
from skulk.api.sse import DONE, comment, data_event, json_text
from skulk.core.admission import Refused, admit
from skulk.core.commands import CommandResult, SubmitTask
from skulk.core.ids import CommandId, ModelId
from skulk.core.instances import Instance
from skulk.core.tasks import GenerationParams, GenerationStats, TaskKind, TokenChunk, TokenLogprob

__all__ = [
    "Prepared",
    "check_model",
    "admit_request",
    "prepare_completion",
    "instances_for",
    "raise_for_result",
    "Renderer",
    "stream_events",
    "collect",
    "chunk_error",
    "stats_comment",
]


@dataclass(frozen=True)
class Prepared:
    """A validated request: the command to submit and how to render its answer."""

    command: SubmitTask
    model: str
    kind: TaskKind
    stream: bool
    include_usage: bool
    want_logprobs: bool


def instances_for(node: NodePort, model: str) -> list[Instance]:
    """Instances of ``model`` in the node's replicated state, by instance id."""
    state = node.state
    return [state.instances[i] for i in sorted(state.instances) if state.instances[i].shard_assignments.model_id == model]


def check_model(node: NodePort, model: str) -> list[Instance]:
    if not model.strip():
        raise ApiError(400, "model must name a model (GET /v1/models lists them)", code="invalid_value", param="model")
    found = instances_for(node, model)
    if not found and model not in node.cards:
        raise ApiError(
            404,
            f"The model `{model}` does not exist on this cluster: no model card and no placed instance "
            "has that id (GET /v1/models lists the models)",
            code="model_not_found",
            param="model",
        )
    return found


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    # The schema already refuses empty stop strings and over-long lists.
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def admit_request(instances: list[Instance], max_tokens: int | None, param: str, default_max_tokens: int) -> None:
    """Refuse an explicit ``max_tokens`` that no instance of the model can hold (400)."""
    ceilings = [inst.context_ceiling for inst in instances if inst.context_ceiling > 0]
    if max_tokens is None or not ceilings:
        return  # omitted max_tokens is clamped by the runner; unknown ceiling: the runner decides
    # The master picks the instance; refuse only what none of them can serve (they
    # usually share one ceiling; if not, the runner's own refusal arrives in-band).
    decision = admit(prompt_tokens=0, max_tokens=max_tokens, ceiling=max(ceilings), default_max_tokens=default_max_tokens)
    if isinstance(decision, Refused):
        # The core words it for max_tokens; name the field the client actually sent.
        message = decision.message.replace("max_tokens", param) if param != "max_tokens" else decision.message
        raise ApiError(400, message, code=decision.code, param=param, type=decision.type)


def prepare_completion(node: NodePort, body: CompletionRequest, default_max_tokens: int) -> Prepared:
    """Validate a text-completion request and build its ``SubmitTask``."""
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    if body.echo:
        raise ApiError(400, "echo is not supported", code="unsupported_value", param="echo")
    stop = _stop(body.stop)
    instances = check_model(node, body.model)
    admit_request(instances, body.max_tokens, "max_tokens", default_max_tokens)
    params = GenerationParams(
        prompt=prompt,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        seed=body.seed,
        stop=stop,
        repetition_penalty=body.repetition_penalty,
        logprobs=body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
    )
    command = SubmitTask(command_id=node.new_command_id(), model_id=ModelId(body.model), kind="completion", params=params)
    return Prepared(
        command=command,
        model=body.model,
        kind="completion",
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        want_logprobs=body.logprobs is not None,
    )


def raise_for_result(result: CommandResult) -> None:
    """Turn a rejected (or still pending) command result into the matching ``ApiError``."""
    if result.status == "accepted":
        return
    code = result.code or ("unavailable" if result.status == "pending" else None)
    message = result.message or f"the cluster rejected the request ({code or 'no reason given'})"
    raise ApiError.from_code(code, message)


# --- rendering ------------------------------------------------------------------------------


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def _chat_logprobs(items: tuple[TokenLogprob, ...]) -> list[TokenLogprobOut]:
    return [
        TokenLogprobOut(
            token=lp.token,
            logprob=lp.logprob,
            bytes=_token_bytes(lp.token),
            top_logprobs=[TopLogprobOut(token=t.token, logprob=t.logprob, bytes=_token_bytes(t.token)) for t in lp.top_logprobs],
        )
        for lp in items
    ]


def stats_comment(stats: GenerationStats) -> bytes:
    """The ``: generation_stats {...}`` comment line."""
    out = GenerationStatsOut(
        prompt_tps=round(stats.prompt_tps, 3),
        generation_tps=round(stats.generation_tps, 3),
        prompt_tokens=stats.prompt_tokens,
        generation_tokens=stats.generation_tokens,
        acceptance_rate=stats.acceptance_rate,
        draft_depth=stats.draft_depth,
        cached_tokens=stats.cached_tokens,
    )
    return comment("generation_stats " + json_text(out))


def _usage(chunk: TokenChunk) -> UsageOut | None:
    cached = chunk.stats.cached_tokens if chunk.stats is not None else 0
    details = PromptTokensDetails(cached_tokens=cached) if cached > 0 else None
    if chunk.usage is not None:
        u = chunk.usage
        return UsageOut(
            prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens,
            prompt_tokens_details=details,
        )  # fmt: skip
    if chunk.stats is not None:
        s = chunk.stats
        return UsageOut(prompt_tokens=s.prompt_tokens, completion_tokens=s.generation_tokens, total_tokens=s.prompt_tokens + s.generation_tokens)
    return None


def chunk_error(chunk: TokenChunk) -> ApiError:
    """The HTTP error for a chunk that ended a request with an error (non-streamed requests)."""
    err = chunk.error
    if err is None:
        return ApiError(500, "the request ended with an error but no description", code="internal_error")
    default = 400 if err.type == "invalid_request_error" else 500
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s is not None else None
    return ApiError(status_for_code(err.code, default), err.message, code=err.code, type=err.type, headers=headers)


@dataclass
class Renderer:
    """Renders one request's chunks as OpenAI objects; keeps the running totals."""

    prepared: Prepared
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[ToolCallOut] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text_offset: int = 0

    @property
    def response_id(self) -> str:
        prefix = "chatcmpl-" if self.prepared.kind == "chat" else "cmpl-"
        return prefix + self.prepared.command.command_id

    def _chat_chunk(self, delta: Delta, *, logprobs: ChoiceLogprobs | None = None, finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.response_id,
            created=self.created,
            model=self.prepared.model,
            choices=[ChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish)],
        )

    def _completion_chunk(self, text: str, *, logprobs: CompletionLogprobs | None = None, finish: str | None = None) -> Completion:
        return Completion(
            id=self.response_id,
            created=self.created,
            model=self.prepared.model,
            choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish)],
        )

    def _completion_logprobs(self, items: tuple[TokenLogprob, ...]) -> CompletionLogprobs:
        offsets: list[int] = []
        for lp in items:
            offsets.append(self.text_offset)
            self.text_offset += len(lp.token)
        return CompletionLogprobs(
            tokens=[lp.token for lp in items],
            token_logprobs=[lp.logprob for lp in items],
            top_logprobs=[{t.token: t.logprob for t in lp.top_logprobs} for lp in items],
            text_offset=offsets,
        )

    def opening(self) -> list[bytes]:
        """Events before any token: the command id comment, and the chat role delta."""
        events = [comment(f"command_id {self.prepared.command.command_id}")]
        if self.prepared.kind == "chat":
            events.append(data_event(self._chat_chunk(Delta(role="assistant", content=""))))
        return events

    def render(self, chunk: TokenChunk) -> list[bytes]:
        """SSE events for one chunk (empty when it carries nothing to show)."""
        if chunk.error is not None:
            err = chunk.error
            return [data_event(error_body(err.message, type=err.type, code=err.code))]
        items = chunk.logprobs if (self.prepared.want_logprobs and chunk.logprobs) else None
        events: list[bytes] = []
        if chunk.text or chunk.reasoning or chunk.tool_calls or items:
            if self.prepared.kind == "chat":
                lp = ChoiceLogprobs(content=_chat_logprobs(items)) if items else None
                calls = [
                    ToolCallChunkOut(index=c.index, id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                    for c in chunk.tool_calls
                ]
                delta = Delta(
                    content=chunk.text if (chunk.text or items) else None,
                    reasoning_content=chunk.reasoning or None,
                    tool_calls=calls or None,
                )
                events.append(data_event(self._chat_chunk(delta, logprobs=lp)))
            else:
                lp2 = self._completion_logprobs(items) if items else None
                events.append(data_event(self._completion_chunk(chunk.text, logprobs=lp2)))
        if chunk.finish_reason is not None:
            # OpenAI has no "cancelled"; it is passed through so a client can tell it from "stop".
            finish = chunk.finish_reason
            if self.prepared.kind == "chat":
                events.append(data_event(self._chat_chunk(Delta(), finish=finish)))
            else:
                events.append(data_event(self._completion_chunk("", finish=finish)))
            usage = _usage(chunk)
            if self.prepared.include_usage and usage is not None:
                cls = ChatCompletionChunk if self.prepared.kind == "chat" else Completion
                events.append(data_event(cls(id=self.response_id, created=self.created, model=self.prepared.model, choices=[], usage=usage)))
            if chunk.stats is not None:
                events.append(stats_comment(chunk.stats))
        return events

    def cancelled(self) -> list[bytes]:
        """Closing events for a stream the node closed without a final chunk (cancelled)."""
        if self.prepared.kind == "chat":
            return [data_event(self._chat_chunk(Delta(), finish="cancelled"))]
        return [data_event(self._completion_chunk("", finish="cancelled"))]

    def lost(self) -> list[bytes]:
        """Closing events for a stream the node lost (no final chunk, not cancelled)."""
        return [
            data_event(
                error_body(
                    "the node closed this request's stream without a final chunk; retry the request",
                    type="server_error",
                    code="stream_lost",
                )
            )
        ]

    def closing(self) -> list[bytes]:
        """The stream's last events."""
        return [DONE]

    def accumulate(self, chunk: TokenChunk) -> None:
        self.text.append(chunk.text)
        self.reasoning.append(chunk.reasoning)
        for c in chunk.tool_calls:
            self.calls.append(ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)))
        if chunk.logprobs:
            self.logprobs.extend(chunk.logprobs)

    def final(self, last: TokenChunk | None, finish: str) -> ChatCompletion | Completion:
        """The non-streamed response once the request ended with ``finish``."""
        text = "".join(self.text)
        usage = _usage(last) if last is not None else None
        if self.prepared.kind == "chat":
            lp = ChoiceLogprobs(content=_chat_logprobs(tuple(self.logprobs))) if self.prepared.want_logprobs else None
            reasoning = "".join(self.reasoning)
            message = AssistantMessage(
                role="assistant",
                # OpenAI: content is null when the reply is only tool calls.
                content=None if (self.calls and not text) else text,
                reasoning_content=reasoning or None,
                tool_calls=list(self.calls) or None,
            )
            return ChatCompletion(
                id=self.response_id,
                created=self.created,
                model=self.prepared.model,
                choices=[ChatChoice(message=message, logprobs=lp, finish_reason=finish)],
                usage=usage,
            )
        clp = self._completion_logprobs(tuple(self.logprobs)) if self.prepared.want_logprobs else None
        return Completion(
            id=self.response_id,
            created=self.created,
            model=self.prepared.model,
            choices=[CompletionChoice(text=text, logprobs=clp, finish_reason=finish)],
            usage=usage,
        )


async def stream_events(
    renderer: Any,
    stream: RequestStream,
    *,
    abandon: Callable[[CommandId], None],
    was_cancelled: Callable[[CommandId], bool],
    on_text: Callable[[int], None] | None = None,
) -> AsyncIterator[bytes]:
    """The events of one accepted request; abandons it if the consumer stops early.

    ``renderer`` is any dialect's renderer: ``opening()``, ``render(chunk)``,
    ``cancelled()``, ``lost()`` and ``closing()`` each return framed events.
    Invariants: the last events are ``renderer.closing()`` whenever the generator runs to
    its end; if it is closed or cancelled before the node's final chunk,
    ``abandon(command_id)`` is called exactly once.
    """
    command_id = renderer.prepared.command.command_id
    ended = False
    try:
        for event in renderer.opening():
            yield event
        async for chunk in stream:
            if on_text is not None and (chunk.text or chunk.reasoning or chunk.tool_calls):
                on_text(len(chunk.token_ids))
            events = renderer.render(chunk)
            if chunk.finish_reason is not None or chunk.error is not None:
                ended = True
            for event in events:
                yield event
            if ended:
                break
        if not ended:
            ended = True  # the node closed the stream: nothing left to abandon
            for event in renderer.cancelled() if was_cancelled(command_id) else renderer.lost():
                yield event
        for event in renderer.closing():
            yield event
    finally:
        if not ended:
            abandon(command_id)
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # noqa: BLE001 - closing a finished stream must not mask the real outcome
                pass


async def collect(
    renderer: Any,
    stream: RequestStream,
    *,
    abandon: Callable[[CommandId], None],
    was_cancelled: Callable[[CommandId], bool],
) -> Any:
    """Run one accepted request to its end and build the non-streamed response.

    Raises ``ApiError`` when the request ended with an error. If cancelled
    (the client left) before the final chunk, abandons the request.
    """
    command_id = renderer.prepared.command.command_id
    ended = False
    try:
        async for chunk in stream:
            if chunk.error is not None:
                ended = True
                raise chunk_error(chunk)
            renderer.accumulate(chunk)
            if chunk.finish_reason is not None:
                ended = True
                return renderer.final(chunk, chunk.finish_reason)
        ended = True
        if was_cancelled(command_id):
            return renderer.final(None, "cancelled")
        raise ApiError.from_code("stream_lost", "the node closed this request's stream without a final chunk; retry the request")
    finally:
        if not ended:
            abandon(command_id)


