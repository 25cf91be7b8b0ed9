"""One real node for the agent-API tests: the embedded default model and the random-weight
``skulk/tiny-qwen2`` both placed, API keys on.

Shared by ``test_agent_openai.py``, ``test_agent_dialects.py`` and ``test_api_keys.py`` through
the ``agent_node`` fixture (session-scoped: a node and its runners start once, about 20 s).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from skulk.engine.models import DEFAULT_MODEL_ID, ensure_model
from tests.support.cluster import start_cluster, wait_for

RANDOM_MODEL = "skulk/tiny-qwen2"
# Every model the forced-call tests run on: the random-weight model, and the default model
# (the same one until the default becomes a real instruct model).
MODELS = sorted({RANDOM_MODEL, DEFAULT_MODEL_ID})
API_KEY = "sk-skulk-user-test-key-0123456789"
ADMIN_KEY = "sk-skulk-admin-test-key-9876543210"

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country", "maxLength": 48},
        "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "units"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Current weather at a place", "parameters": WEATHER_PARAMETERS},
}
REPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "temperature_c": {"type": "integer", "minimum": -90, "maximum": 60},
        "conditions": {"type": "string", "enum": ["sunny", "cloudy", "rain", "snow"]},
    },
    "required": ["city", "temperature_c", "conditions"],
    "additionalProperties": False,
}


@dataclass
class AgentNode:
    url: str

    def http(self, key: str | None = API_KEY, timeout_s: float = 120.0) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)


def _ready(url: str, instance_id: str) -> bool:
    state = httpx.get(url + "/state", timeout=5, headers={"authorization": f"Bearer {API_KEY}"}).json()
    inst = state["instances"].get(instance_id)
    if inst is None:
        return False
    (body,) = inst.values()
    runners = body["shardAssignments"]["nodeToRunner"].values()
    return all("RunnerReady" in state["runners"].get(r, {}) for r in runners)


@pytest.fixture(scope="session")
def agent_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentNode]:
    base = tmp_path_factory.mktemp("agent-node")
    models = tmp_path_factory.mktemp("agent-models") / "models"
    for model in MODELS:
        ensure_model(model, root=models)
    # Keys from a file (one per line, "admin:" marks an admin key): control needs the admin key.
    (base / "api-keys.txt").write_text(f"# test keys\n{API_KEY}\nadmin:{ADMIN_KEY}\n")
    env = {"SKULK_API_KEYS_FILE": str(base / "api-keys.txt")}
    with start_cluster(base, 1, models_dir=models, extra_env=env) as cluster:
        (plan,) = cluster.plans
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        wait_for(
            "the node to elect itself and report memory",
            lambda: (s := httpx.get(plan.url + "/state", timeout=5, headers=admin).json())["session"]
            and plan.node_id in s["nodeMemory"],
            60,
        )
        for model in MODELS:
            r = httpx.post(plan.url + "/place_instance", json={"model_id": model}, timeout=60, headers=admin)
            assert r.status_code == 200, r.text
            iid = r.json()["instance_id"]
            wait_for(f"the {model} runner to be ready", lambda: _ready(plan.url, iid), 180, interval_s=0.25)
        yield AgentNode(url=plan.url)
