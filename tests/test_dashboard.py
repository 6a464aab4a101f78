"""The dashboard at GET /: its files are served by spotbox, and a real browser shows the fleet live."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from spotbox.settings import Settings
from tests.conftest import Box, BoxFactory, unavailable
from tests.helpers import mqtt_client, payload

SERIAL = "DASH-001"
# Generous: a cold chromium on a busy 2-core machine; a pass never waits this long.
UI_TIMEOUT_MS = 15_000


@pytest.fixture
async def sqlite_box(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox on port 0 over a real SQLite file: the page does not depend on the backend."""
    return await make_box(
        Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'spotbox.db'}", batch_wait_ms=1.0)
    )


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's chromium, headless, driven by Playwright (no browser download)."""
    path = shutil.which("chromium")
    if path is None:
        unavailable("chromium is not installed (apt-get install chromium)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=path, headless=True)
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser: Browser, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    """A page that fails the test on a script error or a request to another origin; it leaves a screenshot."""
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    urls: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: urls.append(request.url))
    yield page
    # Works offline, no CDN: every request the page made went to spotbox itself.
    assert urls, "the page made no request"
    assert [url for url in urls if not url.startswith("http://127.0.0.1:")] == []
    # Playwright creates the folder of a screenshot path itself.
    for directory in (str(tmp_path), os.environ.get("SPOTBOX_SCREENSHOT_DIR")):
        if directory:
            await page.screenshot(path=Path(directory) / f"{request.node.name}.png", full_page=True)
    await page.close()
    assert errors == [], f"script errors on the page: {errors}"


def minute_stamps(*seconds: int) -> list[str]:
    """Timestamps inside the previous whole minute, so they share one 1-minute bucket of the last hour."""
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)
    return [(start + timedelta(seconds=s)).isoformat() for s in seconds]


async def test_page_and_its_files_are_served(sqlite_box: Box) -> None:
    """Test that GET / is the dashboard and every file it references is served with its content type."""
    async with sqlite_box.http.get(f"{sqlite_box.base_url}/") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert resp.headers["Cache-Control"] == "no-cache"
        html = await resp.text()
    assert '<table id="fleet-table">' in html
    assets = re.findall(r'(?:href|src)="(static/[^"]+)"', html)
    assert sorted(assets) == ["static/charts.js", "static/dashboard.css", "static/dashboard.js", "static/favicon.svg"]
    types = {"css": "text/css", "js": "javascript", "svg": "image/svg+xml"}
    for asset in assets:
        async with sqlite_box.http.get(f"{sqlite_box.base_url}/{asset}") as resp:
            assert resp.status == 200, asset
            assert types[asset.rsplit(".", 1)[1]] in resp.content_type
    # Browsers ask for /favicon.ico whatever the page says.
    async with sqlite_box.http.get(f"{sqlite_box.base_url}/favicon.ico") as resp:
        assert resp.status == 200
        assert resp.content_type == "image/svg+xml"


@pytest.mark.parametrize("name", ["missing.js", "..%2Fapi%2Fdashboard.py", "..%2F..%2Fpyproject.toml"])
async def test_unknown_static_file_is_a_json_404(sqlite_box: Box, name: str) -> None:
    """Test that only the dashboard's own files are served: anything else, traversal included, is a JSON 404."""
    async with sqlite_box.http.get(f"{sqlite_box.base_url}/static/{name}") as resp:
        assert resp.status == 404
        body = await resp.json()
    assert set(body) == {"error", "detail"}


async def test_fleet_table_updates_live_and_shows_the_selected_robot(sqlite_box: Box, page: Page) -> None:
    """Test in chromium that a status published over MQTT appears in the open page, and a robot's detail renders."""
    await page.goto(f"{sqlite_box.base_url}/")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=UI_TIMEOUT_MS)
    # Set on this document only: still there at the end proves no reload happened.
    await page.evaluate("window.spotboxTestMarker = 'same document'")
    row = page.locator(f'#fleet-table tr[data-serial="{SERIAL}"]')
    first, second, third = minute_stamps(10, 20, 30)

    async with mqtt_client(sqlite_box.mqtt_port) as client:
        await client.publish(f"robot/{SERIAL}/status", payload(battery_level=40, timestamp=first), qos=1)
        await expect(row.locator("td.battery")).to_have_text("40 %", timeout=UI_TIMEOUT_MS)
        moved = {"latitude": 52.5212, "longitude": 13.41, "height": 35.5}
        await client.publish(
            f"robot/{SERIAL}/status", payload(battery_level=44, timestamp=second, location=moved), qos=1
        )
        await expect(row.locator("td.battery")).to_have_text("44 %", timeout=UI_TIMEOUT_MS)
        await client.publish(f"robot/{SERIAL}/status", payload(battery_level=150), qos=1)
        await expect(row.locator("td.rejected")).to_have_text("1", timeout=UI_TIMEOUT_MS)
        await expect(page.locator("#rejections li")).to_contain_text("battery_level", timeout=UI_TIMEOUT_MS)
        await expect(row.locator("td.charging")).to_have_text("discharging")
        await expect(row.locator("td.driving")).to_have_text("moving")

        await row.locator("button").click()
        await expect(page.locator("#detail")).to_have_attribute("data-loaded", "true", timeout=UI_TIMEOUT_MS)
        await expect(page.locator("#detail-title")).to_have_text(SERIAL)
        # Both statuses fall in one minute: the chart's point is their average.
        await expect(page.locator("#battery-chart")).to_have_attribute("data-points", "1")
        await expect(page.locator("#battery-chart circle.battery title")).to_contain_text("42 %")
        await expect(page.locator("#track")).to_have_attribute("data-points", "2")
        positions = page.locator("#positions tbody tr")
        await expect(positions).to_have_count(2)
        await expect(positions.first).to_contain_text("52.52120")

        # A live status of the selected robot moves its chart and its positions without reloading them.
        await client.publish(f"robot/{SERIAL}/status", payload(battery_level=30, timestamp=third), qos=1)
        await expect(positions).to_have_count(3, timeout=UI_TIMEOUT_MS)
        await expect(page.locator("#battery-chart circle.battery title")).to_contain_text("38 %")

    assert await page.evaluate("window.spotboxTestMarker") == "same document"


