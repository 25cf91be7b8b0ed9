"""Session-wide fixtures shared across the test packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.models import import_default_model


@pytest.fixture(scope="session")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default model (SmolLM2-135M-Instruct), imported from its wheel once per session."""
    return import_default_model(tmp_path_factory.mktemp("default-model") / "models")
