"""Model catalogue and model store endpoints, in upstream Skulk's wire shapes.

Theory of operation
-------------------
Upstream Skulk's own clients and test harness read ``GET /models`` as
``{"object": "list", "data": [ModelListModel, ...]}`` with snake_case fields
(``hugging_face_id``, ``storage_size_megabytes``, ``resolved_capabilities``
...). The records below copy those field names and defaults exactly
(upstream ``src/skulk/api/types/api.py``: ``ModelList``, ``ModelListModel``,
``ResolvedModelCapabilities``); Skulk fills them from its model cards.
Skulk's own card listing (camelCase card records) moved to
``GET /models/cards``, which the dashboard reads.

Capabilities are stated, never guessed: Skulk's cards describe text
generation models, so ``capabilities`` is ``["text"]``, the structured
sections (``reasoning``, ``modalities``, ``tooling``, ``runtime``) are null
and ``resolved_capabilities`` carries upstream's defaults with the card's
family.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from skulk.api.appstate import app_state
from skulk.api.wire import json_response
from skulk.core.cards import ModelCard

__all__ = [
    "ResolvedModelCapabilities",
    "UpstreamModel",
    "UpstreamModelList",
    "AddModelRequest",
    "upstream_model",
    "models",
]

_DESCRIPTION = (
    "resolved_capabilities reflects the default tool-free request path; request-specific options such as tools "
    "may change prompt rendering and related resolved capability values."
)


class ResolvedModelCapabilities(msgspec.Struct, frozen=True, kw_only=True):
    """Upstream's ``ResolvedModelCapabilities``, field for field."""

    family: str = ""
    supports_thinking: bool = False
    supports_thinking_toggle: bool = False
    supports_thinking_budget: bool = False
    default_reasoning_effort: str = "medium"
    disabled_reasoning_effort: str = "none"
    thinking_format: str = "none"
    supports_image_input: bool = False
    supports_audio_input: bool = False
    supports_tool_calling: bool = False
    builtin_tools: list[str] = []
    tool_call_format: str = "generic"
    prompt_renderer: str = "tokenizer"
    output_parser: str = "generic"
    supports_native_multimodal: bool = False


class UpstreamModel(msgspec.Struct, frozen=True, kw_only=True):
    """Upstream's ``ModelListModel``: one entry of ``GET /models`` (and ``POST /models/add``'s answer)."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "skulk"
    hugging_face_id: str = ""
    name: str = ""
    description: str = ""
    context_length: int = 0
    tags: list[str] = []
    storage_size_megabytes: int = 0
    supports_tensor: bool = False
    tasks: list[str] = []
    is_custom: bool = False
    family: str = ""
    quantization: str = ""
    base_model: str = ""
    capabilities: list[str] = []
    reasoning: dict[str, Any] | None = None
    modalities: dict[str, Any] | None = None
    tooling: dict[str, Any] | None = None
    runtime: dict[str, Any] | None = None
    resolved_capabilities: ResolvedModelCapabilities | None = None


class UpstreamModelList(msgspec.Struct, frozen=True, kw_only=True):
    """Upstream's ``ModelList``."""

    object: Literal["list"] = "list"
    data: list[UpstreamModel]


class AddModelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /models/add``: upstream's ``AddCustomModelParams``."""

    model_id: str


def upstream_model(card: ModelCard, *, is_custom: bool = False) -> UpstreamModel:
    """A card as upstream's model-list entry (``storage_size_megabytes`` rounds like upstream's ``Memory.in_mb``)."""
    tags = ["tensor"] if card.supports_tensor else []
    return UpstreamModel(
        id=card.model_id,
        hugging_face_id=card.model_id,
        name=card.model_id.split("/")[-1],
        description=_DESCRIPTION,
        context_length=card.context_length,
        tags=tags,
        storage_size_megabytes=round(card.weight_bytes / (1024**2)),
        supports_tensor=card.supports_tensor,
        tasks=["TextGeneration"],
        is_custom=is_custom,
        family=card.family,
        capabilities=["text"],
        resolved_capabilities=ResolvedModelCapabilities(family=card.family),
    )


async def models(request: Request) -> Response:
    """``GET /models[?status=downloaded]``: every model card, in upstream's shape.

    ``status=downloaded`` keeps the models some node holds (``State.downloads``).
    """
    node = app_state(request).node
    cards = node.cards
    ids = sorted(cards)
    if request.query_params.get("status") == "downloaded":
        held = {m for models in node.state.downloads.values() for m in models}
        ids = [m for m in ids if m in held]
    return json_response(UpstreamModelList(data=[upstream_model(cards[m]) for m in ids]))
