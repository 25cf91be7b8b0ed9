"""Handlers of the OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Each generation request goes: read the bounded body -> typed decode ->
``prepare_*`` (validation and context admission) -> ``node.open_task`` ->
either an ``EventStreamResponse`` or, non-streamed, the collected response.
A client that leaves, streamed or not, has its request abandoned.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from skulk.api.body import decode_body, read_body
from skulk.api.appstate import AppState, app_state
from skulk.api.errors import ApiError
from skulk.api.generation import Prepared, Renderer, collect, prepare_completion, raise_for_result, stream_events
from skulk.api.openai_chat import prepare_chat
from skulk.api.port import RequestStream
from skulk.api.schemas import ChatCompletionRequest, CompletionRequest, ModelList, ModelObject
from skulk.api.sse import ClientGone, EventStreamResponse, until_disconnect
from skulk.api.wire import json_response

__all__ = ["chat_completions", "completions", "list_models", "get_model", "run_generation", "model_objects"]


async def chat_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``."""
    context = app_state(request)
    body = decode_body(await read_body(request, context.config.max_body_bytes), ChatCompletionRequest)
    prepared = prepare_chat(context.node, body, context.config.max_output_tokens)
    return await _run(request, context, prepared)


async def completions(request: Request) -> Response:
    """``POST /v1/completions``."""
    context = app_state(request)
    body = decode_body(await read_body(request, context.config.max_body_bytes), CompletionRequest)
    prepared = prepare_completion(context.node, body, context.config.max_output_tokens)
    return await _run(request, context, prepared)


async def _run(request: Request, context: AppState, prepared: Prepared) -> Response:
    return await run_generation(request, context, prepared, Renderer(prepared))


async def run_generation(
    request: Request, context: AppState, prepared: Prepared, renderer: Any, *, media_type: str = "text/event-stream"
) -> Response:
    """Submit ``prepared`` and answer with ``renderer``'s stream or its collected response (every dialect)."""
    result, stream = await context.node.open_task(prepared.command)
    raise_for_result(result)
    if stream is None:
        raise ApiError(500, "the node accepted the request but gave no stream", code="internal_error")
    if prepared.stream:
        return EventStreamResponse(_counted(context, renderer, stream), media_type=media_type)
    try:
        response = await until_disconnect(
            request.receive,
            collect(renderer, stream, abandon=context.abandon, was_cancelled=context.was_cancelled),
        )
    except ClientGone:
        # Nobody is listening; the request was abandoned by collect's finally. 499 is
        # what proxies log for "client closed request".
        return Response(status_code=499)
    return json_response(response) if not isinstance(response, Response) else response


async def _counted(context: AppState, renderer: Any, stream: RequestStream) -> AsyncIterator[bytes]:
    metrics = context.metrics
    metrics.streams_active += 1
    metrics.streams_total += 1
    started = time.monotonic()
    first = True

    def on_text(tokens: int) -> None:
        nonlocal first
        metrics.tokens_streamed_total += tokens
        if first:
            first = False
            metrics.observe_ttft(time.monotonic() - started)

    try:
        async for event in stream_events(
            renderer, stream, abandon=context.abandon, was_cancelled=context.was_cancelled, on_text=on_text
        ):
            yield event
    finally:
        metrics.streams_active -= 1


def model_objects(context: AppState) -> list[ModelObject]:
    state = context.node.state
    ceilings: dict[str, int] = {}
    for inst in state.instances.values():
        model = inst.shard_assignments.model_id
        ceilings[model] = max(ceilings.get(model, 0), inst.context_ceiling)
    cards = context.node.cards
    ids = sorted(set(ceilings) | set(cards))
    out = []
    for model_id in ids:
        card = cards.get(model_id)
        placed = model_id in ceilings
        context_length = ceilings[model_id] if placed and ceilings[model_id] > 0 else (card.context_length if card else None)
        out.append(ModelObject(id=model_id, placed=placed, context_length=context_length))
    # Placed models first: they are the ones a chat can use right now.
    out.sort(key=lambda m: (not m.placed, m.id))
    return out


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: every model this node knows, placed ones first."""
    return json_response(ModelList(data=model_objects(app_state(request))))


async def get_model(request: Request) -> Response:
    """``GET /v1/models/{model_id}``."""
    model_id = request.path_params["model_id"]
    for model in model_objects(app_state(request)):
        if model.id == model_id:
            return json_response(model)
    raise ApiError(404, f"The model `{model_id}` does not exist on this cluster", code="model_not_found", param="model")
