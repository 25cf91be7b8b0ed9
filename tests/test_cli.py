"""The ``skulk`` command's version: one definition, shown everywhere, recorded in the changelog."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import skulk

ROOT = Path(__file__).resolve().parents[1]


def test_skulk_version_prints_the_installed_package_version() -> None:
    exe = Path(sys.executable).parent / "skulk"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"skulk {version('skulk')}"
    assert version("skulk") == skulk.__version__, "pyproject takes its version from skulk/__init__.py"


def test_the_changelog_records_the_current_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$", text, flags=re.M)
    assert released, "no released version in CHANGELOG.md"
    assert skulk.__version__ in {v for v, _ in released}, (skulk.__version__, released)
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)
    assert headings[0] in ("Unreleased", skulk.__version__), "newest first"
