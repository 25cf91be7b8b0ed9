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


def test_skulk_models_summarises_copies_progress_disks_and_errors() -> None:
    from skulk.models_status import summarise_copies

    state = {
        "nodeIdentities": {"n1": {"friendlyName": "alpha"}, "n2": {"friendlyName": "bravo"}},
        "nodeDisk": {"n1": {"totalBytes": 500e9, "freeBytes": 200e9, "modelsBytes": 40e9, "budgetBytes": 100e9}},
        "modelCopies": {
            "n1": {"org/big": {"status": "verified", "source": "hub", "bytes": 40e9,
                               "coverage": {"nLayers": 80, "layers": [[0, 80]], "head": True}}},
            "n2": {"org/big": {"status": "downloading", "source": "peer:n1", "doneBytes": 5e9, "totalBytes": 20e9,
                               "rateBps": 1e9, "etaS": 15, "coverage": {"nLayers": 80, "layers": [], "head": False}},
                   "org/other": {"status": "failed", "source": "hub", "error": "disk_full: needs 4.2 GB, has 1.1 GB",
                                 "coverage": {"nLayers": 0, "layers": [], "head": False}}},
        },
    }
    text = summarise_copies(state)
    assert "n1 (alpha): disk 200.0 GB free of 500.0 GB, models 40.0 GB, budget 100.0 GB" in text
    assert "org/big: verified from hub; the whole model; 40.0 GB" in text
    assert "org/big: downloading from peer:n1; nothing verified yet; 5.0 GB of 20.0 GB (25 %), 1.0 GB/s, ETA 15 s" in text
    assert "n2 (bravo): disk not reported" in text and "error: disk_full: needs 4.2 GB, has 1.1 GB" in text
    assert summarise_copies({}) == "no node has reported model files yet"
