from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cluster import shared_models_dir


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with the embedded default model, generated once per session."""
    return shared_models_dir(tmp_path_factory.mktemp("models-root"))
