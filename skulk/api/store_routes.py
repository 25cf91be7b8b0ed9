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

The model store (``/store/*``) answers from the replicated state: the store
node (``SKULK_STORE``) and its copies (``State.model_copies``). A node not
configured with a store answers 503 "Store not configured", as upstream. The
shapes follow upstream's ``src/skulk/api/main.py`` and
``src/skulk/store/model_store_server.py``: the registry is
``{"entries": [StoreModelEntry...]}`` (snake_case, as upstream's
``model_dump``), download status ``{"modelId", "status", "progress",
"error"}`` (status pending, downloading, complete or failed; an unknown
model ``{"status": "not_found"}``), a delete ``{"modelId", "deleted"}``.

Capabilities are stated, never guessed: Skulk's cards describe text
generation models, so ``capabilities`` is ``["text"]``, the structured
sections (``reasoning``, ``modalities``, ``tooling``, ``runtime``) are null
and ``resolved_capabilities`` carries upstream's defaults with the card's
family.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from skulk.api.appstate import app_state
from skulk.api.body import decode_body, read_body
from skulk.api.errors import ApiError
from skulk.api.generation import raise_for_result
from skulk.api.wire import json_response
from skulk.core.cards import ModelCard
from skulk.core.commands import AddModelCard, EvictModel, RequestStoreDownload
from skulk.core.files import ModelCopy
from skulk.core.ids import ModelId, NodeId
from skulk.core.keeper import resolve_store

__all__ = [
    "ResolvedModelCapabilities",
    "UpstreamModel",
    "UpstreamModelList",
    "AddModelRequest",
    "StoreModelEntry",
    "StoreRegistry",
    "StoreHealth",
    "StoreDownloadStarted",
    "StoreDownloadStatus",
    "StoreNotFound",
    "StoreDownloadStatusAnswer",
    "StoreDownloads",
    "StoreDeleted",
    "upstream_model",
    "models",
    "add_model",
    "store_health",
    "store_registry",
    "store_downloads",
    "store_download",
    "store_download_status",
    "store_delete",
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


# --- POST /models/add --------------------------------------------------------------------------


async def add_model(request: Request) -> Response:
    """``POST /models/add {"model_id"}``: fetch a card from the hub and make it known to every node.

    Answers upstream's ``ModelListModel`` of the card, ``is_custom`` true. A
    model the node already knows answers its entry at once (``is_custom``
    false). The card reaches every node as a replicated event
    (``ModelCardAdded``), so the master places it wherever the request landed.
    """
    app = app_state(request)
    body = decode_body(await read_body(request, app.config.max_body_bytes), AddModelRequest)
    model_id = body.model_id.strip()
    if not model_id or model_id.count("/") != 1 or any(not p or p.startswith(".") for p in model_id.split("/")):
        raise ApiError(400, f"model_id must be an org/name repository id, got {body.model_id!r}",
                       code="invalid_value", param="model_id")
    node = app.node
    known = node.cards.get(model_id)
    if known is not None:
        return json_response(upstream_model(known))
    try:
        card = await node.describe_model(model_id)
    except LookupError as exc:
        raise ApiError(400, f"Failed to fetch model: {exc}", code="hub_error", param="model_id") from None
    result = await node.submit(AddModelCard(command_id=node.new_command_id(), card=card))
    raise_for_result(result)
    return json_response(upstream_model(card, is_custom=True))


# --- the model store (/store/*) ----------------------------------------------------------------


class StoreModelEntry(msgspec.Struct, frozen=True, kw_only=True):
    """Upstream's ``StoreModelEntry`` (``GET /store/registry``), field for field (snake_case)."""

    model_id: str
    store_path: str
    files: list[str]
    downloaded_at: str
    total_bytes: int
    repo_has_projector: bool | None = None


class StoreRegistry(msgspec.Struct, frozen=True, kw_only=True):
    entries: list[StoreModelEntry]


class StoreHealth(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    store_path: str
    free_bytes: int
    total_bytes: int
    used_bytes: int


class StoreDownloadStarted(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """``POST /store/models/{id}/download``: upstream answers modelId, status and progress."""

    model_id: str
    status: str  # pending | downloading | complete | failed
    progress: float


class StoreDownloadStatus(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """``GET /store/models/{id}/download/status`` and each entry of ``GET /store/downloads``."""

    model_id: str
    status: str
    progress: float
    error: str | None


class StoreNotFound(msgspec.Struct, frozen=True, kw_only=True):
    """Upstream's answer (with 200) for a model the store has no download of."""

    status: Literal["not_found"] = "not_found"


StoreDownloadStatusAnswer = StoreDownloadStatus | StoreNotFound


class StoreDownloads(msgspec.Struct, frozen=True, kw_only=True):
    downloads: list[StoreDownloadStatus]


class StoreDeleted(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    model_id: str
    deleted: bool


def _store(request: Request) -> tuple[NodeId, ModelCopyMap]:
    """The store node and its copies; 503 "Store not configured" when there is none (as upstream)."""
    node = app_state(request).node
    if not node.core_config.store_node:
        raise ApiError(503, "Store not configured", code="store_not_configured")
    store = resolve_store(node.state, node.core_config)
    if store is None:
        raise ApiError(503, f"Store unreachable: node {node.core_config.store_node!r} is not in the cluster",
                       code="unavailable")
    return store, node.state.model_copies.get(store, {})


ModelCopyMap = Mapping[ModelId, ModelCopy]


def _status(copy: ModelCopy | None) -> tuple[str, float]:
    """Upstream's download status and progress (0..1) for a store copy."""
    if copy is None:
        return "pending", 0.0
    if copy.status == "failed":
        return "failed", _progress(copy)
    if copy.status in ("requested",):
        return "pending", 0.0
    if copy.status in ("downloading", "staged"):
        return "downloading", _progress(copy)
    if copy.status == "verified" and copy.coverage.complete:
        return "complete", 1.0
    return "downloading", _progress(copy)


def _progress(copy: ModelCopy) -> float:
    if copy.total_bytes > 0:
        return min(1.0, copy.done_bytes / copy.total_bytes)
    return 1.0 if copy.coverage.complete else 0.0


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat()


async def store_health(request: Request) -> Response:
    """``GET /store/health``: the store node's models disk."""
    store, _ = _store(request)
    disk = app_state(request).node.state.node_disk.get(store)
    if disk is None:
        raise ApiError(503, "Store unreachable: it has not reported its disk yet", code="unavailable")
    return json_response(StoreHealth(store_path=disk.path, free_bytes=disk.free_bytes, total_bytes=disk.total_bytes,
                                     used_bytes=disk.total_bytes - disk.free_bytes))


async def store_registry(request: Request) -> Response:
    """``GET /store/registry``: the models the store node holds verified."""
    _, copies = _store(request)
    entries = [
        StoreModelEntry(model_id=m, store_path=m, files=list(c.files), downloaded_at=_iso(c.since),
                        total_bytes=c.bytes)
        for m, c in sorted(copies.items())
        if c.status == "verified"
    ]
    return json_response(StoreRegistry(entries=entries))


async def store_downloads(request: Request) -> Response:
    """``GET /store/downloads``: the store node's downloads in progress."""
    _, copies = _store(request)
    rows = []
    for m, c in sorted(copies.items()):
        if c.status in ("requested", "downloading"):
            status, progress = _status(c)
            rows.append(StoreDownloadStatus(model_id=m, status=status, progress=progress, error=None))
    return json_response(StoreDownloads(downloads=rows))


async def store_download(request: Request) -> Response:
    """``POST /store/models/{model_id}/download``: the store node downloads the whole model from the hub.

    A model with no card yet gets one first (as ``POST /models/add`` would), so it is placeable everywhere.
    """
    store, copies = _store(request)
    node = app_state(request).node
    model_id = request.path_params["model_id"]
    if model_id not in node.cards:
        try:
            card = await node.describe_model(model_id)
        except LookupError as exc:
            raise ApiError(400, f"Failed to fetch model: {exc}", code="hub_error", param="model_id") from None
        raise_for_result(await node.submit(AddModelCard(command_id=node.new_command_id(), card=card)))
    result = await node.submit(
        RequestStoreDownload(command_id=node.new_command_id(), model_id=ModelId(model_id), node_id=store)
    )
    raise_for_result(result)
    status, progress = _status(node.state.model_copies.get(store, {}).get(ModelId(model_id)))
    return json_response(StoreDownloadStarted(model_id=model_id, status=status, progress=progress))


async def store_download_status(request: Request) -> Response:
    """``GET /store/models/{model_id}/download/status``; ``{"status": "not_found"}`` when the store has none."""
    _, copies = _store(request)
    model_id = request.path_params["model_id"]
    copy = copies.get(ModelId(model_id))
    if copy is None:
        return json_response(StoreNotFound())
    status, progress = _status(copy)
    error = (copy.error or None) if copy.status == "failed" else None
    return json_response(StoreDownloadStatus(model_id=model_id, status=status, progress=progress, error=error))


async def store_delete(request: Request) -> Response:
    """``DELETE /store/models/{model_id}``: evict the store's copy (409 while an instance there uses it)."""
    store, copies = _store(request)
    node = app_state(request).node
    model_id = request.path_params["model_id"]
    if ModelId(model_id) not in copies:
        raise ApiError(404, f"Model {model_id} not in store", code="model_not_found")
    result = await node.submit(EvictModel(command_id=node.new_command_id(), model_id=ModelId(model_id), node_id=store))
    if result.status == "rejected" and result.code == "model_not_found":
        raise ApiError(404, f"Model {model_id} not in store", code="model_not_found")
    raise_for_result(result)
    return json_response(StoreDeleted(model_id=model_id, deleted=True))
