"""Upstream Skulk's wire shapes, checked field by field (issue 14: ``/models``, ``/models/add``, ``/store/*``).

The expected shapes are copied from upstream Skulk (Foxlight-Foundation/Skulk,
release 1.3.0, commit 32275ad), not from this code:

- ``src/skulk/api/types/api.py``: ``ModelList`` (``object``, ``data``),
  ``ModelListModel`` and ``ResolvedModelCapabilities``, the body of
  ``GET /models`` and the answer of ``POST /models/add``;
- ``src/skulk/api/main.py``: the ``/store/*`` handlers (``{"entries": [...]}``
  for the registry, ``{"modelId", "deleted"}`` for a delete, 503 "Store not
  configured"), and ``src/skulk/store/model_store_server.py`` /
  ``model_store.py`` for the store's own records (``StoreModelEntry``:
  ``model_id``, ``store_path``, ``files``, ``downloaded_at``, ``total_bytes``,
  ``repo_has_projector``; download status ``{"modelId", "status",
  "progress", "error"}`` with ``status`` in pending/downloading/complete/failed).

A client written against upstream reads these keys; any rename or missing key
here breaks it.
"""

from __future__ import annotations

from starlette.testclient import TestClient

from skulk.core.events import DownloadCompleted
from skulk.core.ids import ModelId, NodeId
from tests.api.node_double import ScriptedNode

MODEL_LIST_MODEL_FIELDS = {
    "id": str, "object": str, "created": int, "owned_by": str, "hugging_face_id": str, "name": str,
    "description": str, "context_length": int, "tags": list, "storage_size_megabytes": int,
    "supports_tensor": bool, "tasks": list, "is_custom": bool, "family": str, "quantization": str,
    "base_model": str, "capabilities": list, "reasoning": (dict, type(None)), "modalities": (dict, type(None)),
    "tooling": (dict, type(None)), "runtime": (dict, type(None)), "resolved_capabilities": (dict, type(None)),
}
RESOLVED_CAPABILITIES_FIELDS = {
    "family": str, "supports_thinking": bool, "supports_thinking_toggle": bool, "supports_thinking_budget": bool,
    "default_reasoning_effort": str, "disabled_reasoning_effort": str, "thinking_format": str,
    "supports_image_input": bool, "supports_audio_input": bool, "supports_tool_calling": bool,
    "builtin_tools": list, "tool_call_format": str, "prompt_renderer": str, "output_parser": str,
    "supports_native_multimodal": bool,
}
REASONING_EFFORTS = {"none", "minimal", "low", "medium", "high", "xhigh"}


def _check_fields(obj: dict, fields: dict) -> None:
    assert set(obj) == set(fields), (sorted(set(obj) - set(fields)), sorted(set(fields) - set(obj)))
    for key, typ in fields.items():
        assert isinstance(obj[key], typ), (key, obj[key])


def check_model_list_model(entry: dict) -> None:
    _check_fields(entry, MODEL_LIST_MODEL_FIELDS)
    assert entry["object"] == "model" and entry["owned_by"] == "skulk"
    caps = entry["resolved_capabilities"]
    assert caps is not None
    _check_fields(caps, RESOLVED_CAPABILITIES_FIELDS)
    assert caps["default_reasoning_effort"] in REASONING_EFFORTS
    assert caps["disabled_reasoning_effort"] in REASONING_EFFORTS


def test_models_has_upstreams_model_list_shape(client: TestClient, node: ScriptedNode) -> None:
    body = client.get("/models").json()
    assert set(body) == {"object", "data"} and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == sorted(node.cards)
    for entry in body["data"]:
        check_model_list_model(entry)
    tiny = next(m for m in body["data"] if m["id"] == "skulk/tiny-qwen2")
    card = node.cards["skulk/tiny-qwen2"]
    # Upstream's Memory.in_mb: bytes / 2**20, rounded.
    assert tiny["storage_size_megabytes"] == round(card.weight_bytes / 2**20)
    assert tiny["context_length"] == card.context_length and tiny["family"] == card.family == "qwen2"
    assert tiny["hugging_face_id"] == "skulk/tiny-qwen2" and tiny["name"] == "tiny-qwen2"
    assert tiny["tasks"] == ["TextGeneration"] and tiny["supports_tensor"] is True and "tensor" in tiny["tags"]
    assert tiny["resolved_capabilities"]["family"] == "qwen2"


def test_models_status_downloaded_keeps_models_a_node_holds(client: TestClient, node: ScriptedNode) -> None:
    assert client.get("/models", params={"status": "downloaded"}).json()["data"] == []
    node._apply(DownloadCompleted(node_id=NodeId("node-b"), model_id=ModelId("skulk/tiny-qwen2")))
    body = client.get("/models", params={"status": "downloaded"}).json()
    assert [m["id"] for m in body["data"]] == ["skulk/tiny-qwen2"]
    assert len(client.get("/models").json()["data"]) == len(node.cards) == 2
