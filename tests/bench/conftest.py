"""Fixtures for the tools' tests: the generated models, shared with the engine tests.

Models are generated into the session's shared root (``session_models_root``),
so a run of the whole suite makes each one once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from skulk.engine.speculative.models import SPEC_TINY, ensure_spec_models
from tests.engine.helpers import session_models_root


@pytest.fixture(scope="session")
def spec_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The generated speculation pair (``SPEC_TINY``): target with MTP heads, and its draft."""
    return ensure_spec_models(SPEC_TINY, root=session_models_root(tmp_path_factory))
