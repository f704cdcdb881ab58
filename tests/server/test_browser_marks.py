"""The dashboard in a real browser (as tests/server/test_browser.py drives it) with no
live worker: the overview says no worker serves the live runs (long before they count
as stalled), a run cancelled while it waited in a queue says its cancel is pending, a
stalled run says on the stalled page why (its detail, as `cantata stalled`), and a step
whose branch the workflow's own code cancelled is marked on the run's page and in its
trace."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import pytest

from cantata import App
from tests.server import test_browser as base  # (skips this module without chromium)
from tests.server.conftest import ServerThread, make_tokens
from tests.server.shop import make_shop
from tests.server.test_flow_api import with_flow
from tests.server.test_run_marks import with_split

# One xdist worker runs this module: its server (seeded) and Chromium are module
# fixtures, made once instead of once per worker that gets one of its tests.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser-marks")]

from playwright.sync_api import Browser, expect  # noqa: E402 (once chromium is known there)

browser = base.browser
img = base.img
login = base.login
WAIT = 15_000  # ms: the suite runs under load


def shop_of(url: str) -> App:
    return with_split(with_flow(make_shop(url)))


async def seed(app: App) -> dict[str, Any]:
    """A worker runs the split order (its label fails, the packing's branch is cancelled
    while it packs) and stops; then two runs are queued with no worker to begin them,
    and the first is cancelled."""
    tokens, names = await make_tokens(app)
    worker = shop_of(str(app._store_spec))
    async with worker:
        split = await worker.start("split_order", {"id": "S-1"})
        with contextlib.suppress(Exception):  # it fails: the point
            await split.result(30)
    queued = [await app.start("await_approval", {"id": f"Q-{i}"}, queue="fragile")
              for i in range(2)]
    await queued[0].cancel()
    return {"tokens": tokens, "names": names, "split": split.run_id,
            "cancelled": queued[0].run_id, "queued": queued[1].run_id}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("browser-marks") / "shop.db"
    with ServerThread(shop_of(f"sqlite:///{path}"), serve=False, setup=seed) as srv:
        yield srv


def test_the_overview_says_no_worker_serves_the_waiting_runs(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    page = login(browser, server, "viewer", img)
    panel = page.locator("section.panel").filter(has=page.get_by_role("heading",
                                                                      name=re.compile("Stalled")))
    banner = panel.locator("#no-worker")
    expect(banner).to_contain_text("No worker is serving this app", timeout=WAIT)
    expect(banner).to_contain_text("2 runs are waiting or running", timeout=WAIT)
    expect(panel).not_to_contain_text("Nothing is stuck", timeout=WAIT)
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_run_cancelled_in_its_queue_says_its_cancel_is_pending(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    page = login(browser, server, "viewer", img)
    page.goto(f"{server.url}/trace/{server.result['cancelled']}")
    where = page.locator(".where")
    expect(where).to_contain_text("cancel requested while queued in 'fragile'", timeout=WAIT)
    expect(where).not_to_contain_text("behind", timeout=WAIT)
    page.goto(f"{server.url}/runs/{server.result['cancelled']}")
    expect(page.locator(".headline")).to_contain_text("cancelling", timeout=WAIT)
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_step_whose_branch_was_cancelled_is_marked(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    page = login(browser, server, "viewer", img)
    page.goto(f"{server.url}/runs/{server.result['split']}")
    pack = page.locator('tr[data-key="pack#1"] td.status')
    expect(pack).to_contain_text("completed", timeout=WAIT)
    expect(pack.locator(".branch-cancelled")).to_have_text("branch cancelled", timeout=WAIT)
    expect(pack.locator(".branch-cancelled")).to_have_attribute(
        "title", re.compile("cancelled by the workflow's own code"))
    expect(page.locator('tr[data-key="label#1"] td.status')).to_have_text("failed", timeout=WAIT)
    page.goto(f"{server.url}/trace/{server.result['split']}")
    marked = page.locator('svg.timeline g.tl-row[data-cancelled="true"]')
    expect(marked).to_have_count(1, timeout=WAIT)
    expect(marked).to_contain_text("pack", timeout=WAIT)
    expect(marked).to_contain_text("completed · branch cancelled", timeout=WAIT)
    assert page.errors == []  # type: ignore[attr-defined]


def test_the_stalled_page_says_why_each_transaction_is_stuck(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    """The queued run's place, as the detail column of `cantata stalled` shows it (the
    page showed only a last error, empty here)."""
    page = login(browser, server, "viewer", img)
    page.goto(f"{server.url}/stalled?older_than=0")
    row = page.locator("tr").filter(has_text=server.result["queued"])
    expect(row).to_contain_text("queued in 'fragile' behind 0 run(s)", timeout=WAIT)
    assert page.errors == []  # type: ignore[attr-defined]
