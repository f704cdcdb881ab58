"""The console with the keys and values the library takes, in a real browser (Debian's
chromium, as tests/server/test_browser.py drives it): the Start form starts a run with
any idempotency key ``app.start`` takes (spaces at its ends kept), the runs form finds
a key with spaces at its ends (the keys are exact; other filters are trimmed), an
attribute link of a very large or very small float finds its run, and logging out of
a console that does not answer says so."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from cantata import App
from tests.server import test_browser as base  # (skips this module without chromium)
from tests.server.conftest import ServerThread, make_tokens
from tests.server.shop import make_shop

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser-keys")]

from playwright.sync_api import Browser, Page, Route, expect  # noqa: E402

browser = base.browser
SPACED = "  Bestellung Ä-7 / Kunde  "  # (app.start takes it; the store keeps it whole)
# Floats whose indexed text (Python's) is not what JavaScript's String() writes.
FLOATS = {"big": 1e21, "huge": 1.5e300, "tiny": 1e-7, "odd": 12345678901234567.0}


async def seed(app: App) -> dict[str, Any]:
    tokens, names = await make_tokens(app)
    spaced = await app.start("invoice", {"id": "S-1"}, idempotency_key=SPACED)
    trimmed = await app.start("invoice", {"id": "S-2"}, idempotency_key=SPACED.strip())
    floats = await app.start("measure", {})
    await floats.result(10)
    return {"tokens": tokens, "names": names, "spaced": spaced.run_id,
            "trimmed": trimmed.run_id, "floats": floats.run_id}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("keys") / "shop.db"
    shop = make_shop(f"sqlite:///{path}", state={"emails_broken": False})

    @shop.workflow
    async def measure(ctx: Any, order: dict[str, Any]) -> None:
        await ctx.set_attributes(**FLOATS)

    with ServerThread(shop, setup=seed) as srv:
        yield srv


def open_as(browser: Browser, server: ServerThread, role: str, address: str) -> Page:
    """A fresh browser logged in as ``role`` at ``address``; ``page.errors`` collects
    uncaught errors and console errors."""
    page = browser.new_context(viewport={"width": 1360, "height": 860}).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.errors = errors  # type: ignore[attr-defined]
    page.goto(server.url + address)
    page.get_by_label("Token").fill(server.result["tokens"][role])
    page.get_by_label("Token").press("Enter")  # (Enter submits the login form)
    page.wait_for_url(server.url + address)
    return page


def test_the_start_form_takes_any_key_app_start_takes(
    browser: Browser, server: ServerThread
) -> None:
    key = "  Rechnung Ö-9 / Kunde 4  "
    page = open_as(browser, server, "operator", "/")
    page.get_by_label("Workflow").select_option("invoice")
    page.get_by_label("Input (JSON, the single argument)").fill('{"id": "F-1"}')
    page.get_by_label("Idempotency key").fill(key)
    page.get_by_role("button", name="Start").click()
    started = page.locator("#start-out .notice.ok a")
    expect(started).to_be_visible()
    run_id = started.inner_text()
    run = page.request.get(f"{server.url}/api/runs/{run_id}").json()
    assert run["idempotency_key"] == key  # (as typed: the key is exact)
    page.get_by_label("Idempotency key").fill("k" * 501)
    page.get_by_role("button", name="Start").click()
    expect(page.locator("#start-out [role=alert]")).to_contain_text(
        "idempotency_key is 501 characters long")
    # (the browser logs the refused request itself; nothing else went wrong)
    assert [e for e in page.errors if "400 (Bad Request)" not in e] == []  # type: ignore[attr-defined]
    page.context.close()


def test_the_runs_form_finds_a_key_with_spaces_at_its_ends(
    browser: Browser, server: ServerThread
) -> None:
    page = open_as(browser, server, "viewer", "/runs")
    rows = page.locator("tbody tr")
    page.get_by_label("Idempotency key").fill(SPACED)
    page.get_by_label("Workflow").fill("  invoice ")  # (a name: trimmed, as ever)
    page.get_by_label("Idempotency key").press("Enter")  # (Enter submits the filters)
    expect(page.get_by_label("Idempotency key")).to_have_value(SPACED)
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-run-id", server.result["spaced"])
    # shown exactly (not collapsed as HTML text is), to be told from the trimmed key
    key_cell = rows.first.locator("td.mono .exact")
    quoted = json.dumps(SPACED, ensure_ascii=False)
    expect(key_cell).to_have_attribute("title", f"Exact key: {quoted}")
    assert key_cell.inner_text() == SPACED
    rows.first.get_by_role("link").first.click()
    expect(page.locator("dd.key .exact")).to_be_visible()
    assert page.locator("dd.key .exact").inner_text() == SPACED
    page.go_back()
    # the trimmed key is another key, found by itself
    page.goto(server.url + "/runs?idempotency_key=" + quote(SPACED.strip()))
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-run-id", server.result["trimmed"])
    assert page.errors == []  # type: ignore[attr-defined]
    page.context.close()


def test_an_attribute_link_of_any_float_finds_its_run(
    browser: Browser, server: ServerThread
) -> None:
    run_id = server.result["floats"]
    page = open_as(browser, server, "viewer", f"/runs/{run_id}")
    links = page.locator("dd.attributes a.attr")
    expect(links).to_have_count(len(FLOATS))
    for name in FLOATS:
        page.goto(server.url + f"/runs/{run_id}")
        page.locator("dd.attributes a.attr", has_text=f"{name}=").click()
        rows = page.locator("tbody tr")
        expect(rows).to_have_count(1)
        expect(rows.first).to_have_attribute("data-run-id", run_id)
    assert page.errors == []  # type: ignore[attr-defined]
    page.context.close()


def test_logging_out_of_a_console_that_does_not_answer_says_so(
    browser: Browser, server: ServerThread
) -> None:
    page = open_as(browser, server, "viewer", "/runs")
    expect(page.locator("tbody tr").first).to_be_visible()

    def down(route: Route) -> None:
        route.abort("connectionrefused")

    page.route("**/api/session", down)
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("alert")).to_contain_text("Log out failed: the console did not answer")
    page.unroute("**/api/session")

    def refused(route: Route) -> None:
        route.fulfill(status=503, content_type="application/json", body=json.dumps({"error": {
            "code": "store_unavailable", "message": "the store is down", "field": None}}))

    page.route("**/api/session", refused)
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("alert")).to_contain_text("Log out failed: the store is down")
    assert page.url == server.url + "/runs"  # (still here: the session was not ended)
    page.unroute("**/api/session")
    # (the browser logs the failed requests themselves; nothing else went wrong)
    assert [e for e in page.errors  # type: ignore[attr-defined]
            if "ERR_CONNECTION_REFUSED" not in e and "503" not in e] == []
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(server.url + "/login")
    page.context.close()
