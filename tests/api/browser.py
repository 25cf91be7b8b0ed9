"""Driving Debian's Chromium with Playwright: no browser download, screenshots kept under artifacts/."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("SKULK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "dashboard"


def require_chromium() -> None:
    """Skip (with the fix in the reason) when Chromium or Playwright is missing."""
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"{CHROMIUM} missing: run scripts/bootstrap.sh as root (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api")


@contextmanager
def chromium_page(base_url: str, *, expected_errors: tuple[str, ...] = ()) -> Iterator[object]:
    """A fresh page on ``base_url``; console errors fail the test at exit.

    ``expected_errors``: substrings of console errors the test provokes on purpose
    (the browser itself logs every 401 answer as an error).
    """
    from playwright.sync_api import sync_playwright

    require_chromium()
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, base_url=base_url)
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page
        finally:
            browser.close()
    unexpected = [e for e in errors if not any(x in e for x in expected_errors)]
    assert not unexpected, f"the dashboard logged errors: {unexpected}"


def screenshot(page: object, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    assert path.stat().st_size > 1000, path
    return path
