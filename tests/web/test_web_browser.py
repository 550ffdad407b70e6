"""The history pages in a real browser: Debian's headless Chromium, driven by Playwright,
against the real ``audience-sync ui`` and a real ``report --html`` file.

The browser is the distribution's (``/usr/bin/chromium``; ``.ci/run`` installs it): nothing is
downloaded. Without it the test is skipped locally but fails under CI (``CI=true``), as the
PostgreSQL half of the suite does. Screenshots go to ``artifacts/`` (ignored by git).
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, cli
from history_seed import EVIL, Seeded, seed_history

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


def _browser_missing(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why}: the browser test cannot be skipped in CI")
    pytest.skip(why)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A fresh Chromium profile; every request it makes is recorded, any off 127.0.0.1 aborted."""
    if not CHROMIUM.exists():
        _browser_missing(f"{CHROMIUM} not found (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _browser_missing("playwright is not installed (pip install '.[test]')")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=ARGS,
            viewport={"width": 1200, "height": 860},
        )
        context.requests = []  # type: ignore[attr-defined]
        context.errors = []  # type: ignore[attr-defined]

        def guard(route: Any) -> None:
            url = route.request.url
            context.requests.append(url)  # type: ignore[attr-defined]
            parsed = urllib.parse.urlsplit(url)
            local = parsed.scheme == "file" or parsed.hostname == "127.0.0.1"
            route.continue_() if local else route.abort()

        context.route("**/*", guard)
        context.on("weberror", lambda e: context.errors.append(str(e.error)))  # type: ignore[attr-defined]
        try:
            yield context
        finally:
            context.close()


def _watch(page: Any, context: Any) -> None:
    page.on(
        "console",
        lambda m: (
            context.errors.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning")
            else None
        ),
    )
    page.on("requestfailed", lambda r: context.errors.append(f"failed: {r.url}"))


@pytest.fixture
def ui(tmp_path: Path) -> Iterator[tuple[Seeded, str]]:
    """The seeded history (SQLite) served by the real ``audience-sync ui`` on a free port."""
    seeded = seed_history(tmp_path, f"sqlite:///{tmp_path / 'state.db'}")
    with subprocess.Popen(
        [
            str(Path(sys.executable).parent / "audience-sync"),
            *("ui", "--port", "0", "--config", str(seeded.config_path)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("serving http://127.0.0.1:"), line
            yield seeded, line.split()[1]
        finally:
            proc.terminate()
            proc.wait(timeout=60)


# The history is seeded (by syncs, which run their own event loop) before Playwright's loop
# starts: `ui` and `report` come before `browser` in each test's arguments.


def test_pages_render_in_chromium_with_real_charts_and_no_outside_request(
    ui: tuple[Seeded, str], browser: Any
) -> None:
    seeded, base = ui
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page()
    _watch(page, browser)

    page.goto(base)
    assert page.locator("tr.health-row").count() == 2
    strip = page.locator('tr.health-row[data-key="paying_customers"] .cell')
    assert strip.count() == seeded.runs["paying_customers"]
    classes = [strip.nth(i).get_attribute("class") for i in range(strip.count())]
    assert classes[-1] == "cell bad" and "cell ok" in classes  # red and green in the strip
    box = strip.nth(0).bounding_box()
    assert box is not None and box["width"] >= 6 and box["height"] >= 12
    page.screenshot(path=str(ARTIFACTS / "ui-health.png"))

    page.goto(base + "runs?window=all")
    for key, n in seeded.runs.items():
        card = page.locator(f'article.audience[data-key="{key}"]')
        charts = card.locator("svg.plot")
        assert charts.count() == 2
        for i in range(2):
            chart = charts.nth(i)
            size = chart.bounding_box()
            assert size is not None and size["width"] > 300 and size["height"] > 80
            hits = chart.locator("g.point rect.hit")
            assert hits.count() == n
            for j in range(n):
                hit = hits.nth(j).bounding_box()
                assert hit is not None and hit["width"] > 2 and hit["height"] > 50
        # The first (initial) run delivered every member: a visible green bar.
        bar = card.locator("svg.plot").nth(1).locator("g.point").first.locator("rect.delivered")
        drawn = bar.bounding_box()
        assert drawn is not None and drawn["height"] > 20
    page.screenshot(path=str(ARTIFACTS / "ui-runs.png"), full_page=True)

    # Clicking a bar opens that run (a plain SVG link: no script anywhere).
    page.locator('article.audience[data-key="paying_customers"] svg.plot').first.locator(
        "g.point a"
    ).nth(1).click()
    page.wait_for_url(f"**/runs/{seeded.failed_run}")
    assert page.locator("table.reasons").inner_text().count("failed") >= 1
    assert EVIL in page.locator("body").inner_text()  # shown as text, never run
    page.goto(base + f"runs/{seeded.rejected_run}")
    assert "user_id is empty" in page.locator("table.rejected").inner_text()

    page.goto(base + "user")
    page.fill("input[name=id]", seeded.user)
    page.click("button[type=submit]")
    rows = page.locator("table.changes tr.change")
    assert rows.count() == 3
    log = [rows.nth(i).inner_text() for i in range(3)]
    assert "failed" in log[1] and "server_error" in log[1]
    assert all("Paying Customers" in r for r in log)
    page.screenshot(path=str(ARTIFACTS / "ui-user.png"))

    for path in ("quota", "retry"):
        page.goto(base + path)
        assert page.locator("main h1").count() >= 1

    assert browser.errors == []
    outside = [u for u in browser.requests if urllib.parse.urlsplit(u).hostname != "127.0.0.1"]
    assert browser.requests and outside == []


@pytest.fixture
def report(tmp_path: Path) -> tuple[Seeded, Path]:
    seeded = seed_history(tmp_path, f"sqlite:///{tmp_path / 'state.db'}")
    out = tmp_path / "report.html"
    done = cli("report", "--config", str(seeded.config_path), "--html", str(out))
    assert done.returncode == 0, done.stderr
    return seeded, out


def test_report_file_renders_offline(report: tuple[Seeded, Path], browser: Any) -> None:
    seeded, out = report
    page = browser.new_page()
    _watch(page, browser)
    page.goto(out.as_uri())
    for key, n in seeded.runs.items():
        hits = page.locator(f'article.audience[data-key="{key}"] svg.plot g.point rect.hit')
        assert hits.count() == 2 * n
        box = hits.first.bounding_box()
        assert box is not None and box["height"] > 50
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    page.screenshot(path=str(ARTIFACTS / "report-top.png"))  # health and runs: the README's
    assert browser.errors == []
    assert browser.requests == [out.as_uri()]
