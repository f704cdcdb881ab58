"""Every page of the console with NATS as the broker, in a real browser (Debian's
chromium, as tests/server/test_browser.py drives it), watching for uncaught errors and
console errors on each: the events page maps what crossed NATS, the queues page shows
a queue's depth, the schedules page a cron's next ticks in its own time zone, and the
keyboard alone reaches every control (focus visible) and submits forms with Enter."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from cantata import App
from tests.conftest import NATS_URL, _purge_nats_streams, broker_prefix, require_service
from tests.server import test_browser as base  # (skips this module without chromium)
from tests.server.conftest import ServerThread, make_tokens
from tests.server.shop import make_shop
from tests.server.test_flow_api import with_flow

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser-walk")]

from playwright.sync_api import Browser, Page, expect  # noqa: E402

browser = base.browser
CORRELATION = " Kunde 9 / März "
PAGES = ("/", "/runs", "/events", "/dead-letters", "/stalled", "/schedules", "/queues",
         "/groups")


async def seed(app: App) -> dict[str, Any]:
    tokens, names = await make_tokens(app)
    await app.schedules.create("tokyo-close", "0 15 * * *", "yearly_report",
                               timezone="Asia/Tokyo")
    placed = await app.start("place_order", {"id": "N-1", "total": 3},
                             correlation_id=CORRELATION)
    await placed.result(20)
    for i in range(3):  # one holds the fragile queue's one slot: two wait behind it
        await app.start("await_approval", {"id": f"Q-{i}"}, queue="fragile")
    return {"tokens": tokens, "names": names, "placed": placed.run_id}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    require_service("nats", NATS_URL, 4222)
    prefix = broker_prefix()
    path = tmp_path_factory.mktemp("walk") / "shop.db"
    app = with_flow(make_shop(f"sqlite:///{path}", broker=f"{NATS_URL}?prefix={prefix}"))
    try:
        with ServerThread(app, setup=seed) as srv:
            yield srv
    finally:
        # (in a thread of its own: Playwright's loop runs in this one)
        purge = threading.Thread(target=asyncio.run, args=(_purge_nats_streams(NATS_URL, prefix),))
        purge.start()
        purge.join(30)


def open_as(browser: Browser, server: ServerThread, role: str) -> Page:
    page = browser.new_context(viewport={"width": 1360, "height": 860}).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
    page.on("console", lambda m: errors.append(f"{page.url}: {m.text}")
            if m.type == "error" else None)
    page.errors = errors  # type: ignore[attr-defined]
    page.goto(server.url + "/login")
    page.get_by_label("Token").fill(server.result["tokens"][role])
    page.get_by_label("Token").press("Enter")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    return page


def test_every_page_draws_without_an_error(browser: Browser, server: ServerThread) -> None:
    page = open_as(browser, server, "operator")
    for address in (*PAGES, f"/runs/{server.result['placed']}",
                    "/trace/" + quote(CORRELATION, safe="")):
        page.goto(server.url + address)
        expect(page.locator("#live")).to_be_visible()  # (drawn, then the stream opened)
    assert page.errors == []  # type: ignore[attr-defined]
    page.context.close()


def test_the_events_page_maps_what_crossed_nats(browser: Browser, server: ServerThread) -> None:
    page = open_as(browser, server, "operator")
    page.goto(server.url + "/events")
    expect(page.locator(".map svg")).to_be_visible()
    expect(page.locator(".map")).to_contain_text("order.placed")
    page.get_by_label("Type").fill("order.placed")
    page.get_by_label("Data (JSON)").fill('{"order_id": "N-2"}')
    # into a transaction whose id app.start took (spaces, '/', letters outside ASCII)
    page.get_by_label("Correlation id").fill(CORRELATION)
    page.get_by_label("Correlation id").press("Enter")  # (Enter submits the form)
    expect(page.get_by_role("status").filter(has_text="Published event")).to_be_visible()
    trace = page.request.get(f"{server.url}/api/trace/{quote(CORRELATION, safe='')}").json()
    assert trace["correlation_id"] == CORRELATION
    assert page.locator("#content .notice.ok a").inner_text() in json.dumps(trace)
    assert page.errors == []  # type: ignore[attr-defined]
    page.context.close()


def test_queues_and_schedules_show_depth_and_ticks(browser: Browser, server: ServerThread) -> None:
    page = open_as(browser, server, "operator")
    page.goto(server.url + "/queues")
    fragile = page.locator('tr[data-queue="fragile"]')
    expect(fragile.locator("td.waiting")).to_have_text("2")
    expect(fragile.locator("td.in-progress")).to_have_text("1")
    page.goto(server.url + "/schedules")
    tokyo = page.locator('tr[data-schedule="tokyo-close"]')
    expect(tokyo).to_contain_text("Asia/Tokyo")
    # 15:00 in Tokyo (UTC+9, no summer time) is 06:00 UTC
    expect(tokyo.locator("td.next div")).to_have_count(3)
    for tick in tokyo.locator("td.next time").all():
        assert tick.inner_text().endswith("06:00:00 UTC"), tick.inner_text()
    assert page.errors == []  # type: ignore[attr-defined]
    page.context.close()


def test_the_keyboard_reaches_every_control_with_its_focus_shown(
    browser: Browser, server: ServerThread
) -> None:
    page = open_as(browser, server, "operator")
    for address in PAGES:
        page.goto(server.url + address)
        expect(page.locator("#live")).to_be_visible()
        unseen: list[str] = []
        for _ in range(40):
            page.keyboard.press("Tab")
            shown = page.evaluate("""() => {
              const el = document.activeElement;
              if (!el || el === document.body) return null;
              const s = getComputedStyle(el);
              const ring = s.outlineStyle !== "none" && parseFloat(s.outlineWidth) > 0;
              const name = (el.textContent || "").trim().slice(0, 30);
              return [el.tagName + (el.id ? "#" + el.id : "") + " " + name,
                      ring || s.boxShadow !== "none"];
            }""")
            if shown is None:
                break
            if not shown[1]:
                unseen.append(shown[0])
        assert unseen == [], (address, unseen)
    assert page.errors == []  # type: ignore[attr-defined]
    page.context.close()