async def test_fleet_table_starts_from_robots_and_stats(sqlite_box: Box, page: Page) -> None:
    """Test in chromium that robots seen before the page opened are listed from /robots with /stats' rejections."""
    async with mqtt_client(sqlite_box.mqtt_port) as client:
        await client.publish("robot/EARLY-1/status", payload(battery_level=67, battery_status="CHARGING"), qos=1)
        await client.publish(
            "robot/EARLY-2/status", payload(battery_level=12, driving_status="IDLE", current_drive_id=None), qos=1
        )
        await client.publish("robot/EARLY-2/status", payload(battery_status="FULL"), qos=1)

    await page.goto(f"{sqlite_box.base_url}/")
    rows = page.locator("#fleet-table tbody tr")
    await expect(rows).to_have_count(2, timeout=UI_TIMEOUT_MS)
    await expect(rows.nth(0)).to_have_attribute("data-serial", "EARLY-1")
    await expect(rows.nth(0).locator("td.battery")).to_have_text("67 %")
    await expect(rows.nth(0).locator("td.charging")).to_have_text("charging")
    await expect(rows.nth(1).locator("td.battery")).to_have_text("12 %")
    await expect(rows.nth(1).locator("td.driving")).to_have_text("idle")
    await expect(rows.nth(1).locator("td.rejected")).to_have_text("1", timeout=UI_TIMEOUT_MS)
    await expect(page.locator("#fleet-note")).to_be_hidden()
    await expect(page.locator("#stat-received")).to_have_text("3", timeout=UI_TIMEOUT_MS)
    await expect(page.locator("#stat-rejected")).to_have_text("1")


async def test_an_older_stats_snapshot_never_lands_last(sqlite_box: Box, page: Page) -> None:
    """Test in chromium that overlapping /stats loads (the page's first, then the feed's open) apply in the order
    asked: with the first one's answer (1 received) held back until a newer one could have landed (3 received),
    the totals never step back and end at the newest counts."""
    async with mqtt_client(sqlite_box.mqtt_port) as client:
        await client.publish("robot/EARLY-1/status", payload(), qos=1)
    first_fetched, release, published = asyncio.Event(), asyncio.Event(), asyncio.Event()
    answered: list[int] = []

    async def stats(route: Route) -> None:
        call = len(answered) + 1
        answered.append(0)
        if call == 1:
            response = await route.fetch()  # the counts as they are now
            first_fetched.set()
            await release.wait()
            await route.fulfill(response=response)
        else:
            await published.wait()
            await route.continue_()
        answered[call - 1] = 1

    await page.route(re.compile(r"/stats$"), stats)
    await page.goto(f"{sqlite_box.base_url}/")
    # Every text the received total takes, in order.
    await page.evaluate(
        """() => {
            window.receivedTexts = [];
            const element = document.querySelector("#stat-received");
            new MutationObserver(() => window.receivedTexts.push(element.textContent))
                .observe(element, { childList: true, characterData: true, subtree: true });
        }"""
    )
    async with asyncio.timeout(UI_TIMEOUT_MS / 1000):
        await first_fetched.wait()
    await expect(page.locator("#connection")).to_have_text("live", timeout=UI_TIMEOUT_MS)
    async with mqtt_client(sqlite_box.mqtt_port) as client:
        for _ in range(2):
            await client.publish("robot/EARLY-2/status", payload(), qos=1)
    published.set()
    await expect(page.locator('#fleet-table tbody tr[data-serial="EARLY-2"]')).to_have_count(1, timeout=UI_TIMEOUT_MS)
    # A load that overlapped the held one has had every chance to land meanwhile.
    await asyncio.sleep(0.5)
    release.set()
    texts: list[str] = []
    async with asyncio.timeout(UI_TIMEOUT_MS / 1000):
        while not ({"1", "3"} <= set(texts) and len(answered) >= 2 and all(answered)):
            await asyncio.sleep(0.05)
            texts = await page.evaluate("window.receivedTexts")
    counts = [int(text) for text in texts if text.isdigit()]
    assert counts == sorted(counts), f"the received total stepped back: {texts}"
    await expect(page.locator("#stat-received")).to_have_text("3")
