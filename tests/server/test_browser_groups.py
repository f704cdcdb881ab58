"""The Groups page in a real browser (Debian's chromium, as tests/server/test_browser.py
drives it): the handler groups with their backlog and who serves them, an operator
retires a group whose worker is gone, and a viewer sees no Retire button
(docs/console.md)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest

from cantata import App
from tests.server import test_browser as base  # (skips this module without chromium)
from tests.server.conftest import ServerThread, make_tokens
from tests.server.shop import make_shop
from tests.server.test_groups_api import ledger_worker

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser-groups")]

from playwright.sync_api import Browser, expect  # noqa: E402 (once chromium is known there)

browser = base.browser
img = base.img
login = base.login
shot = base.shot


async def seed(app: App, store_url: str, state: dict[str, Any]) -> dict[str, Any]:
    tokens, names = await make_tokens(app)
    # the worker of the ledger and archive groups ran, then stopped: their
    # declarations stay, so the events published since wait for them
    other = ledger_worker(store_url)

    @other.on("order.placed", group="archive")
    async def keep(event: Any) -> None:
        return None

    async with other:
        ledger_id = other.engine.worker_id
    # one email fails for good (a dead letter of the shop's own group)
    state["emails_broken"] = True
    await app.publish("order.placed", {"order_id": 1})
    for _ in range(400):
        if await app.dead_letters():
            break
        await asyncio.sleep(0.05)
    state["emails_broken"] = False
    await app.publish("order.placed", {"order_id": 2})
    return {"tokens": tokens, "names": names, "ledger_worker": ledger_id}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    url = f"sqlite:///{tmp_path_factory.mktemp('browser-groups') / 'shop.db'}"
    state: dict[str, Any] = {"emails_broken": False}
    app = make_shop(url, state=state)
    with ServerThread(app, setup=lambda a: seed(a, url, state)) as srv:
        yield srv


def row(page: Any, name: str) -> Any:
    return page.locator(f'tr[data-group="{name}"]')


def test_an_operator_retires_a_group_no_live_worker_serves(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    page = login(browser, server, "operator", img)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Groups").click()
    expect(page.get_by_role("heading", name="Handler groups", exact=True)).to_be_visible()
    ledger = row(page, "ledger")
    expect(ledger.locator("td.kind")).to_have_text("handler")
    expect(ledger.locator("td.patterns")).to_have_text("order.placed")
    expect(ledger.locator("td.pending")).to_contain_text("2")
    expect(ledger.locator("td.pending .oldest time")).to_have_text(
        re.compile(r" UTC$"))
    # (the page reads the groups every 5 s: the stopped worker's lease runs out)
    expect(ledger.locator("td.served")).to_have_text("no live worker", timeout=15_000)
    # the shop serves its own group; its dead letter links to the dead letters page
    emails = row(page, "emails")
    expect(emails.locator("td.served")).to_have_text(server.app.engine.worker_id)
    expect(emails.get_by_role("button", name="Retire")).to_have_count(0)
    expect(emails.locator("td.dead a")).to_have_attribute("href", "/dead-letters?group=emails")
    shot(page, "groups.png")

    page.once("dialog", lambda d: d.accept())  # Retire asks first: deliveries end unhandled
    ledger.get_by_role("button", name="Retire").click()
    expect(page.get_by_role("status").filter(
        has_text="Retired ledger: 2 pending deliveries ended unhandled.")).to_be_visible()
    expect(ledger).to_have_count(0)
    expect(row(page, "archive").get_by_role("button", name="Retire")).to_be_visible()

    # declined at the confirmation: nothing happens
    page.once("dialog", lambda d: d.dismiss())
    row(page, "archive").get_by_role("button", name="Retire").click()
    expect(row(page, "archive").locator("td.pending")).to_contain_text("2")

    token = f"token:{server.result['names']['operator']}"
    records = server.run(lambda: server.app.store.audit_records(server.app.name, after_seq=0,
                                                                limit=10_000))
    assert [(r.action, r.target) for r in records if r.actor == token] == [
        ("group.retired", "ledger")]
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_viewer_sees_the_groups_and_no_retire_button(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    page = login(browser, server, "viewer", img)
    page.goto(f"{server.url}/groups")
    expect(page.get_by_role("heading", name="Handler groups", exact=True)).to_be_visible()
    archive = row(page, "archive")
    expect(archive.locator("td.served")).to_have_text("no live worker")
    page.wait_for_load_state("networkidle")
    expect(page.get_by_role("button", name="Retire")).to_have_count(0)
    assert page.errors == []  # type: ignore[attr-defined]


def test_the_groups_page_does_not_scroll_sideways_on_a_phone(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    page = login(browser, server, "operator", img)
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{server.url}/groups")
    expect(row(page, "archive").get_by_role("button", name="Retire")).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
