"""Where Skulk keeps its data on disk.

Resolution order for the data directory:

1. ``SKULK_HOME`` (or the legacy ``EXO_HOME``) when set;
2. ``~/.skulk`` when it exists;
3. ``~/.exo`` when it exists (an upgrade from exo keeps its data);
4. on macOS ``~/.skulk``; elsewhere ``$XDG_DATA_HOME/skulk`` (default
   ``~/.local/share/skulk``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["data_dir", "models_dir"]


def data_dir() -> Path:
    for var in ("SKULK_HOME", "EXO_HOME"):
        value = os.environ.get(var)
        if value:
            return Path(value).expanduser()
    home = Path.home()
    for candidate in (home / ".skulk", home / ".exo"):
        if candidate.is_dir():
            return candidate
    if sys.platform == "darwin":
        return home / ".skulk"
    xdg = os.environ.get("XDG_DATA_HOME") or str(home / ".local" / "share")
    return Path(xdg) / "skulk"


def models_dir() -> Path:
    """Local model directories (mlx-lm format), one folder per model id."""
    value = os.environ.get("SKULK_MODELS_DIR") or os.environ.get("EXO_MODELS_DIR")
    if value:
        return Path(value).expanduser()
    return data_dir() / "models"
