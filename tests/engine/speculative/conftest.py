"""The generated speculation pair (``SPEC_TINY``), made once per session and loaded once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from skulk.engine.speculative.models import SPEC_TINY, ensure_spec_models


@pytest.fixture(scope="session")
def spec_dirs(models_root: Path) -> tuple[Path, Path]:
    return ensure_spec_models(SPEC_TINY, root=models_root)


@pytest.fixture(scope="session")
def spec_loaded(spec_dirs: tuple[Path, Path]) -> Any:
    from skulk.engine.shard import load_shard

    return load_shard(spec_dirs[0], None, None)
