"""The OpenAPI document describes exactly what is served, in the codec's wire shape.

Responses from the live app are validated against the published schema
(JSON Schema 2020-12 via jsonschema_rs), and schemathesis fuzzes every
operation from the document itself: no input may produce a 5xx, and every
answer must conform to its declared status, content type and schema.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from schemathesis.checks import positive_data_acceptance
from hypothesis import HealthCheck, given, settings
from starlette.routing import Route
from starlette.testclient import TestClient

from skulk.api.app import create_app
from skulk.api.openapi import build_openapi
from skulk.api.routes import ENDPOINTS, openapi_path
from skulk.core.config import CoreConfig
from tests.api.node_double import ScriptedNode

MODEL = "skulk/tiny-qwen2"


def validator(doc: dict[str, Any], component: str) -> Any:
    root = {"$ref": f"#/components/schemas/{component}", "components": doc["components"]}
    return jsonschema_rs.Draft202012Validator(root)


def assert_valid(doc: dict[str, Any], component: str, instance: Any) -> None:
    errors = [f"{e.instance_path}: {e.message}" for e in validator(doc, component).iter_errors(instance)]
    assert not errors, f"{component}: {errors[:5]}"


def test_every_served_route_is_documented(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = {(ep.method, openapi_path(ep.path)) for ep in ENDPOINTS}
    assert documented == served
    app_routes = {
        (m, openapi_path(r.path))
        for r in client.app.routes  # type: ignore[attr-defined]
        if isinstance(r, Route) and r.methods
        for m in r.methods - {"HEAD"}
    }
    extras = app_routes - served
    # Only the document itself, its page, the dashboard and the page fallback are undocumented.
    assert {p for _, p in extras} == {"/openapi.json", "/docs", "/", "/{path}"}, extras
    assert doc == build_openapi(), "the served document is the generated one"


def test_tagged_unions_are_single_key_objects_in_the_schema() -> None:
    comps = build_openapi()["components"]["schemas"]
    ready = comps["RunnerReady"]
    assert ready["required"] == ["RunnerReady"] and ready["additionalProperties"] is False
    assert "contextCeiling" in ready["properties"]["RunnerReady"]["properties"]
    state = comps["State"]["properties"]
    assert {"instances", "runners", "lastSeen", "nodeIdentities", "nodeMemory", "nodeNetwork", "nodeSystem"} <= set(state)
    req = comps["ChatCompletionRequest"]
    assert req["properties"]["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1}
    assert req["required"] == ["model", "messages"]


def test_live_responses_conform_to_their_schemas(client: TestClient, node: ScriptedNode) -> None:
    doc = client.get("/openapi.json").json()
    assert_valid(doc, "State", client.get("/state").json())
    iid = next(iter(node.state.instances))
    assert_valid(doc, "MlxRingInstance", client.get(f"/instance/{iid}").json())
    assert_valid(doc, "PreviewsResponse", client.get("/instance/previews", params={"model_id": MODEL}).json())
    assert_valid(doc, "ModelsResponse", client.get("/models/cards").json())
    assert_valid(doc, "UpstreamModelList", client.get("/models").json())
    assert_valid(doc, "ModelList", client.get("/v1/models").json())
    assert_valid(doc, "NodeDiagnostics", client.get("/v1/diagnostics/node").json())
    chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True})
    assert_valid(doc, "ChatCompletion", chat.json())
    assert_valid(doc, "Completion", client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).json())
    assert_valid(doc, "ErrorEnvelope", client.post("/v1/chat/completions", json={}).json())
    stream = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True,
                                                        "stream_options": {"include_usage": True}})
    chunks = [line[6:] for line in stream.text.split("\n") if line.startswith("data: {")]
    assert len(chunks) >= 3
    for raw in chunks:
        assert_valid(doc, "ChatCompletionChunk", json.loads(raw))
    # And the schema is not vacuous: a wrong shape fails.
    with pytest.raises(AssertionError):
        assert_valid(doc, "State", {"instances": {"x": {"NotAnInstance": {}}}})


def test_fuzz_every_operation_from_the_document() -> None:
    # With a store node configured, so the /store/* operations answer (rather than 503 everywhere).
    node = ScriptedNode.three_nodes(core_config=CoreConfig(store_node="node-a"))
    node.place(MODEL)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(node))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(ENDPOINTS)
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: Any) -> None:
            # A DELETE would remove the one instance; keep the cluster the other cases use.
            if case.method.upper() == "DELETE":
                if "model_id" in (case.path_parameters or {}):
                    case.path_parameters = {"model_id": "org/not-in-the-store"}
                else:
                    case.path_parameters = {"instance_id": "inst-does-not-exist"}
            # Cross-field rules (max_tokens vs the instance's context ceiling, top_logprobs
            # needing logprobs) cannot be written in JSON Schema: a schema-valid request may
            # still be refused with 400. Everything else is checked.
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        run()
    # Every generation the fuzzer got through reached the node as a well-formed task.
    assert all(t.model_id for t in node.tasks_submitted())
