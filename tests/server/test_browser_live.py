"""The console in a real browser (Debian's chromium, as tests/server/test_browser.py
drives it): live updates (a step that completes shows on its run's page while the run
keeps running, a page redraws on a busy app whose changes never pause, a group retired
elsewhere leaves the Groups page at once, not at its 5 s timer), the Audit page for
admins, and the choreography map of an app with a choreographed saga (a graph with
cycles) drawn in as many columns as it needs (docs/console.md)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from cantata import App, Saga, Step
from tests.helpers import eventually
from tests.server import test_browser as base  # (skips this module without chromium)
from tests.server.conftest import ServerThread, make_tokens
from tests.server.shop import make_shop
from tests.server.test_groups_api import ledger_worker

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser-live")]

from playwright.sync_api import Browser, expect  # noqa: E402 (once chromium is known there)

browser = base.browser
img = base.img
login = base.login

GATES = {"first": threading.Event(), "second": threading.Event()}


def live_shop(url: str, state: dict[str, Any]) -> App:
    app = make_shop(url, state=state)

    @app.step
    def first(n: int) -> int:  # (sync: runs in a thread, waits for the test)
        GATES["first"].wait(10)
        return n

    @app.step
    def second(n: int) -> int:
        GATES["second"].wait(10)
        return n

    @app.workflow
    async def gated(ctx: Any, n: int) -> int:
        await ctx.run(first, n)
        return int(await ctx.run(second, n))

    @app.workflow
    async def quick(ctx: Any, n: int) -> int:
        return n

    @app.step
    def pack(order: dict[str, Any]) -> None:
        return None

    @app.step
    def unpack(order: dict[str, Any]) -> None:
        return None

    @app.step
    def post(order: dict[str, Any]) -> None:
        return None

    for kind in ("refund", "return", "review", "rating"):  # (other services' handlers)
        async def noted(event: Any) -> None:
            return None

        app.on(f"order.{kind}ed", group=f"{kind}s")(noted)

    # (its map has cycles: the workflow emits delivery.started and waits for
    # delivery.finished, which its hops emit)
    app.include(Saga("delivery", Step(pack, compensate=unpack), Step(post),
                     mode="choreographed"))
    return app


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    url = f"sqlite:///{tmp_path_factory.mktemp('browser-live') / 'shop.db'}"
    state: dict[str, Any] = {"emails_broken": False}

    async def seed(app: App) -> dict[str, Any]:
        async with ledger_worker(url):  # a service that ran, then went away
            pass
        tokens, names = await make_tokens(app)
        return {"tokens": tokens, "names": names, "state": state}

    with ServerThread(live_shop(url, state), setup=seed) as srv:
        yield srv


def test_a_step_that_completes_shows_while_its_run_keeps_running(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    app = server.app
    handle = server.run(lambda: app.start("gated", 1))

    async def running() -> bool:
        return str(await handle.status()) == "running"

    server.run(lambda: eventually(running, timeout=10, what="the run running"))
    page = login(browser, server, "viewer", img)
    try:
        page.goto(f"{server.url}/runs/{handle.run_id}")
        first = page.locator('tr[data-key="first#1"] td.status')
        expect(first).to_have_text("running")
        expect(page.locator("#live")).to_be_visible()  # (the page's redraw on connecting,
        page.wait_for_timeout(400)                      # drawn before first completes)
        GATES["first"].set()  # first completes; the run runs on, in second
        expect(first).to_have_text("completed", timeout=2000)
        expect(page.locator(".headline .badge").first).to_have_text("running")
        expect(page.locator('tr[data-key="second#1"] td.status')).to_have_text("running")
    finally:
        GATES["first"].set()
        GATES["second"].set()
        page.close()


def test_a_page_redraws_while_the_app_never_pauses(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    app = server.app
    page = login(browser, server, "viewer", img)
    page.goto(f"{server.url}/dead-letters")
    expect(page.get_by_text("No dead letters")).to_be_visible()

    async def busy() -> asyncio.Task[None]:
        async def traffic() -> None:  # a run every 100 ms: its changes never pause
            n = 0
            while True:
                n += 1
                await app.start("quick", n)
                await asyncio.sleep(0.1)

        task = asyncio.create_task(traffic())
        await asyncio.sleep(0.5)
        server.result["state"]["emails_broken"] = True
        await app.publish("order.placed", {"order_id": "busy-1"})
        return task

    task = server.run(busy)
    try:
        expect(page.locator("td", has_text="SMTP server refused")).to_be_visible(timeout=3000)
    finally:
        assert server.loop is not None
        server.loop.call_soon_threadsafe(task.cancel)
        server.result["state"]["emails_broken"] = False
        page.close()


def test_a_group_retired_elsewhere_leaves_the_groups_page_at_once(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    app = server.app

    async def known() -> bool:  # once this app's worker says which groups it serves
        return any(g.stats.group == "emails" and g.served for g in await app.groups())

    server.run(lambda: eventually(known, timeout=10, what="the app's groups known"))
    page = login(browser, server, "viewer", img)
    page.goto(f"{server.url}/groups")
    ledger = page.locator('tr[data-group="ledger"]')
    expect(ledger.locator("td.served")).to_have_text("no live worker")
    expect(page.locator("#live")).to_be_visible()
    page.wait_for_timeout(800)  # (the page reads the groups again once connected: done)
    # (its 5 s timer reads nothing while the tab is hidden: only the stream may tell)
    page.evaluate("Object.defineProperty(document, 'hidden', { get: () => true })")
    server.run(lambda: app.retire_group("ledger", actor="cli:elsewhere"))
    # Up to 10 s: the hidden tab's timer reads nothing, so only the stream can remove
    # the row however long this waits (a newcomer's full run on a loaded 2-core machine
    # took more than 2 s to show it).
    expect(ledger).to_have_count(0, timeout=10_000)
    page.close()


def test_an_admin_reads_the_audit_log_and_others_get_no_audit_page(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    app = server.app
    run = server.run(lambda: app.start("quick", 7, actor="token:ann"))
    page = login(browser, server, "admin", img)
    try:
        page.get_by_role("navigation", name="Main").get_by_role("link", name="Audit").click()
        expect(page.get_by_role("heading", name="Audit log")).to_be_visible()
        rows = page.locator("tbody tr")
        expect(rows.first).to_be_visible()
        seqs = [int(s) for s in rows.evaluate_all("rs => rs.map(r => r.dataset.seq)")]
        assert seqs == sorted(seqs, reverse=True)  # newest first
        created = page.locator("tr", has_text="run.created").filter(has_text="token:ann")
        expect(created.get_by_role("link", name=run.run_id)).to_be_visible()
        page.get_by_label("Find in the records read").fill("token:ann")
        expect(page.locator("tbody tr:visible")).to_have_count(1)
        page.get_by_role("button", name="Verify").click()
        expect(page.locator("#audit-verified")).to_contain_text("is intact")
    finally:
        page.close()
    for role in ("operator",):  # (a viewer is refused as an operator is)
        page = login(browser, server, role, img)
        try:
            nav = page.get_by_role("navigation", name="Main")
            expect(nav.get_by_role("link", name="Groups")).to_be_visible()
            expect(nav.get_by_role("link", name="Audit")).to_have_count(0)
            page.goto(f"{server.url}/audit")
            expect(page.get_by_role("alert")).to_contain_text("read by admins")
            expect(page.get_by_role("button", name="Verify")).to_have_count(0)
        finally:
            page.close()


def test_a_choreography_with_cycles_is_drawn_without_empty_columns(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    app = server.app

    async def delivered() -> None:  # (then its start event is seen emitted by its run)
        await (await app.start("delivery", {"id": "D-1"})).result(timeout=10)

    server.run(delivered)
    page = login(browser, server, "viewer", img)
    try:
        page.goto(f"{server.url}/events")
        pack = page.locator('svg.event-map g.node[data-name="delivery.pack: pack"]')
        expect(pack).to_be_visible()
        drawn = page.evaluate("""() => {
            const svg = document.querySelector('svg.event-map');
            const x = (rect) => Number(rect.getAttribute('x'));
            const at = (name) => x(svg.querySelector(`g.node[data-name="${name}"] rect`));
            const xs = [...new Set([...svg.querySelectorAll('g.node rect')].map(x))];
            return { xs: xs.sort((a, b) => a - b), width: Number(svg.getAttribute('width')),
                     started: at('delivery.started'), pack: at('delivery.pack: pack'),
                     done: at('delivery.pack.done'), post: at('delivery.post: post') };
        }""")
        xs = drawn["xs"]
        steps = {b - a for a, b in itertools.pairwise(xs)}
        assert steps == {178 + 54}, xs  # one column after another, none left empty
        assert drawn["width"] == xs[-1] + 178 + 16
        # the saga's hops read left to right, in their order
        assert drawn["started"] < drawn["pack"] < drawn["done"] < drawn["post"]
    finally:
        page.close()


def test_an_action_the_console_never_answered_says_so_not_failed_to_fetch(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    page = login(browser, server, "operator", img)
    try:
        page.route("**/api/workflows/*/runs", lambda route: route.abort())  # (no answer)
        page.select_option("#start-workflow", "quick")
        page.fill("#start-input", "1")
        page.get_by_role("button", name="Start").click()
        said = page.locator("#start-out").get_by_role("alert")
        expect(said).to_contain_text("the console did not answer")
        expect(said).to_contain_text("cantata serve")
    finally:
        page.close()


def test_a_choreographed_run_points_to_its_hops_and_forks_from_its_start(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    app = server.app
    run = server.run(lambda: app.start("delivery", {"id": "D-9"}))
    server.run(lambda: run.result(timeout=10))
    page = login(browser, server, "operator", img)
    try:
        page.goto(f"{server.url}/runs/{run.run_id}")
        hops = page.locator("#hops")
        expect(hops).to_contain_text("choreographed saga")
        expect(hops.get_by_role("link", name="its trace")).to_have_attribute(
            "href", f"/trace/{run.run_id}")
        # not from its wait (the fork would wait for an end that never comes)
        assert page.locator("#fork-step option").evaluate_all(
            "os => os.map(o => o.value)") == ["emit:delivery.started#1"]
    finally:
        page.close()


def test_each_page_asks_the_stream_for_what_it_draws(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    """A page's live stream carries the kinds of change it redraws for: the overview
    no step or delivery (the most frequent changes of a busy app), a run's page its
    steps; the audit log every kind (docs/console.md, "Live changes")."""
    page = login(browser, server, "admin", img)
    asked: dict[str, str] = {}
    page.on("request", lambda r: asked.__setitem__(page.url, r.url)
            if "/api/stream" in r.url else None)
    run_id = server.run(lambda: server.app.start("quick", 1)).run_id
    for path, kinds in (("/", "?kinds=run,dead_letter,worker"),
                        (f"/runs/{run_id}", "?kinds=run,step"),
                        ("/audit", "")):
        page.goto(f"{server.url}{path}")
        expect(page.locator("#live")).to_be_visible()
        assert asked[page.url].endswith("/api/stream" + kinds), (path, asked)
    assert page.errors == []  # type: ignore[attr-defined]
