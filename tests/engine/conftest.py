"""Shared fixtures for the engine tests: one generated model, loaded once per session.

The default preset is generated once per session into a temporary models
root, so tests never touch the user's data directory. Runner subprocesses get
their own ``SKULK_HOME`` (the fast-BLAS shim cache lives there).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from skulk.engine.client import RunnerProcess
from skulk.engine.models import TINY_MODEL_ID, ensure_model


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.engine.helpers import session_models_root

    return session_models_root(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_path(models_root: Path) -> Path:
    return ensure_model(TINY_MODEL_ID, root=models_root)


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


@pytest.fixture(scope="session")
def single_runner(tiny_path: Path, runner_env: dict[str, str]) -> Iterator[RunnerProcess]:
    """One single-process runner (ceiling 1024, 4 concurrent), shared by modules."""
    from skulk.core.instances import RunnerReady
    from tests.engine.helpers import make_spec

    proc = RunnerProcess.spawn(make_spec(context_ceiling=1024, max_concurrent=4), tiny_path, env=runner_env)
    try:
        proc.wait_for_status(RunnerReady, 120)
        yield proc
    finally:
        proc.kill()
