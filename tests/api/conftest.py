"""Fixtures for the API tests: the app over the core-backed node double, in-process or on a real socket."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.testclient import TestClient

from skulk.api.app import create_app
from skulk.api.config import ApiConfig
from tests.api.node_double import ScriptedNode

TEST_BODY_LIMIT = 64 * 1024


@pytest.fixture
def node() -> ScriptedNode:
    """Three nodes, the tiny model placed and its runner ready."""
    n = ScriptedNode.three_nodes()
    n.place("skulk/tiny-qwen2")
    return n


@pytest.fixture
def api_config() -> ApiConfig:
    return ApiConfig(max_body_bytes=TEST_BODY_LIMIT, max_output_tokens=4096)


@pytest.fixture
def client(node: ScriptedNode, api_config: ApiConfig) -> Iterator[TestClient]:
    with TestClient(create_app(node, config=api_config), raise_server_exceptions=False) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedApp:
    """A uvicorn server in a thread, serving ``create_app(node)`` on a loopback port."""

    def __init__(self, node: ScriptedNode, config: ApiConfig) -> None:
        self.node = node
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(node, config=config), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServedApp:
        self.thread.start()
        deadline = time.monotonic() + 10.0
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
            assert self.thread.is_alive(), "uvicorn exited during start-up"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10.0)
        assert not self.thread.is_alive(), "uvicorn did not stop within 10 s"


@pytest.fixture
def served(node: ScriptedNode, api_config: ApiConfig) -> Iterator[ServedApp]:
    with ServedApp(node, api_config) as s:
        yield s


from tests.api.agent_node import agent_node  # noqa: E402,F401 - the shared real node of the agent-API tests
