from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cluster import shared_models_dir
from tests.support.hub import build_hub


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with the embedded default model, generated once per session."""
    return shared_models_dir(tmp_path_factory.mktemp("models-root"))


@pytest.fixture(scope="session")
def hub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local hub's repositories (the generated test models), built once per session.

    Generated apart from ``models_dir``, which other tests expect to hold the default model only.
    """
    return build_hub(tmp_path_factory.mktemp("hub"), tmp_path_factory.mktemp("hub-generated"))
