"""The route table: one row per endpoint, read by the router and by the OpenAPI generator.

Keeping routes as data means the published schema cannot drift from what is
served: ``create_app`` mounts exactly these rows, and ``skulk.api.openapi``
documents exactly these rows, with the request and response types the
handlers decode and encode.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from skulk.api import control, openai_routes, store_routes
from skulk.api.dialects import anthropic, ollama, responses
from skulk.api.schemas import (
    CancelResponse,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DeleteInstanceResponse,
    HealthResponse,
    InstanceResponse,
    ModelList,
    ModelObject,
    ModelsResponse,
    NodeDiagnostics,
    PlaceInstanceRequest,
    PlaceInstanceResponse,
    PreviewsResponse,
    StateResponse,
)

__all__ = ["QueryParam", "Endpoint", "ENDPOINTS", "openapi_path"]

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class QueryParam:
    name: str
    description: str
    required: bool = False
    type: str = "string"


@dataclass(frozen=True)
class Endpoint:
    """One served route.

    ``response`` is the 200 body type (``str`` for a bare JSON string);
    ``response_media`` other than JSON means a text body. ``stream_item`` is the
    type of each SSE ``data:`` event when the request asks for ``stream: true``.
    ``errors`` lists the statuses the handler can answer with an error envelope.
    """

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    request: Any = None
    response: Any = None
    response_media: str = "application/json"
    stream_item: Any = None
    query: tuple[QueryParam, ...] = ()
    errors: tuple[int, ...] = ()
    # The shape of those errors: OpenAI's envelope unless the dialect has its own.
    error_type: Any = None


_GEN_ERRORS = (400, 404, 409, 413, 500, 502, 503)

ENDPOINTS: tuple[Endpoint, ...] = (
    # --- OpenAI-compatible ---
    Endpoint("POST", "/v1/chat/completions", openai_routes.chat_completions, "Create a chat completion (streamed or not)",
             "OpenAI", request=ChatCompletionRequest, response=ChatCompletion, stream_item=ChatCompletionChunk,
             errors=_GEN_ERRORS),
    Endpoint("POST", "/v1/completions", openai_routes.completions, "Create a text completion (streamed or not)",
             "OpenAI", request=CompletionRequest, response=Completion, stream_item=Completion, errors=_GEN_ERRORS),
    Endpoint("GET", "/v1/models", openai_routes.list_models, "List models (placed ones first)", "OpenAI",
             response=ModelList),
    Endpoint("GET", "/v1/models/{model_id:path}", openai_routes.get_model, "Describe one model", "OpenAI",
             response=ModelObject, errors=(404,)),
    Endpoint("POST", "/v1/cancel/{command_id}", control.cancel, "Cancel a generation by its command id", "OpenAI",
             response=CancelResponse, errors=(400, 503)),
    # --- OpenAI Responses, Anthropic Messages, Ollama: thin adapters onto the same generation path ---
    Endpoint("POST", "/v1/responses", responses.responses, "Create a response (OpenAI Responses; streamed or not)",
             "Responses", request=responses.ResponsesRequest, errors=_GEN_ERRORS),
    Endpoint("POST", "/v1/messages", anthropic.messages, "Create a message (Anthropic Messages; SSE or JSON)",
             "Anthropic", request=anthropic.AnthropicMessagesRequest, errors=_GEN_ERRORS,
             error_type=anthropic.AnthropicErrorEnvelope),
    Endpoint("POST", "/v1/messages/count_tokens", anthropic.count_tokens, "Count a message's prompt tokens (Anthropic)",
             "Anthropic", request=anthropic.AnthropicMessagesRequest, errors=_GEN_ERRORS,
             error_type=anthropic.AnthropicErrorEnvelope),
    Endpoint("POST", "/api/chat", ollama.chat, "Chat (Ollama; NDJSON stream unless stream is false)", "Ollama",
             request=ollama.OllamaChatRequest, errors=_GEN_ERRORS, error_type=ollama.OllamaError),
    Endpoint("POST", "/api/generate", ollama.generate, "Generate (Ollama; NDJSON stream unless stream is false)", "Ollama",
             request=ollama.OllamaGenerateRequest, errors=_GEN_ERRORS, error_type=ollama.OllamaError),
    Endpoint("GET", "/api/tags", ollama.tags, "Placed models (Ollama)", "Ollama"),
    Endpoint("POST", "/api/show", ollama.show, "A model's details and capabilities (Ollama)", "Ollama",
             request=ollama.OllamaShowRequest, errors=(400, 404), error_type=ollama.OllamaError),
    Endpoint("GET", "/api/version", ollama.version, "The Ollama API version served", "Ollama"),
    # --- Skulk control ---
    Endpoint("GET", "/healthz", control.healthz, "Liveness (never needs an API key)", "Cluster", response=HealthResponse),
    Endpoint("GET", "/node_id", control.node_id, "This node's id (a bare JSON string)", "Cluster", response=str),
    Endpoint("GET", "/state", control.state, "The replicated cluster state", "Cluster", response=StateResponse),
    Endpoint("GET", "/models", store_routes.models, "Every known model, in upstream Skulk's model-list shape",
             "Models", response=store_routes.UpstreamModelList,
             query=(QueryParam("status", "`downloaded`: only models some node holds"),)),
    Endpoint("GET", "/models/cards", control.models, "Model cards known to this node (Skulk's card records)",
             "Models", response=ModelsResponse),
    Endpoint("POST", "/models/add", store_routes.add_model, "Fetch a model's card from the hub; every node knows it",
             "Models", request=store_routes.AddModelRequest, response=store_routes.UpstreamModel,
             errors=(400, 503)),
    # --- the model store (upstream Skulk's shapes) ---
    # The {model_id:path} routes can also answer 404: the router matches no route for an
    # id no path can hold (one with a line break), before any handler runs.
    Endpoint("GET", "/store/health", store_routes.store_health, "The store node's models disk", "Store",
             response=store_routes.StoreHealth, errors=(503,)),
    Endpoint("GET", "/store/registry", store_routes.store_registry, "Models the store node holds", "Store",
             response=store_routes.StoreRegistry, errors=(503,)),
    Endpoint("GET", "/store/downloads", store_routes.store_downloads, "The store node's downloads in progress",
             "Store", response=store_routes.StoreDownloads, errors=(503,)),
    Endpoint("GET", "/store/models/{model_id:path}/download/status", store_routes.store_download_status,
             "A store download's status ({\"status\": \"not_found\"} when there is none)", "Store",
             response=store_routes.StoreDownloadStatusAnswer, errors=(404, 503)),
    Endpoint("POST", "/store/models/{model_id:path}/download", store_routes.store_download,
             "The store node downloads a whole model from the hub", "Store",
             response=store_routes.StoreDownloadStarted, errors=(400, 404, 503)),
    Endpoint("DELETE", "/store/models/{model_id:path}", store_routes.store_delete,
             "Delete the store node's copy of a model", "Store", response=store_routes.StoreDeleted,
             errors=(404, 409, 503)),
    Endpoint("GET", "/instance/previews", control.instance_previews, "Every candidate placement of a model",
             "Placement", response=PreviewsResponse, errors=(400, 404),
             query=(QueryParam("model_id", "The model to place", required=True),
                    QueryParam("excluded_node_ids", "Node ids to leave out: repeated or comma-separated"))),
    Endpoint("POST", "/place_instance", control.place_instance, "Place a model on the cluster", "Placement",
             request=PlaceInstanceRequest, response=PlaceInstanceResponse, errors=(400, 404, 413, 503)),
    Endpoint("GET", "/instance/{instance_id}", control.get_instance, "One instance", "Placement",
             response=InstanceResponse, errors=(404,)),
    Endpoint("DELETE", "/instance/{instance_id}", control.delete_instance, "Delete an instance", "Placement",
             response=DeleteInstanceResponse, errors=(404, 503)),
    Endpoint("GET", "/v1/diagnostics/node", control.node_diagnostics, "This node's runtime and runners",
             "Diagnostics", response=NodeDiagnostics),
    Endpoint("GET", "/metrics", control.metrics, "Prometheus metrics", "Diagnostics", response=str,
             response_media="text/plain"),
)

_CONVERTER = re.compile(r"\{(\w+):\w+\}")


def openapi_path(path: str) -> str:
    """``/v1/models/{model_id:path}`` -> ``/v1/models/{model_id}``."""
    return _CONVERTER.sub(r"{\1}", path)
