"""Shared fixtures for the engine tests: one generated model, loaded once per session.

The default preset is generated once per session into a temporary models
root, so tests never touch the user's data directory. Runner subprocesses get
their own ``SKULK_HOME`` (the fast-BLAS shim cache lives there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from skulk.engine.models import DEFAULT_MODEL_ID, ensure_model


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_path(models_root: Path) -> Path:
    return ensure_model(DEFAULT_MODEL_ID, root=models_root)


@pytest.fixture(scope="session")
def runner_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment additions for runner subprocesses."""
    home = tmp_path_factory.mktemp("skulk-home")
    return {"SKULK_HOME": str(home), "SKULK_RUNNER_HEARTBEAT_SECONDS": "0.5"}


@pytest.fixture(scope="session")
def loaded(tiny_path: Path) -> Any:
    """The default model loaded in this process (a world of one)."""
    from skulk.engine.shard import load_shard

    return load_shard(tiny_path, None, None)
