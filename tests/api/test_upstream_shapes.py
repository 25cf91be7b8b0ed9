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

from collections.abc import Iterator
from datetime import datetime

import msgspec
import pytest
from starlette.testclient import TestClient

from skulk.api.app import create_app
from skulk.core.cards import ModelCard
from skulk.core.config import CoreConfig
from skulk.core.events import DownloadCompleted, ModelCopyUpdated
from skulk.core.files import Coverage, ModelCopy
from skulk.core.ids import ModelId, NodeId
from tests.api.node_double import TINY, ScriptedNode

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


# --- POST /models/add ------------------------------------------------------------------------


def _hub_card(model_id: str = "org/new-model") -> ModelCard:
    return msgspec.structs.replace(TINY, model_id=ModelId(model_id))


def test_models_add_answers_upstreams_model_list_model_and_every_node_may_place_it(
    client: TestClient, node: ScriptedNode
) -> None:
    node.hub_cards["org/new-model"] = _hub_card()
    r = client.post("/models/add", json={"model_id": "org/new-model"})
    assert r.status_code == 200, r.text
    entry = r.json()
    check_model_list_model(entry)
    assert entry["id"] == "org/new-model" and entry["is_custom"] is True
    # Replicated: the card is in the state (ModelCardAdded), so the master places it wherever asked.
    assert node.state.model_cards["org/new-model"] == node.hub_cards["org/new-model"]
    assert "org/new-model" in [m["id"] for m in client.get("/models").json()["data"]]
    assert client.post("/place_instance", json={"model_id": "org/new-model"}).status_code == 200
    # A model the node knows already answers its own entry.
    known = client.post("/models/add", json={"model_id": "skulk/tiny-qwen2"}).json()
    check_model_list_model(known)
    assert known["is_custom"] is False


def test_models_add_for_a_model_the_hub_lacks_is_a_clear_400(client: TestClient) -> None:
    r = client.post("/models/add", json={"model_id": "org/absent"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"].startswith("Failed to fetch model:") and err["param"] == "model_id"
    assert client.post("/models/add", json={"model_id": "no-slash"}).status_code == 400
    assert client.post("/models/add", json={}).status_code == 400


# --- /store/* ----------------------------------------------------------------------------------

STORE = "node-a"


@pytest.fixture
def store_node() -> ScriptedNode:
    n = ScriptedNode.three_nodes(core_config=CoreConfig(store_node=STORE))
    n.place("skulk/tiny-qwen2")
    return n


@pytest.fixture
def store_client(store_node: ScriptedNode) -> Iterator[TestClient]:
    with TestClient(create_app(store_node), raise_server_exceptions=False) as c:
        yield c


def _hold(node: ScriptedNode, where: str, model: str) -> None:
    card = node.cards[model]
    cov = Coverage(n_layers=card.n_layers, layers=((0, card.n_layers),), head=True)
    copy = ModelCopy(status="verified", coverage=cov, bytes=card.weight_bytes,
                     files=("config.json", "model.safetensors"), source="hub")
    node._apply(ModelCopyUpdated(node_id=NodeId(where), model_id=ModelId(model), copy=copy))


@pytest.mark.parametrize("method, path", [
    ("GET", "/store/health"), ("GET", "/store/registry"), ("GET", "/store/downloads"),
    ("POST", "/store/models/org/m/download"), ("GET", "/store/models/org/m/download/status"),
    ("DELETE", "/store/models/org/m"),
])
def test_every_store_endpoint_answers_503_store_not_configured_without_a_store(
    client: TestClient, method: str, path: str
) -> None:
    r = client.request(method, path)
    assert r.status_code == 503
    assert r.json()["error"]["message"] == "Store not configured"


def test_store_registry_lists_upstreams_store_model_entries(store_client: TestClient, store_node: ScriptedNode) -> None:
    assert store_client.get("/store/registry").json() == {"entries": []}
    _hold(store_node, STORE, "skulk/tiny-qwen2")
    _hold(store_node, "node-b", "big/huge-405b")  # another node's copy is not the store's
    body = store_client.get("/store/registry").json()
    assert set(body) == {"entries"}
    (entry,) = body["entries"]
    assert set(entry) == {"model_id", "store_path", "files", "downloaded_at", "total_bytes", "repo_has_projector"}
    assert entry["model_id"] == "skulk/tiny-qwen2" and entry["store_path"] == "skulk/tiny-qwen2"
    assert entry["files"] == ["config.json", "model.safetensors"] and entry["total_bytes"] == TINY.weight_bytes
    assert datetime.fromisoformat(entry["downloaded_at"]).tzinfo is not None
    assert entry["repo_has_projector"] is None


def test_store_download_and_its_status_have_upstreams_shapes(store_client: TestClient, store_node: ScriptedNode) -> None:
    store_node.hub_cards["org/new-model"] = _hub_card()
    r = store_client.post("/store/models/org/new-model/download")
    assert r.status_code == 200, r.text
    started = r.json()
    assert set(started) == {"modelId", "status", "progress"}
    assert started == {"modelId": "org/new-model", "status": "pending", "progress": 0.0}
    # The request is in the replicated state: the store node's copy is requested (from the hub).
    copy = store_node.state.model_copies[STORE][ModelId("org/new-model")]
    assert copy.status == "requested" and copy.source == "hub"
    assert "org/new-model" in store_node.cards, "a model the store downloads becomes placeable everywhere"
    status = store_client.get("/store/models/org/new-model/download/status").json()
    assert status == {"modelId": "org/new-model", "status": "pending", "progress": 0.0, "error": None}
    downloads = store_client.get("/store/downloads").json()
    assert downloads == {"downloads": [{"modelId": "org/new-model", "status": "pending", "progress": 0.0, "error": None}]}
    assert store_client.get("/store/models/org/nothing/download/status").json() == {"status": "not_found"}
    _hold(store_node, STORE, "skulk/tiny-qwen2")
    done = store_client.get("/store/models/skulk/tiny-qwen2/download/status").json()
    assert done == {"modelId": "skulk/tiny-qwen2", "status": "complete", "progress": 1.0, "error": None}


def test_store_delete_answers_upstreams_shape_404_and_409(store_client: TestClient, store_node: ScriptedNode) -> None:
    r = store_client.delete("/store/models/org/absent")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Model org/absent not in store"
    _hold(store_node, STORE, "skulk/tiny-qwen2")
    busy = store_client.delete("/store/models/skulk/tiny-qwen2")
    # The fixture placed the tiny model on node-a (the store): an instance uses it there.
    assert any(STORE in i.shard_assignments.node_to_runner for i in store_node.state.instances.values())
    assert busy.status_code == 409 and "in use" in busy.json()["error"]["message"]
    _hold(store_node, STORE, "big/huge-405b")
    r = store_client.delete("/store/models/big/huge-405b")
    assert r.status_code == 200 and r.json() == {"modelId": "big/huge-405b", "deleted": True}
    assert store_node.state.model_copies[STORE][ModelId("big/huge-405b")].status == "evicting"


def test_store_health_has_upstreams_shape(store_client: TestClient) -> None:
    body = store_client.get("/store/health").json()
    assert set(body) == {"storePath", "freeBytes", "totalBytes", "usedBytes"}
    assert body["storePath"] == "/srv/node-a/models"
    assert body["usedBytes"] == body["totalBytes"] - body["freeBytes"]
