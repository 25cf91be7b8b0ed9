"""Skulk's control endpoints keep the published wire shapes (REFERENCE.md, "Wire shapes users' tools rely on")."""

from __future__ import annotations

import re

import pytest
from starlette.testclient import TestClient

from skulk.api.app import create_app
from skulk.api.config import ApiConfig
from skulk.core.commands import DeleteInstance, PlaceInstance
from skulk.core.events import NodeGatheredInfo
from skulk.core.ids import NodeId
from skulk.core.telemetry import NodeIdentity
from tests.api.node_double import ScriptedNode

MODEL = "skulk/tiny-qwen2"


def test_node_id_is_a_bare_json_string(client: TestClient) -> None:
    r = client.get("/node_id")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.text == '"node-a"'


def test_state_has_the_published_shape(client: TestClient, node: ScriptedNode) -> None:
    s = client.get("/state").json()
    for key in ("instances", "runners", "tasks", "downloads", "lastSeen", "topology", "nodeIdentities", "nodeMemory", "nodeNetwork", "nodeSystem"):
        assert key in s, key
    (iid,) = s["instances"]
    (kind, body), = s["instances"][iid].items()
    assert kind == "MlxRingInstance"
    sa = body["shardAssignments"]
    assert sa["modelId"] == MODEL
    (node_id, runner_id), = sa["nodeToRunner"].items()
    (shard_kind, shard), = sa["runnerToShard"][runner_id].items()
    assert shard_kind == "PipelineShardMetadata"
    assert (shard["startLayer"], shard["endLayer"], shard["nLayers"], shard["worldSize"]) == (0, 6, 6, 1)
    assert s["runners"][runner_id] == {"RunnerReady": {"contextCeiling": 8192}}
    assert s["nodeIdentities"]["node-b"]["friendlyName"] == "bravo"
    assert s["nodeMemory"]["node-a"]["ramTotal"]["inBytes"] == 16 * 1024**3
    assert s["nodeMemory"]["node-a"]["ramAvailable"]["inBytes"] == 12 * 1024**3
    assert s["nodeNetwork"]["node-c"]["interfaces"] == [{"name": "en0", "ipAddress": "10.0.0.3", "kind": "wifi"}]
    assert set(s["lastSeen"]) == {"node-a", "node-b", "node-c"}
    kinds = {(c["source"], c["sink"]): c["kind"] for c in s["topology"]["connections"]}
    assert kinds[("node-a", "node-b")] == "thunderbolt" and kinds[("node-c", "node-a")] == "wifi"
    assert s["session"] == {"clock": 1, "master": "node-a"}


def test_models_lists_cards(client: TestClient) -> None:
    models = client.get("/models/cards").json()["models"]
    assert [m["modelId"] for m in models] == ["big/huge-405b", MODEL]
    tiny = models[1]
    assert (tiny["nLayers"], tiny["contextLength"], tiny["supportsTensor"]) == (6, 8192, True)


def test_previews_cover_every_combination_and_honour_exclusions(client: TestClient) -> None:
    r = client.get("/instance/previews", params={"model_id": MODEL})
    assert r.status_code == 200, r.text
    previews = r.json()["previews"]
    combos = {(p["sharding"], p["instance_meta"], p["node_count"]) for p in previews}
    assert ("Pipeline", "MlxRing", 3) in combos and ("Tensor", "MlxRing", 2) in combos
    for p in previews:
        assert set(p) >= {"sharding", "instance_meta", "error", "instance", "memory_delta_by_node"}
        assert (p["instance"] is None) == (p["error"] is not None)
        if p["instance"] is not None:
            (kind, body), = p["instance"].items()
            assert kind == ("MlxRingInstance" if p["instance_meta"] == "MlxRing" else "MlxJacclInstance")
            assert set(p["memory_delta_by_node"]) == set(body["shardAssignments"]["nodeToRunner"])
            assert all(v > 0 for v in p["memory_delta_by_node"].values())
    three = next(p for p in previews if (p["sharding"], p["instance_meta"], p["node_count"]) == ("Pipeline", "MlxRing", 3))
    assert three["instance"] is not None
    # Exclusions, comma-separated or repeated, leave those nodes out of every preview.
    for params in ({"model_id": MODEL, "excluded_node_ids": "node-a,node-b"}, [("model_id", MODEL), ("excluded_node_ids", "node-a"), ("excluded_node_ids", "node-b")]):
        previews = client.get("/instance/previews", params=params).json()["previews"]
        hosts = {n for p in previews for n in p["memory_delta_by_node"]}
        assert hosts == {"node-c"}, hosts
        assert max(p["node_count"] for p in previews) == 1


