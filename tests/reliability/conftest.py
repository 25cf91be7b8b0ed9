"""Fixtures for the reliability smoke tests (issue 8): real node processes, Locust, real traces.

Every test here starts real nodes; the whole directory runs in a few minutes
on 2 cores and can be selected with ``-m reliability`` (or left out with
``-m "not reliability"``). The full versions run from ``python -m loadtests.report``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.cluster import models_dir


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability: issue 8 smoke runs on real processes (Locust, storms, failover, fuzzing)")


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with the embedded default model, generated once per session."""
    return models_dir(tmp_path_factory.mktemp("reliability-models"))


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    """Where a test keeps its Locust reports and traces: ``artifacts/reliability/tests/<test>``."""
    root = Path(__file__).resolve().parents[2] / "artifacts" / "reliability" / "tests" / request.node.name
    root.mkdir(parents=True, exist_ok=True)
    return root
