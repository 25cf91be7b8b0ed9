"""API keys (issue 13): every endpoint but /healthz needs a key, in each dialect's own header, and a
missing or wrong key is 401 in that dialect's own error shape; control needs the admin key; failed
attempts are rate-limited; keys compare in constant time (digests, no early exit).

The real-node tests share the agent node (keys from a keys file); the unit tests run the guard
in-process over the node double.
"""

from __future__ import annotations

from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from starlette.testclient import TestClient

from skulk.api.app import create_app
from skulk.api.config import ApiConfig
from skulk.api.keys import ApiKeys, load_api_keys
from tests.api.agent_node import ADMIN_KEY, API_KEY, RANDOM_MODEL, AgentNode
from tests.api.node_double import ScriptedNode

WRONG = "sk-this-key-is-not-configured-000"
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.cluster
def test_openai_client_with_a_wrong_key_gets_401(agent_node: AgentNode) -> None:
    client = openai.OpenAI(base_url=agent_node.url + "/v1", api_key=WRONG, max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model=RANDOM_MODEL, messages=HI, max_tokens=2)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    ok = openai.OpenAI(base_url=agent_node.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert ok.chat.completions.create(model=RANDOM_MODEL, messages=HI, max_tokens=2).choices[0].finish_reason


@pytest.mark.cluster
def test_anthropic_client_with_a_wrong_key_gets_401(agent_node: AgentNode) -> None:
    client = anthropic.Anthropic(base_url=agent_node.url, api_key=WRONG, max_retries=0, timeout=30)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        client.messages.create(model=RANDOM_MODEL, max_tokens=2, messages=HI)
    assert refused.value.status_code == 401
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "authentication_error"
    ok = anthropic.Anthropic(base_url=agent_node.url, api_key=API_KEY, max_retries=0, timeout=60)  # the x-api-key header
    assert ok.messages.create(model=RANDOM_MODEL, max_tokens=2, messages=HI).stop_reason


@pytest.mark.cluster
def test_ollama_client_with_a_wrong_key_gets_401(agent_node: AgentNode) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=agent_node.url, headers={"authorization": f"Bearer {WRONG}"}).chat(model=RANDOM_MODEL, messages=HI, stream=False)
    assert refused.value.status_code == 401 and "API key" in refused.value.error
    ok = ollama.Client(host=agent_node.url, headers={"authorization": f"Bearer {API_KEY}"})
    assert ok.chat(model=RANDOM_MODEL, messages=HI, options={"num_predict": 2}, stream=False).done


@pytest.mark.cluster
def test_no_key_gets_401_in_each_dialects_shape(agent_node: AgentNode) -> None:
    # The official clients refuse to send a request without a key, so plain HTTP shows this case.
    with httpx.Client(base_url=agent_node.url, timeout=30) as h:
        r = h.post("/v1/chat/completions", json={"model": RANDOM_MODEL, "messages": HI})
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = h.post("/v1/responses", json={"model": RANDOM_MODEL, "input": "hi"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = h.post("/v1/messages", json={"model": RANDOM_MODEL, "max_tokens": 2, "messages": HI})
        assert r.status_code == 401 and r.json() == {"type": "error", "error": {"type": "authentication_error", "message": r.json()["error"]["message"]}}
        r = h.post("/api/chat", json={"model": RANDOM_MODEL, "messages": HI})
        assert r.status_code == 401 and set(r.json()) == {"error"}
        assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.cluster
def test_health_is_open_control_needs_the_admin_key(agent_node: AgentNode) -> None:
    assert httpx.get(agent_node.url + "/healthz", timeout=10).json()["status"] == "ok"
    assert httpx.get(agent_node.url + "/state", timeout=10).status_code == 401
    with agent_node.http(API_KEY) as h:
        assert h.get("/state").status_code == 200
        refused = h.delete("/instance/inst-does-not-exist")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_permissions"
    with agent_node.http(ADMIN_KEY) as h:
        assert h.delete("/instance/inst-does-not-exist").status_code == 404  # past the guard: a real lookup


# --- in-process --------------------------------------------------------------------------------


def _client(keys: ApiKeys, *, auth_failures_max: int = 10, auth_window_s: float = 60.0) -> TestClient:
    node = ScriptedNode.three_nodes()
    node.place("skulk/tiny-qwen2")
    config = ApiConfig(keys=keys, auth_failures_max=auth_failures_max, auth_window_s=auth_window_s)
    return TestClient(create_app(node, config=config), raise_server_exceptions=False)


def test_failed_attempts_are_rate_limited_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    client = _client(ApiKeys.of([API_KEY]), auth_failures_max=3, auth_window_s=60.0)
    for _ in range(3):
        assert client.get("/v1/models", headers={"authorization": f"Bearer {WRONG}"}).status_code == 401
    blocked = client.get("/v1/models", headers={"authorization": f"Bearer {API_KEY}"})
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
    assert blocked.json()["error"]["code"] == "rate_limit_exceeded"
    refusals = [r for r in caplog.records if r.name == "skulk.api.keys" and "wrong API key" in r.getMessage()]
    assert len(refusals) == 3 and all(WRONG not in r.getMessage() for r in refusals)


def test_dashboard_page_loads_without_a_key_but_its_data_does_not() -> None:
    client = _client(ApiKeys.of([API_KEY]))
    assert client.get("/", headers={"accept": "text/html"}).status_code == 200
    assert client.get("/chat", headers={"accept": "text/html"}).status_code == 200  # a client-side route
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/state", headers={"accept": "text/html"}).status_code == 401  # data, even for a browser
    assert client.get("/state", headers={"x-api-key": API_KEY}).status_code == 200


def test_no_keys_means_open_and_keys_file_format(tmp_path: Path) -> None:
    assert _client(ApiKeys()).get("/state").status_code == 200
    path = tmp_path / "keys"
    path.write_text(f"# comment\n\n{API_KEY}\nadmin:{ADMIN_KEY}\n")
    keys = load_api_keys(keys_file=path)
    assert keys.role(API_KEY) == "user" and keys.role(ADMIN_KEY) == "admin" and keys.role(WRONG) is None and keys.role("") is None
    with pytest.raises(ValueError, match="at least 16"):
        load_api_keys(["short"])
    assert ApiConfig.from_env({"SKULK_API_KEYS": f"{API_KEY},{WRONG}"}).keys.role(WRONG) == "user"


def test_start_up_warning_only_for_an_exposed_api_without_keys() -> None:
    from skulk.api.keys import exposure_warning

    assert exposure_warning("0.0.0.0", 52415, ApiKeys()) is not None
    assert "no API keys" in (exposure_warning("192.168.1.10", 52415, ApiKeys()) or "")
    assert exposure_warning("my-host.local", 52415, ApiKeys()) is not None
    for loopback in ("127.0.0.1", "127.0.0.3", "::1", "localhost"):
        assert exposure_warning(loopback, 52415, ApiKeys()) is None, loopback
    assert exposure_warning("0.0.0.0", 52415, ApiKeys.of([API_KEY])) is None
