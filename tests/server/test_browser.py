"""The dashboard in a real browser (Debian's chromium, headless, driven by Playwright):
log in, find a compensated order and its compensation on the map, replay a dead letter
once the handler is fixed and watch it succeed, cancel a run, retry and fork a failed
run, discard a dead letter, find runs by search attribute, and a viewer sees no
operator button. Screenshots go to docs/img/ for docs/console.md."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from cantata import App
from cantata.model.access import Role
from cantata.server.auth import create_token
from tests.server.conftest import ServerThread, make_tokens
from tests.server.shop import make_shop

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
OPERATOR_BUTTONS = ("Cancel", "Replay", "Start", "Publish", "Retry", "Fork", "Discard")

if not Path(CHROMIUM).exists():
    if os.environ.get("CANTATA_REQUIRE_SERVICES") == "1":
        raise RuntimeError(f"{CHROMIUM} is missing and CANTATA_REQUIRE_SERVICES=1 (see .ci/run)")
    pytest.skip(f"chromium is not installed at {CHROMIUM} (apt-get install -y chromium)",
                allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

# What a page shows after a click (a request, the server's answer, a redraw) may take
# more than Playwright's default 5 s on a loaded 2-core machine: a clean clone's full run
# once waited that long for "Published event" with nothing wrong on the page. For every
# browser module (each imports this one); a passing check waits no longer for it.
expect.set_options(timeout=15_000)

# One xdist worker runs this module: its server (seeded) and Chromium are module
# fixtures, made once instead of once per worker that gets one of its tests.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser")]


async def seed(app: App) -> dict[str, Any]:
    tokens, names = await make_tokens(app)
    for i in range(4):
        await (await app.start("place_order", {"id": f"A-{i}", "total": 20 + i},
                               idempotency_key=f"order-A-{i}")).result(10)
    declined = await app.start("place_order", {"id": "B-7", "card": "declined", "note": XSS},
                               idempotency_key="order-B-7")
    with contextlib.suppress(Exception):  # it compensates: the point
        await declined.result(10)
    return {"tokens": tokens, "names": names, "declined": declined.run_id}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("browser") / "shop.db"
    state = {"emails_broken": False}
    app = make_shop(f"sqlite:///{path}", state=state)
    with ServerThread(app, setup=seed) as srv:
        srv.state = state  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def login(browser: Browser, server: ServerThread, role: str, img: Path) -> Page:
    page = browser.new_page(viewport={"width": 1360, "height": 860})
    page.img = img  # type: ignore[attr-defined]
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.errors = errors  # type: ignore[attr-defined]
    page.goto(f"{server.url}/")
    expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.get_by_label("Token").fill(server.result["tokens"][role])
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    assert server.result["tokens"][role] not in page.url
    return page


@pytest.fixture(scope="module")
def img(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: docs/img/ with CANTATA_SCREENSHOTS=1 (to refresh
    docs/console.md), else a temporary folder (a test run leaves the checkout alone)."""
    if os.environ.get("CANTATA_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        return DOCS_IMG
    return tmp_path_factory.mktemp("screenshots")


def shot(page: Page, name: str) -> None:
    folder: Path = page.img  # type: ignore[attr-defined]
    page.screenshot(path=str(folder / name), full_page=True)


def test_find_a_compensated_order_and_its_compensation_on_the_map(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    page = login(browser, server, "operator", img)
    expect(page.locator(".card.s-compensated .n")).to_have_text("1")
    shot(page, "overview.png")
    page.get_by_role("link", name="Runs", exact=True).click()
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    page.get_by_label("Status").select_option("compensated")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("compensated")
    shot(page, "runs.png")
    rows.first.get_by_role("link").first.click()
    expect(page.get_by_role("heading", name="Run")).to_be_visible()
    expect(page).to_have_url(re.compile(server.result["declined"]))
    release = page.locator('svg.flow-map g.node[data-name="release"]')
    expect(release).to_have_attribute("data-kind", "compensation")
    expect(release).to_have_attribute("data-status", "completed")
    expect(page.locator('svg.flow-map g.node[data-name="charge"]')).to_have_attribute(
        "data-status", "failed")
    expect(page.locator('svg.flow-map g.node[data-name="ship"]')).to_have_attribute(
        "data-status", "not_reached")
    expect(page.get_by_role("cell", name=re.compile("release"))).to_be_visible()
    # the order's note is data: shown as text, never run
    expect(page.get_by_text("<script>window.__xss = 1</script>").first).to_be_visible()
    assert page.evaluate("window.__xss") is None
    assert page.locator("main script, main img").count() == 0
    shot(page, "run-compensated.png")
    page.get_by_role("link", name=server.result["declined"]).click()
    expect(page.get_by_role("heading", name="Trace")).to_be_visible()
    expect(page.locator(".where")).to_contain_text("compensated")
    expect(page.locator('svg.timeline g.tl-row[data-kind="compensation"]')).to_have_count(1)
    assert page.evaluate("window.__xss") is None
    shot(page, "trace.png")
    assert page.errors == []  # type: ignore[attr-defined]


def test_replay_a_dead_letter_after_fixing_the_handler(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    state = server.state  # type: ignore[attr-defined]
    state["emails_broken"] = True
    page = login(browser, server, "operator", img)
    page.get_by_role("link", name="Dead letters", exact=True).click()
    expect(page.get_by_role("heading", name="Dead letters")).to_be_visible()
    event = server.run(lambda: server.app.publish("order.placed", {"order_id": "E-1"},
                                                  correlation_id="order-E-1"))
    row = page.locator('tr:has-text("order.placed")')
    expect(row).to_have_count(1, timeout=15_000)  # arrives live (server-sent events)
    expect(row).to_contain_text("SMTP server refused the connection")
    shot(page, "dead-letters.png")
    state["emails_broken"] = False  # the fix is deployed
    row.get_by_role("button", name="Replay").click()
    expect(page.get_by_role("status")).to_contain_text("Replayed order.placed to emails")
    expect(page.locator('tr:has-text("order.placed")')).to_have_count(0)
    page.get_by_role("link", name="Follow it in its trace").click()
    expect(page.get_by_role("heading", name="Trace")).to_be_visible()
    handler = page.locator('svg.timeline g.tl-row[data-kind="handler"]')
    expect(handler).to_have_attribute("data-status", "completed", timeout=15_000)
    expect(page.locator(".where")).to_contain_text("completed")
    assert event.correlation_id == "order-E-1"
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_dead_letter_made_before_the_live_feed_connects_is_shown(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    """The page is drawn, then its live feed connects: a change in between has no event
    of its own on the feed. The feed is held back here until the dead letter exists;
    the page still shows it once the feed connects (it draws itself again)."""
    state = server.state  # type: ignore[attr-defined]
    page = login(browser, server, "operator", img)
    expect(page.locator("#live")).to_be_visible()  # the overview's own feed is open
    held: list[Any] = []
    page.route("**/api/stream*", lambda route: held.append(route))
    page.get_by_role("link", name="Dead letters", exact=True).click()
    expect(page.get_by_role("heading", name="Dead letters")).to_be_visible()
    for _ in range(100):  # the page asked for its feed
        if held:
            break
        page.wait_for_timeout(50)
    assert held, "the dead letters page did not open its live feed"
    state["emails_broken"] = True
    try:
        server.run(lambda: server.app.publish("order.placed", {"order_id": "L-1"}))
        for _ in range(200):
            letters = server.run(server.app.dead_letters)
            if letters:
                break
            page.wait_for_timeout(50)
        assert len(letters) == 1, letters
        page.wait_for_timeout(300)  # (a page that drew again by itself would show it now)
        expect(page.locator('tr:has-text("order.placed")')).to_have_count(0)
        assert len(held) == 1, "the dead letters page opened more than one feed"
        held[0].continue_()
        expect(page.locator('tr:has-text("order.placed")')).to_have_count(1, timeout=10_000)
    finally:
        state["emails_broken"] = False
        page.unroute("**/api/stream*")
        for letter in server.run(server.app.dead_letters):  # as the replay test expects
            server.run(functools.partial(server.app.replay, letter.id))
    page.close()


def test_cancel_a_run(browser: Browser, server: ServerThread, img: Path) -> None:
    handle = server.run(lambda: server.app.start("await_approval", {"id": "C-1"}))
    page = login(browser, server, "operator", img)
    page.goto(f"{server.url}/runs/{handle.run_id}")
    expect(page.get_by_role("heading", name="Run")).to_be_visible()
    wait = page.locator('svg.flow-map g.node[data-kind="wait"]')
    expect(wait).to_have_attribute("data-status", "waiting", timeout=15_000)
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator(".headline .badge").first).to_have_text("cancelled", timeout=15_000)
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    expect(page.locator('svg.flow-map g.node[data-name="release"]')).to_have_attribute(
        "data-status", "completed")
    # the wait the cancel cut short says so in the steps table and the fork list, as on
    # the map, never `waiting`
    expect(wait).to_have_attribute("data-status", "cancelled")
    expect(page.locator("#fork-step option", has_text="wait:invoice.approved#1")).to_have_text(
        "wait:invoice.approved#1 (cancelled)")
    expect(page.locator("table .badge.s-waiting")).to_have_count(0)
    shot(page, "run-cancelled.png")
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_viewer_sees_no_operator_buttons(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    live = server.run(lambda: server.app.start("await_approval", {"id": "V-1"}))
    server.state["emails_broken"] = True  # type: ignore[attr-defined]
    server.run(lambda: server.app.publish("order.placed", {"order_id": "V-1"}))
    page = login(browser, server, "viewer", img)
    for path, heading in [("/", "Overview"), (f"/runs/{live.run_id}", "Run"),
                          ("/dead-letters", "Dead letters"), ("/events", "Choreography map"),
                          ("/runs", "Runs"), ("/stalled", "Stalled transactions")]:
        page.goto(f"{server.url}{path}")
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
        page.wait_for_load_state("networkidle")
        for name in OPERATOR_BUTTONS:
            expect(page.get_by_role("button", name=name, exact=True)).to_have_count(0)
    page.goto(f"{server.url}/dead-letters")
    expect(page.locator('tr:has-text("order.placed")').first).to_be_visible(timeout=15_000)
    expect(page.get_by_role("button", name="Replay")).to_have_count(0)
    page.goto(f"{server.url}/events")
    expect(page.locator("svg.event-map")).to_be_visible()
    shot(page, "events.png")
    # the operator sees them where they apply
    op = login(browser, server, "operator", img)
    op.goto(f"{server.url}/runs/{live.run_id}")
    expect(op.get_by_role("button", name="Cancel")).to_be_visible()
    op.goto(f"{server.url}/")
    expect(op.get_by_role("button", name="Start")).to_be_visible()
    op.goto(f"{server.url}/events")
    expect(op.get_by_role("button", name="Publish")).to_be_visible()
    op.goto(f"{server.url}/dead-letters")
    expect(op.get_by_role("button", name="Replay").first).to_be_visible()
    assert page.errors == [] and op.errors == []  # type: ignore[attr-defined]


def test_revoking_the_token_logs_an_open_page_out(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    """`cantata token revoke` ends the live stream of the token's open pages, even while
    changes keep coming, and the page goes to the login page."""
    name = f"leaving-{uuid.uuid4().hex[:6]}"
    token = server.run(lambda: create_token(server.app.store, name, Role.VIEWER))
    page = browser.new_page(viewport={"width": 1360, "height": 860})
    page.goto(f"{server.url}/runs")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    expect(page.locator("#live")).to_be_visible()
    assert server.run(lambda: server.app.store.revoke_token(name, time.time()))
    for i in range(20):  # changes keep flowing on the stream
        if "/login" in page.url:
            break
        server.run(functools.partial(server.app.start, "place_order", {"id": f"X-{i}"}))
        page.wait_for_timeout(500)
    expect(page).to_have_url(re.compile(r"/login\?next=(/|%2F)runs$"), timeout=5_000)
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.close()


def test_a_live_update_keeps_the_start_form_and_its_notice(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    page = login(browser, server, "operator", img)
    expect(page.locator("#live")).to_be_visible()
    completed = page.locator(".card.s-completed .n")
    before = int(completed.inner_text())
    page.get_by_label("Workflow").select_option("await_approval")
    page.get_by_label("Input (JSON, the single argument)").fill('{"id": "F-1", "typed": true}')
    page.get_by_label("Idempotency key").fill("half-typed")
    # someone else's run completes: the counts are drawn again
    server.run(lambda: server.app.start("place_order", {"id": "F-0"}))
    expect(completed).to_have_text(str(before + 1), timeout=15_000)
    page.wait_for_timeout(1_500)
    assert page.get_by_label("Workflow").input_value() == "await_approval"
    assert page.get_by_label("Input (JSON, the single argument)").input_value() == \
        '{"id": "F-1", "typed": true}'
    assert page.get_by_label("Idempotency key").input_value() == "half-typed"
    page.get_by_label("Workflow").select_option("place_order")
    page.get_by_label("Input (JSON, the single argument)").fill('{"id": "F-2"}')
    page.get_by_label("Idempotency key").fill("order-F-2")
    page.get_by_role("button", name="Start").click()
    started = page.get_by_role("status").filter(has_text="Started run")
    expect(started).to_be_visible()
    expect(completed).to_have_text(str(before + 2), timeout=15_000)  # its own updates
    page.wait_for_timeout(1_500)
    expect(started).to_be_visible()
    assert page.errors == []  # type: ignore[attr-defined]


def test_new_runs_matching_the_filters_are_offered_above_the_runs_table(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    page = login(browser, server, "viewer", img)
    page.goto(f"{server.url}/runs?workflow=await_approval")
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    expect(page.locator("#live")).to_be_visible()
    rows = page.locator("tbody tr")
    page.wait_for_timeout(800)  # (the check made when the stream opened finds nothing)
    shown = rows.count()
    expect(page.locator("button.fresh")).to_have_count(0)
    handle = server.run(lambda: server.app.start("await_approval", {"id": "N-1"}))
    server.run(lambda: server.app.start("place_order", {"id": "N-2"}))  # filtered out
    bar = page.get_by_role("button", name="1 new run — show")
    expect(bar).to_be_visible(timeout=15_000)
    expect(rows).to_have_count(shown)  # the table does not move under the reader
    bar.click()
    expect(rows).to_have_count(shown + 1)
    expect(rows.first).to_have_attribute("data-run-id", handle.run_id)
    expect(page.locator("button.fresh")).to_have_count(0)
    server.run(handle.cancel)
    expect(rows.first.locator("td.status")).to_have_text("cancelled", timeout=15_000)
    assert page.errors == []  # type: ignore[attr-defined]


def test_the_runs_page_honours_its_limit_and_pages_by_next_page_links(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    """`/runs?limit=2` shows 2 runs; **Next page** opens the next 2 at an address of
    their own (its cursor and limit kept), newest first with no run twice; **First
    page** goes back; a limit out of range is refused with the range (docs/console.md)."""
    page = login(browser, server, "viewer", img)
    page.goto(f"{server.url}/runs?workflow=place_order&limit=2")
    rows = page.locator("tbody tr[data-run-id]")
    expect(rows).to_have_count(2)
    first = [rows.nth(i).get_attribute("data-run-id") for i in range(2)]
    page.get_by_role("link", name="Next page").click()
    expect(page).to_have_url(re.compile(r"/runs\?workflow=place_order&limit=2&cursor=\w+"))
    expect(rows).to_have_count(2)
    second = [rows.nth(i).get_attribute("data-run-id") for i in range(2)]
    assert not set(first) & set(second)
    # newest first across the pages, as the API's one page of 4 lists them
    four = page.request.get(f"{server.url}/api/runs?workflow=place_order&limit=4").json()
    assert [r["run_id"] for r in four["runs"]] == first + second
    expect(page.locator("button.fresh")).to_have_count(0)  # (newer runs: the first page's)
    page.reload()  # the address is the page: the same runs again
    expect(rows.first).to_have_attribute("data-run-id", second[0])
    page.get_by_role("link", name="First page").click()
    expect(rows.first).to_have_attribute("data-run-id", first[0])
    page.goto(f"{server.url}/runs?limit=0")
    expect(page.get_by_role("alert")).to_contain_text("limit must be from 1 to 500")
    assert [e for e in page.errors if "422" not in e] == []  # type: ignore[attr-defined]


def test_the_runs_table_shows_each_runs_version_and_filters_by_it(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    """The runs table has the version column `cantata runs` has; a run's version links
    to the runs of that version, and the **Version** filter finds them (docs/console.md)."""
    version = server.app.version
    page = login(browser, server, "viewer", img)
    page.goto(f"{server.url}/runs?workflow=place_order&limit=3")
    headers = page.locator("thead th")
    expect(headers.nth(3)).to_have_text("Version")
    rows = page.locator("tbody tr[data-run-id]")
    expect(rows).to_have_count(3)
    cell = rows.first.locator("td").nth(3)
    expect(cell).to_have_text(version)
    cell.get_by_role("link", name=version).click()
    expect(page).to_have_url(re.compile(rf"/runs\?version={re.escape(version)}$"))
    expect(page.get_by_label("Version")).to_have_value(version)
    expect(rows.first).to_be_visible()
    assert set(rows.locator("td:nth-child(4)").all_inner_texts()) == {version}
    page.get_by_label("Version").fill("no-such-version")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"version=no-such-version"))
    expect(page.get_by_text("No runs match these filters.")).to_be_visible()
    assert page.errors == []  # type: ignore[attr-defined]


def test_times_are_utc_and_say_so_with_the_local_time_in_a_tooltip(
    browser: Browser, server: ServerThread
) -> None:
    page = browser.new_page(timezone_id="America/New_York", locale="en-US")
    page.goto(f"{server.url}/login?next=/runs/{server.result['declined']}")
    page.get_by_label("Token").fill(server.result["tokens"]["viewer"])
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Run")).to_be_visible()
    created = page.locator("dl.facts dt:text-is('Created') + dd time")
    expect(created).to_have_text(re.compile(r"^\w{3} \d\d, \d\d:\d\d:\d\d UTC$"))
    iso = created.get_attribute("datetime")
    assert iso is not None
    at = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    assert created.inner_text() == at.strftime("%b %d, %H:%M:%S UTC")
    local = at.astimezone(ZoneInfo("America/New_York"))
    assert local.strftime("%H:%M:%S") in (created.get_attribute("title") or "")
    assert re.search(r"\b(EST|EDT)\b", created.get_attribute("title") or "")
    for where in ("table td.when time", "table td time"):  # the steps' and the runs' times
        first = page.locator(where).first
        if first.count():
            expect(first).to_have_text(re.compile(r" UTC$"))
    page.goto(f"{server.url}/runs")
    expect(page.locator("td.when time").first).to_have_text(re.compile(r" UTC$"))
    page.close()


def test_a_mistyped_address_shows_the_consoles_not_found_page(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    page = login(browser, server, "viewer", img)
    for path in ("/nosuchpage", "/runs/", "/trace/%00", "/runs/" + "a" * 300, "/static/nope"):
        response = page.goto(f"{server.url}{path}")
        assert response is not None and response.status == 404, path
        expect(page.get_by_role("heading", name="Page not found")).to_be_visible()
        expect(page.get_by_role("navigation", name="Main").get_by_role("link", name="Runs")
               ).to_be_visible()
        expect(page.get_by_role("alert")).to_contain_text("There is no page at this address")
    page.get_by_role("link", name="Overview").last.click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    # the API keeps its JSON errors, whatever the client accepts
    r = page.request.get(f"{server.url}/api/nosuch", headers={"Accept": "text/html"})
    assert r.status == 404 and r.json()["error"]["code"] == "not_found"
    # logged out, the page has the header and a way to log in
    anonymous = browser.new_page()
    response = anonymous.goto(f"{server.url}/nosuchpage")
    assert response is not None and response.status == 404
    expect(anonymous.get_by_role("heading", name="Page not found")).to_be_visible()
    expect(anonymous.get_by_role("link", name="Log in")).to_be_visible()
    anonymous.close()
    assert [e for e in page.errors if "404" not in e] == []  # type: ignore[attr-defined]


def test_at_phone_width_nothing_scrolls_sideways(browser: Browser, server: ServerThread,
                                                  img: Path) -> None:
    page = login(browser, server, "operator", img)
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/", "/runs", f"/runs/{server.result['declined']}", "/dead-letters"):
        page.goto(f"{server.url}{path}")
        page.wait_for_load_state("networkidle")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, (path, width)
        header = page.locator("header.top").bounding_box()
        logout = page.get_by_role("button", name="Log out").bounding_box()
        assert header is not None and logout is not None
        assert logout["x"] + logout["width"] <= 390, path  # wrapped, not cut off
    shot(page, "phone-run.png")
    assert page.errors == []  # type: ignore[attr-defined]


def test_the_runs_of_a_trace_are_links_reached_with_the_keyboard(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    page = login(browser, server, "viewer", img)
    declined = server.result["declined"]
    page.goto(f"{server.url}/trace/{declined}")
    expect(page.get_by_role("heading", name="Trace")).to_be_visible()
    link = page.locator(f'svg.timeline a[href="/runs/{declined}"]')
    expect(link).to_have_count(1)
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.getAttribute('href')") == f"/runs/{declined}":
            break
    else:
        raise AssertionError("Tab never reached the run's row in the trace")
    # a live update (another order's run, elsewhere) redraws nothing under the focus
    server.run(lambda: server.app.start("place_order", {"id": "K-1"}))
    page.wait_for_timeout(1_500)
    assert page.evaluate("document.activeElement.getAttribute('href')") == f"/runs/{declined}"
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(f"/runs/{declined}$"))
    expect(page.get_by_role("heading", name="Run")).to_be_visible()
    assert page.errors == []  # type: ignore[attr-defined]


def failed_invoice(server: ServerThread, order: str, customer: str = "walk-in") -> str:
    """An invoice run that failed while billing was down (billing is up again after)."""
    state = server.state  # type: ignore[attr-defined]
    state["billing_down"] = True
    try:
        handle = server.run(lambda: server.app.start("invoice", {"id": order,
                                                               "customer": customer}))
        with contextlib.suppress(Exception):  # it fails: the point
            server.run(lambda: handle.result(10))
    finally:
        state["billing_down"] = False
    assert server.run(handle.info).status == "failed"
    run_id: str = handle.run_id
    return run_id


def test_retry_a_failed_run_once_billing_is_back(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    run_id = failed_invoice(server, "RT-1", customer="acme")
    viewer = login(browser, server, "viewer", img)
    viewer.goto(f"{server.url}/runs/{run_id}")
    expect(viewer.locator(".headline .badge").first).to_have_text("failed")
    expect(viewer.locator("dd.attributes")).to_contain_text("customer=acme")
    viewer.wait_for_load_state("networkidle")
    for name in ("Retry", "Fork"):
        expect(viewer.get_by_role("button", name=name, exact=True)).to_have_count(0)
    page = login(browser, server, "operator", img)
    page.goto(f"{server.url}/runs/{run_id}")
    expect(page.locator(".headline .badge").first).to_have_text("failed")
    shot(page, "run-failed.png")
    # Billing answers only once the page showed the retried run live: held for a few
    # seconds instead, it could end before a loaded machine's page showed it running.
    billing = threading.Event()
    server.state["billing_gate"] = billing  # type: ignore[attr-defined]
    try:
        page.get_by_role("button", name="Retry").click()
        expect(page.locator(".headline .badge").first).to_have_text(
            re.compile("^(pending|running)$"), timeout=15_000)
        expect(page.get_by_role("button", name="Retry")).to_have_count(0)
        billing.set()
        expect(page.locator(".headline .badge").first).to_have_text("completed",
                                                                     timeout=15_000)
    finally:
        billing.set()
        del server.state["billing_gate"]  # type: ignore[attr-defined]
    bill = page.locator('tr[data-key="bill#1"]')
    expect(bill).to_contain_text("completed")
    records = server.run(lambda: server.app.store.audit_records(server.app.name, after_seq=0,
                                                                limit=100_000))
    retried = [r for r in records if r.action == "run.retried" and r.target == run_id]
    assert [r.actor for r in retried] == [f"token:{server.result['names']['operator']}"]
    assert page.errors == [] and viewer.errors == []  # type: ignore[attr-defined]


def test_retry_a_compensated_run_asks_first(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    handle = server.run(lambda: server.app.start("place_order", {"id": "RT-2",
                                                               "card": "declined"}))
    with contextlib.suppress(Exception):  # it compensates
        server.run(lambda: handle.result(10))
    page = login(browser, server, "operator", img)
    page.goto(f"{server.url}/runs/{handle.run_id}")
    expect(page.locator(".headline .badge").first).to_have_text("compensated")
    asked: list[str] = []

    def answer(accept: bool) -> Any:
        def on(dialog: Any) -> None:
            asked.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()
        return on

    page.once("dialog", answer(False))
    page.get_by_role("button", name="Retry").click()
    expect(page.get_by_role("button", name="Retry")).to_be_enabled()
    assert len(asked) == 1 and "compensated" in asked[0]
    assert server.run(handle.info).epoch == 0  # dismissed: nothing was done
    page.once("dialog", answer(True))
    page.get_by_role("button", name="Retry").click()
    for _ in range(100):
        if server.run(handle.info).epoch == 1:
            break
        page.wait_for_timeout(100)
    assert server.run(handle.info).epoch == 1 and len(asked) == 2
    expect(page.locator(".headline .badge").first).to_have_text("compensated", timeout=15_000)
    assert page.errors == []  # type: ignore[attr-defined]


def test_fork_a_failed_run_from_its_failed_step(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    run_id = failed_invoice(server, "FK-1")
    page = login(browser, server, "operator", img)
    page.goto(f"{server.url}/runs/{run_id}")
    step = page.get_by_label("Fork from step")
    expect(step).to_have_value("bill#1")  # the failed call is offered first
    options = step.locator("option")
    expect(options).to_have_count(2)  # steps only: not the run's set_attributes#1
    expect(options).to_have_text(["reserve#1 (completed)", "bill#1 (failed)"])
    page.get_by_role("button", name="Fork").click()
    expect(page).not_to_have_url(re.compile(f"/runs/{run_id}$"))
    expect(page).to_have_url(re.compile(r"/runs/[0-9a-f]+$"))
    expect(page.get_by_role("heading", name="Run")).to_be_visible()
    expect(page.locator(".headline .badge").first).to_have_text("completed", timeout=15_000)
    new_id = page.url.rsplit("/", 1)[1]
    new = server.run(lambda: server.app.get_handle(new_id).info())
    assert new.workflow == "invoice" and new.causation_id == run_id
    assert server.run(lambda: server.app.get_handle(run_id).info()).status == "failed"
    assert page.errors == []  # type: ignore[attr-defined]


def test_discard_a_dead_letter(browser: Browser, server: ServerThread, img: Path) -> None:
    state = server.state  # type: ignore[attr-defined]
    page = login(browser, server, "operator", img)
    page.get_by_role("link", name="Dead letters", exact=True).click()
    expect(page.get_by_role("heading", name="Dead letters")).to_be_visible()
    state["emails_broken"] = True
    try:
        server.run(lambda: server.app.publish("order.placed", {"order_id": "DL-1"},
                                              correlation_id="order-DL-1"))
        row = page.locator('tr:has-text("order-DL-1")')
        expect(row).to_have_count(1, timeout=15_000)
    finally:
        state["emails_broken"] = False
    [letter] = [d for d in server.run(server.app.dead_letters)
                if d.event.correlation_id == "order-DL-1"]
    page.once("dialog", lambda d: d.dismiss())
    row.get_by_role("button", name="Discard").click()
    page.wait_for_timeout(300)
    expect(row).to_have_count(1)  # not confirmed: kept
    page.once("dialog", lambda d: d.accept())
    row.get_by_role("button", name="Discard").click()
    expect(page.get_by_role("status").filter(has_text="Discarded")).to_contain_text(
        "Discarded order.placed for emails")
    expect(page.locator('tr:has-text("order-DL-1")')).to_have_count(0)
    assert letter.id not in [d.id for d in server.run(server.app.dead_letters)]
    assert page.errors == []  # type: ignore[attr-defined]


def test_find_runs_by_search_attribute(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    ids = [server.run(functools.partial(server.app.start, "invoice", {"id": o, "customer": c}))
           for o, c in [("AT-1", "initech"), ("AT-2", "umbrella"), ("AT-3", "initech")]]
    for handle in ids:
        server.run(functools.partial(handle.result, 10))
    page = login(browser, server, "viewer", img)
    page.goto(f"{server.url}/runs")
    page.get_by_label("Attribute").fill("customer=initech")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"attr=customer%3Dinitech"))
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(2)
    assert [rows.nth(i).get_attribute("data-run-id") for i in range(2)] == [
        ids[2].run_id, ids[0].run_id]
    expect(page.get_by_label("Attribute")).to_have_value("customer=initech")
    shot(page, "runs-by-attribute.png")
    # a run's attributes link to the runs that share them
    page.goto(f"{server.url}/runs/{ids[1].run_id}")
    page.get_by_role("link", name="customer=umbrella").click()
    expect(page.locator("tbody tr")).to_have_count(1)
    page.get_by_label("Attribute").fill("customer")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_role("alert")).to_contain_text("is malformed")
    assert [e for e in page.errors if "422" not in e] == []  # type: ignore[attr-defined]


def test_publishing_a_mistyped_event_type_says_nothing_listens_to_it(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    page = login(browser, server, "operator", img)
    page.goto(f"{server.url}/events")
    page.get_by_label("Type").fill("order.plcaed")
    page.get_by_role("button", name="Publish").click()
    expect(page.get_by_role("status").filter(has_text="Published event")).to_be_visible()
    expect(page.get_by_role("status").filter(
        has_text="Nothing in this app listens to order.plcaed")).to_be_visible()
    page.get_by_label("Type").fill("order.placed")
    page.get_by_role("button", name="Publish").click()
    expect(page.get_by_role("status").filter(has_text="Published event")).to_be_visible()
    expect(page.get_by_role("status").filter(has_text="Nothing in this app")).to_have_count(0)
    assert page.errors == []  # type: ignore[attr-defined]


def test_the_overview_leads_with_stalls_dead_letters_and_the_last_hours_failures(
    browser: Browser, server: ServerThread, img: Path
) -> None:
    """The overview's first cards count what an operator looks at first, each a link to
    the list it counts: stalled transactions, dead letters, runs that failed in the last
    hour (docs/console.md)."""
    run_id = failed_invoice(server, "OV-1")
    page = login(browser, server, "viewer", img)
    attention = page.get_by_role("group", name="Needs attention")
    failed = attention.locator('a[data-attention="failed_last_hour"]')
    expect(failed).to_contain_text("Failed in the last hour")
    shown = int(failed.locator(".n").inner_text())
    assert shown >= 1
    stalled = attention.locator('a[data-attention="stalled"]')
    expect(stalled).to_contain_text("Stalled (no progress for 5 min)")
    expect(stalled).to_have_attribute("href", "/stalled?older_than=300")
    expect(stalled.locator(".n")).to_have_text("0")  # (nothing is 5 minutes old here)
    # a card with nothing to look at is marked so (green); one with something is not
    expect(stalled).to_have_class(re.compile(r"\bnone\b"))
    expect(failed).not_to_have_class(re.compile(r"\bnone\b"))
    dead = attention.locator('a[data-attention="dead_letters"]')
    expect(dead).to_have_attribute("href", "/dead-letters")
    expect(dead.locator(".n")).to_have_text(re.compile(r"^\d+$"))
    failed.click()
    expect(page).to_have_url(re.compile(r"/runs\?status=failed&failed_since=\d{4}-"))
    expect(page.get_by_label("Failed since")).to_have_value(re.compile(r"^\d{4}-"))
    rows = page.locator("tbody tr[data-run-id]")
    expect(rows.first).to_be_visible()
    expect(page.locator(f'tr[data-run-id="{run_id}"]')).to_be_visible()
    assert rows.count() == shown
    assert page.errors == []  # type: ignore[attr-defined]
