"""Headless Chromium from Debian's packages (/usr/bin/chromium), driven by Playwright for
Python: nothing is downloaded. A report page is opened from its file with every request to a
network refused and kept, so a test can say the page asked for none."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import hosts

CHROMIUM = "/usr/bin/chromium"
# As root Chromium needs --no-sandbox; without the background-networking flags it reaches for
# Google's hosts at every start (this machine's network refuses them).
ARGUMENTS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-extensions"]
# Screenshots a test takes are kept here (CI's clone keeps them after the run).
ARTIFACTS = Path(os.environ.get("HSM_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """The browser, for a `with` block. Not a session fixture: Playwright's sync API holds an
    event loop in this thread while it runs, and the launcher run in the tests' own process
    needs the thread's loop."""
    hosts.require(missing(), "the report page's tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        started = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGUMENTS)
        try:
            yield started
        finally:
            started.close()


def missing() -> list[str]:
    found = []
    if not shutil.which(CHROMIUM):
        found.append("chromium (Debian's package)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        found.append("playwright (pip)")
    return found


@dataclass
class Opened:
    """A report page as the browser drew it."""

    page: Any  # playwright's Page
    seconds: float  # from asking for the page to the page drawn (its script's last step)
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions
    requests: list[str] = field(default_factory=list)  # what it asked of a network (refused)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def open_page(browser: Any, path: Path, width: int = 1300) -> Opened:
    """Open the page at `path` in a new tab of `browser` and wait until it is drawn."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    opened = Opened(page, 0.0)

    def route(found: Any) -> None:
        if found.request.url.startswith(("file:", "data:")):
            found.continue_()
        else:
            opened.requests.append(found.request.url)
            found.abort()

    context.route("**/*", route)
    page.on("console", lambda message: opened.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: opened.errors.append(str(error)))
    began = time.perf_counter()
    page.goto(path.absolute().as_uri())
    page.wait_for_function("document.documentElement.dataset.rendered === 'true'", timeout=30_000)
    opened.seconds = time.perf_counter() - began
    return opened


def shown_attempts(opened: Opened) -> list[tuple[int, int, str, str]]:
    """Each attempt element's data-job, data-attempt, data-source and data-outcome."""
    found = opened.page.eval_on_selector_all(
        "g.attempt", "gs => gs.map(g => [g.dataset.job, g.dataset.attempt, g.dataset.source, g.dataset.outcome])")
    return [(int(job), int(attempt), source, outcome) for job, attempt, source, outcome in found]


def in_data(data: dict[str, Any]) -> list[tuple[int, int, str, str]]:
    """The same of each attempt in the page's data."""
    return [(row["job"], row["attempt"], row["source"], row["outcome"]) for row in data["attempts"]]


def embedded_data(opened: Opened) -> dict[str, Any]:
    """The data the page embeds (#hsm-report-data)."""
    return dict(json.loads(opened.page.eval_on_selector("#hsm-report-data", "e => e.textContent")))


def report_shown(chromium: Any, sweep_dir: Path) -> tuple[dict[str, Any], Opened]:
    """`hsm distributed report SWEEP_DIR` run as a user would, its page opened: the data, and the
    page, whose attempt elements are checked to be the data's, with no error and no request."""
    written = subprocess.run([sys.executable, "-m", "hsm_core.cli", "distributed", "report", str(sweep_dir)],
                             capture_output=True, text=True, timeout=60)
    assert written.returncode == 0, written.stderr
    opened = open_page(chromium, sweep_dir / ".hsm" / "report.html")
    data = embedded_data(opened)
    assert sorted(shown_attempts(opened)) == sorted(in_data(data))
    assert opened.errors == [] and opened.requests == []
    return data, opened