def test_previews_errors(client: TestClient) -> None:
    r = client.get("/instance/previews")
    assert r.status_code == 400 and r.json()["error"]["param"] == "model_id"
    r = client.get("/instance/previews", params={"model_id": "x/y"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    huge = client.get("/instance/previews", params={"model_id": "big/huge-405b"}).json()["previews"]
    assert huge and all(p["instance"] is None and "needs ~" in p["error"] for p in huge if p["sharding"] == "Pipeline")


def test_place_get_delete_instance(client: TestClient, node: ScriptedNode) -> None:
    r = client.post("/place_instance", json={"model_id": MODEL, "sharding": "Pipeline", "instance_meta": "MlxRing", "min_nodes": 3, "excluded_nodes": []})
    assert r.status_code == 200, r.text
    body = r.json()
    iid = body["instance_id"]
    assert body["model_id"] == MODEL and iid in client.get("/state").json()["instances"]
    (cmd,) = [c for c in node.submitted if isinstance(c, PlaceInstance)]
    assert (cmd.sharding, cmd.instance_meta, cmd.min_nodes, cmd.command_id) == ("Pipeline", "MlxRing", 3, body["command_id"])
    inst = client.get(f"/instance/{iid}").json()
    assert len(inst["MlxRingInstance"]["shardAssignments"]["nodeToRunner"]) == 3
    assert len(inst["MlxRingInstance"]["ring"]) == 3
    r = client.delete(f"/instance/{iid}")
    assert r.status_code == 200, r.text
    assert r.json()["instance_id"] == iid
    assert [c.instance_id for c in node.submitted if isinstance(c, DeleteInstance)] == [iid]
    assert client.get(f"/instance/{iid}").status_code == 404
    r = client.delete(f"/instance/{iid}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "instance_not_found"


def test_place_excluding_nodes_respects_exclusion(client: TestClient) -> None:
    r = client.post("/place_instance", json={"model_id": MODEL, "excluded_nodes": ["node-a", "node-b"]})
    assert r.status_code == 200, r.text
    inst = client.get(f"/instance/{r.json()['instance_id']}").json()
    assert list(inst["MlxRingInstance"]["shardAssignments"]["nodeToRunner"]) == ["node-c"]


def test_place_that_cannot_fit_is_400_with_the_arithmetic(client: TestClient) -> None:
    r = client.post("/place_instance", json={"model_id": "big/huge-405b"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_memory" and err["type"] == "invalid_request_error"
    assert re.search(r"needs ~[\d.]+ GB .* can use [\d.]+ GB", err["message"]), err["message"]
    r = client.post("/place_instance", json={"model_id": MODEL, "min_nodes": 5})
    assert r.status_code == 400 and "min_nodes is 5" in r.json()["error"]["message"]


def test_place_with_pending_information_is_503() -> None:
    node = ScriptedNode.three_nodes()
    # A fourth node is known but has not reported its memory yet: placement must wait, then give up.
    node._apply(NodeGatheredInfo(node_id=NodeId("node-d"), identity=NodeIdentity(friendly_name="delta")))
    with TestClient(create_app(node, config=ApiConfig())) as c:
        r = c.post("/place_instance", json={"model_id": "big/huge-405b"})
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "unavailable" and "node-d" in err["message"]


def test_diagnostics_node(client: TestClient, node: ScriptedNode) -> None:
    node.runner_rows = [{"runnerId": "runner-1", "instanceId": "inst-1", "status": "RunnerReady", "pid": 4242, "uptimeS": 3.5}]
    d = client.get("/v1/diagnostics/node").json()
    assert d["runtime"] == {
        "masterNodeId": "node-a", "nodeId": "node-a", "isMaster": True, "friendlyName": "alpha",
        "skulkVersion": "0.1.0", "sessionClock": 1, "lastIndex": node.state.last_index,
    }
    assert d["runners"] == node.runner_rows


_SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? [-+0-9.eEInfa]+$')


def test_metrics_are_valid_prometheus_text(client: TestClient) -> None:
    client.get("/state")
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert text.endswith("\n")
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "summary", "untyped") and name not in typed
            typed.add(name)
        elif not line.startswith("#"):
            assert _SAMPLE.match(line), line
    assert 'skulk_api_requests_total{method="GET",route="/state",status="200"} 1' in text
    assert 'skulk_api_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1' in text
    assert "skulk_cluster_nodes 3" in text and "skulk_cluster_instances 1" in text
    assert 'skulk_cluster_runners{status="RunnerReady"} 1' in text and "skulk_node_is_master 1" in text
    assert "skulk_node_commands_submitted_total 1" in text, "the runtime's own metrics are exposed"


@pytest.mark.parametrize("path", ["/", "/chat", "/place", "/instances/inst-1", "/nodes/node-a"])
def test_dashboard_deep_links_serve_the_page(client: TestClient, path: str) -> None:
    r = client.get(path, headers={"accept": "text/html,application/xhtml+xml"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js"' in r.text
    # An API client asking for an unknown path still gets a JSON 404.
    if path != "/":
        assert client.get(path).status_code == 404


def test_dashboard_assets_are_served(client: TestClient) -> None:
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
