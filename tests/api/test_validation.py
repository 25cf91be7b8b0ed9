"""Malformed requests get their documented status and an envelope naming the field; none reaches a runner.

Each case states the status, the error code and the ``param`` the docs
(docs/api.md, "Errors") promise. After every bad request the node must still
serve a good one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.api.conftest import TEST_BODY_LIMIT
from tests.api.node_double import ScriptedNode

MODEL = "skulk/tiny-qwen2"
GOOD_CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def chat(**overrides: Any) -> dict[str, Any]:
    body = dict(GOOD_CHAT)
    body.update(overrides)
    return body


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD_CHAT.items() if k != key}


def assert_envelope(body: dict[str, Any], *, code: str | None, param: str | None) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["code"] == code, err
    assert err["param"] == param, err
    if param is not None:
        # The message names the field too, for humans reading logs.
        assert param.split("[")[0].split(".")[0] in err["message"], err
    return err


# (id, raw body or JSON object, status, code, param)
CHAT_CASES: list[tuple[str, Any, int, str, str | None]] = [
    ("no-messages", without("messages"), 400, "missing_field", "messages"),
    ("no-model", without("model"), 400, "missing_field", "model"),
    ("empty-messages", chat(messages=[]), 400, "invalid_value", "messages"),
    ("empty-content", chat(messages=[{"role": "user", "content": ""}]), 400, "invalid_value", "messages[0].content"),
    ("null-content", chat(messages=[{"role": "user", "content": None}]), 400, "invalid_type", "messages[0].content"),
    ("missing-role", chat(messages=[{"content": "x"}]), 400, "missing_field", "messages[0].role"),
    ("bad-role", chat(messages=[{"role": "wizard", "content": "x"}]), 400, "invalid_value", "messages[0].role"),
    ("image-part", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "invalid_value",
     "messages[0].content[0].type"),
    ("no-parts", chat(messages=[{"role": "user", "content": []}]), 400, "invalid_value", "messages[0].content"),
    ("max-tokens-zero", chat(max_tokens=0), 400, "invalid_value", "max_tokens"),
    ("max-tokens-negative", chat(max_tokens=-5), 400, "invalid_value", "max_tokens"),
    ("max-completion-zero", chat(max_completion_tokens=0), 400, "invalid_value", "max_completion_tokens"),
    ("max-tokens-string", chat(max_tokens="ten"), 400, "invalid_type", "max_tokens"),
    ("max-tokens-bool", chat(max_tokens=True), 400, "invalid_type", "max_tokens"),
    ("max-tokens-disagree", chat(max_tokens=5, max_completion_tokens=6), 400, "invalid_value", "max_completion_tokens"),
    ("temperature-string", chat(temperature="hot"), 400, "invalid_type", "temperature"),
    ("temperature-range", chat(temperature=3.5), 400, "invalid_value", "temperature"),
    ("top-p-zero", chat(top_p=0), 400, "invalid_value", "top_p"),
    ("top-k-negative", chat(top_k=-1), 400, "invalid_value", "top_k"),
    ("min-p-range", chat(min_p=1.5), 400, "invalid_value", "min_p"),
    ("seed-float", chat(seed=1.5), 400, "invalid_type", "seed"),
    ("stop-empty", chat(stop=[""]), 400, "invalid_value", "stop[0]"),
    ("stop-number", chat(stop=7), 400, "invalid_type", "stop"),
    ("top-logprobs-alone", chat(top_logprobs=3), 400, "invalid_value", "top_logprobs"),
    ("top-logprobs-range", chat(logprobs=True, top_logprobs=50), 400, "invalid_value", "top_logprobs"),
    ("n-two", chat(n=2), 400, "invalid_value", "n"),
    ("stream-string", chat(stream="yes"), 400, "invalid_type", "stream"),
    ("messages-object", chat(messages={"role": "user"}), 400, "invalid_type", "messages"),
    ("model-blank", chat(model="  "), 400, "invalid_value", "model"),
    ("body-array", [GOOD_CHAT], 400, "invalid_type", None),
    ("context-exceeded", chat(max_tokens=100_000), 400, "context_length_exceeded", "max_tokens"),
    ("context-exceeded-completion-tokens", chat(max_completion_tokens=9_000), 400, "context_length_exceeded",
     "max_completion_tokens"),
]

RAW_CASES: list[tuple[str, bytes, int, str, str | None]] = [
    ("invalid-json", b'{"model": "skulk/tiny-qwen2", "messages": [', 400, "invalid_json", None),
    ("not-json", b"model=skulk", 400, "invalid_json", None),
    ("empty-body", b"", 400, "invalid_json", None),
    ("invalid-utf8", b'{"model": "skulk/tiny-qwen2", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400,
     "invalid_encoding", None),
    ("deep-nesting", b'{"model": "m", "extra": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400, "nesting_too_deep", None),
    ("deep-nesting-in-field", b'{"model": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400, "invalid_type", "model"),
    ("too-large", b'{"model": "' + b"x" * (TEST_BODY_LIMIT + 1) + b'"}', 413, "request_too_large", None),
]


def _serves_again(client: TestClient, node: ScriptedNode) -> None:
    before = len(node.tasks_submitted())
    r = client.post("/v1/chat/completions", json=GOOD_CHAT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello, world!"
    assert len(node.tasks_submitted()) == before + 1


@pytest.mark.parametrize(("body", "status", "code", "param"), [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES])
def test_bad_chat_request_is_refused_before_dispatch(
    client: TestClient, node: ScriptedNode, body: Any, status: int, code: str, param: str | None
) -> None:
    r = client.post("/v1/chat/completions", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = assert_envelope(r.json(), code=code, param=param)
    assert err["type"] == "invalid_request_error"
    assert node.tasks_submitted() == [], "an invalid request must never reach the node"
    _serves_again(client, node)


@pytest.mark.parametrize(("raw", "status", "code", "param"), [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
def test_malformed_body_is_refused(client: TestClient, node: ScriptedNode, raw: bytes, status: int, code: str, param: str | None) -> None:
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert_envelope(r.json(), code=code, param=param)
    assert node.tasks_submitted() == []
    _serves_again(client, node)


def test_context_refusal_message_has_the_published_prefix(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=chat(max_tokens=8193))
    err = r.json()["error"]
    assert r.status_code == 400
    assert err["message"].startswith("context_length_exceeded:"), err
    assert "8192" in err["message"], "the refusal states the ceiling"
    # At the ceiling it fits (nothing is known about the prompt before dispatch).
    assert client.post("/v1/chat/completions", json=chat(max_tokens=8192)).status_code == 200


def test_oversized_declared_length_is_refused_without_reading(client: TestClient, node: ScriptedNode) -> None:
    r = client.post("/v1/chat/completions", content=b"{}", headers={"content-length": str(TEST_BODY_LIMIT * 4)})
    assert r.status_code == 413, r.text
    assert "over this node's limit" in r.json()["error"]["message"]


def test_unknown_model_is_404(client: TestClient, node: ScriptedNode) -> None:
    r = client.post("/v1/chat/completions", json=chat(model="nobody/knows-this"))
    assert r.status_code == 404, r.text
    err = assert_envelope(r.json(), code="model_not_found", param="model")
    assert "nobody/knows-this" in err["message"]
    assert node.tasks_submitted() == []


def test_known_but_unplaced_model_is_404_from_the_master(client: TestClient, node: ScriptedNode) -> None:
    # A card exists, so the request goes to the master, which knows no instance.
    r = client.post("/v1/chat/completions", json=chat(model="big/huge-405b"))
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "model_not_found"
    assert "place_instance" in r.json()["error"]["message"]


COMPLETION_CASES: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("no-prompt", {"model": MODEL}, 400, "missing_field", "prompt"),
    ("empty-prompt", {"model": MODEL, "prompt": ""}, 400, "invalid_value", "prompt"),
    ("token-prompt", {"model": MODEL, "prompt": [1, 2, 3]}, 400, "invalid_type", "prompt[0]"),
    ("two-prompts", {"model": MODEL, "prompt": ["a", "b"]}, 400, "invalid_value", "prompt"),
    ("echo", {"model": MODEL, "prompt": "a", "echo": True}, 400, "unsupported_value", "echo"),
    ("logprobs-bool", {"model": MODEL, "prompt": "a", "logprobs": True}, 400, "invalid_type", "logprobs"),
    ("max-tokens-zero", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("unknown-model", {"model": "x/y", "prompt": "a"}, 404, "model_not_found", "model"),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), [c[1:] for c in COMPLETION_CASES], ids=[c[0] for c in COMPLETION_CASES])
def test_bad_completion_request(client: TestClient, node: ScriptedNode, body: dict[str, Any], status: int, code: str, param: str | None) -> None:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert_envelope(r.json(), code=code, param=param)
    assert node.tasks_submitted() == []


PLACE_CASES: list[tuple[str, Any, int, str, str | None]] = [
    ("no-model", {}, 400, "missing_field", "model_id"),
    ("min-nodes-zero", {"model_id": MODEL, "min_nodes": 0}, 400, "invalid_value", "min_nodes"),
    ("bad-sharding", {"model_id": MODEL, "sharding": "Diagonal"}, 400, "invalid_value", "sharding"),
    ("bad-meta", {"model_id": MODEL, "instance_meta": "Carrier pigeon"}, 400, "invalid_value", "instance_meta"),
    ("excluded-string", {"model_id": MODEL, "excluded_nodes": "node-a"}, 400, "invalid_type", "excluded_nodes"),
    ("unknown-model", {"model_id": "x/y"}, 404, "model_not_found", "model_id"),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), [c[1:] for c in PLACE_CASES], ids=[c[0] for c in PLACE_CASES])
def test_bad_place_request(client: TestClient, node: ScriptedNode, body: Any, status: int, code: str, param: str | None) -> None:
    before = len(node.submitted)
    r = client.post("/place_instance", json=body)
    assert r.status_code == status, r.text
    assert_envelope(r.json(), code=code, param=param)
    assert len(node.submitted) == before, "an invalid placement never reaches the master"


def test_routes_and_methods_use_the_envelope(client: TestClient) -> None:
    r = client.get("/v2/nothing")
    assert r.status_code == 404
    assert_envelope(r.json(), code="not_found", param=None)
    r = client.put("/state")
    assert r.status_code == 405, r.text
    assert_envelope(r.json(), code="method_not_allowed", param=None)
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405
    assert_envelope(r.json(), code="method_not_allowed", param=None)
