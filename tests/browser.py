"""What the browser tests share: finding the system Chromium and launching it headless through Playwright (which
downloads no browser: it drives the one found, by its path).

Without Chromium or Playwright a browser test skips with the reason, except where MASKRCNN_REQUIRE_BROWSER=1 (set
by `.ci/run`): there a missing browser is a failure, so CI cannot pass without running the browser tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

REQUIRE_BROWSER_ENV = "MASKRCNN_REQUIRE_BROWSER"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless, no sandbox (CI runs as root), and nothing that reaches the network or a GPU.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
HOW_TO_GET_ONE = ("install one, e.g. `sudo apt-get install chromium` (the tests drive the system browser, "
                  "they download none)")


def browser_required() -> bool:
    return os.environ.get(REQUIRE_BROWSER_ENV, "") == "1"


def find_chromium() -> str | None:
    """The path of the first Chromium or Chrome on PATH, or None."""
    return next((path for path in map(shutil.which, BROWSERS) if path is not None), None)


def _missing(reason: str) -> None:
    if browser_required():
        pytest.fail(f"{REQUIRE_BROWSER_ENV}=1 and {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (a Playwright `Browser`) with a new empty profile, closed on exit. Skips the test
    without Chromium or Playwright; fails instead where MASKRCNN_REQUIRE_BROWSER=1."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("no Playwright to drive the browser: pip install playwright (the `test` extra)")
    executable = find_chromium()
    if executable is None:
        _missing(f"no Chromium found on PATH ({', '.join(BROWSERS)}): {HOW_TO_GET_ONE}")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(profile, executable_path=executable, args=list(FLAGS),
                                                            headless=True)
        try:
            yield context
        finally:
            context.close()
