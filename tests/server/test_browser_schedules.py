"""The Schedules and Queues pages in a real browser (Debian's chromium, as
tests/server/test_browser.py drives it): an operator pauses, triggers and resumes a
schedule, a change made elsewhere arrives live, the queues page shows a queue's depth
and follows it, a viewer sees no button, nothing scrolls sideways on a phone.
Screenshots go to docs/img/ for docs/console.md (CANTATA_SCREENSHOTS=1)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cantata import App, Rate
from tests.server import test_browser as base  # (skips this module without chromium)
from tests.server.conftest import ServerThread, make_tokens
from tests.server.shop import make_shop
from tests.server.test_flow_api import with_flow

# One xdist worker runs this module: its server (seeded) and Chromium are module
# fixtures, made once instead of once per worker that gets one of its tests.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser-schedules")]

from playwright.sync_api import Browser, expect  # noqa: E402 (once chromium is known there)

# The fixtures and helpers of the console's other browser tests.
browser = base.browser
img = base.img
login = base.login
shot = base.shot
SCHEDULE_BUTTONS = ("Pause", "Resume", "Trigger", "Delete", "Create")


async def seed(app: App) -> dict[str, Any]:
    tokens, names = await make_tokens(app)
    await app.schedules.create("weekly-sync", "15 4 * * 1", "yearly_report",
                               timezone="Europe/Berlin", overlap="buffer_one", catch_up="last")
    # a schedule that has ticked (its last run shows), then paused
    await app.schedules.create("every-second", None, "yearly_report", every=1)
    for _ in range(400):
        [ticking] = [s for s in await app.schedules.list() if s.name == "every-second"]
        if ticking.last_run_id is not None:
            break
        await asyncio.sleep(0.05)
    await app.schedules.pause("every-second")
    # the page shows that run's status: let it end first (under load it may still run)
    [ticked] = [s for s in await app.schedules.list() if s.name == "every-second"]
    assert ticked.last_run_id is not None
    await app.get_handle(ticked.last_run_id).result(timeout=60)
    # one approval holds the fragile queue's one slot: two runs wait behind it
    queued = [await app.start("await_approval", {"id": f"Q-{i}"}, queue="fragile")
              for i in range(3)]
    return {"tokens": tokens, "names": names, "queued": [h.run_id for h in queued]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("browser-flow") / "shop.db"
    app = with_flow(make_shop(f"sqlite:///{path}"))
    with ServerThread(app, setup=seed) as srv:
        yield srv


def row(page: Any, name: str) -> Any:
    return page.locator(f'tr[data-schedule="{name}"]')


def test_an_operator_pauses_triggers_and_resumes_a_schedule(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    page = login(browser, server, "operator", img)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Schedules").click()
    expect(page.get_by_role("heading", name="Schedules", exact=True)).to_be_visible()
    yearly = row(page, "yearly_report")
    expect(yearly.locator("td.status")).to_have_text("active")
    expect(yearly).to_contain_text("0 3 1 1 *")
    expect(yearly.locator("td.next time").first).to_have_text(
        re.compile(r"^Jan 01, (\d{4}, )?03:00:00 UTC$"))
    # the schedule that ticked: its last run, the tick it was for, that run's status
    ticked = row(page, "every-second")
    expect(ticked.locator("td.status")).to_have_text("paused")
    expect(ticked.locator("td.last")).to_contain_text("completed")
    expect(ticked.locator("td.last time")).to_have_text(re.compile(r" UTC$"))

    yearly.get_by_role("button", name="Pause").click()
    expect(yearly.locator("td.status")).to_have_text("paused")
    expect(page.get_by_role("status").filter(has_text="Paused yearly_report.")).to_be_visible()
    expect(yearly.get_by_role("button", name="Resume")).to_be_visible()
    expect(yearly.get_by_role("button", name="Pause")).to_have_count(0)
    expect(yearly.locator("td.next")).to_have_text("—")

    page.once("dialog", lambda d: d.accept())  # Trigger asks first: it starts a run
    yearly.get_by_role("button", name="Trigger").click()
    started = page.get_by_role("status").filter(has_text="Triggered yearly_report: started run")
    expect(started).to_be_visible()
    shot(page, "schedules.png")
    run_id = started.get_by_role("link").inner_text()

    yearly.get_by_role("button", name="Resume").click()
    expect(yearly.locator("td.status")).to_have_text("active")
    expect(yearly.locator("td.next time")).to_have_count(3)

    # a change made elsewhere (the CLI, another console) arrives on the live stream
    expect(page.locator("#live")).to_be_visible()
    weekly = row(page, "weekly-sync")
    expect(weekly.locator("td.status")).to_have_text("active")
    server.run(lambda: server.app.schedules.pause("weekly-sync", actor="cli:ann@host"))
    expect(weekly.locator("td.status")).to_have_text("paused", timeout=10_000)
    server.run(lambda: server.app.schedules.resume("weekly-sync", actor="cli:ann@host"))
    expect(weekly.locator("td.status")).to_have_text("active", timeout=10_000)

    # each action is the operator's in the audit log
    token = f"token:{server.result['names']['operator']}"
    records = server.run(lambda: server.app.store.audit_records(server.app.name, after_seq=0,
                                                                limit=10_000))
    mine = [(r.action, r.target) for r in records if r.actor == token]
    assert mine == [("schedule.paused", "yearly_report"), ("run.created", run_id),
                    ("schedule.triggered", "yearly_report"),
                    ("schedule.resumed", "yearly_report")]
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_viewer_sees_no_schedule_buttons(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    page = login(browser, server, "viewer", img)
    for path, heading in (("/schedules", "Schedules"), ("/queues", "Queues")):
        page.goto(f"{server.url}{path}")
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
        expect(page.locator("tbody tr").first).to_be_visible()
        page.wait_for_load_state("networkidle")
        for name in (*SCHEDULE_BUTTONS, *base.OPERATOR_BUTTONS):
            expect(page.get_by_role("button", name=name, exact=True)).to_have_count(0)
        expect(page.locator("#new-schedule")).to_have_count(0)  # no New schedule form
    assert page.errors == []  # type: ignore[attr-defined]


def test_the_queues_page_shows_a_queues_depth_and_follows_it(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    page = login(browser, server, "viewer", img)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Queues").click()
    expect(page.get_by_role("heading", name="Queues", exact=True)).to_be_visible()
    fragile = page.locator('tr[data-queue="fragile"]')
    expect(fragile.locator("td.in-progress")).to_have_text("1")
    waiting = int(fragile.locator("td.waiting").inner_text())
    assert waiting >= 2
    expect(fragile.locator("td.limits")).to_have_text("concurrency 1 · rate 5 per 60 s")
    expect(fragile.locator("td.oldest time")).to_have_text(re.compile(r" UTC$"))
    expect(fragile.locator("td.began")).to_contain_text("of 5 in 1 min")
    shot(page, "queues.png")
    expect(page.locator("#live")).to_be_visible()
    server.run(lambda: server.app.start("await_approval", {"id": "Q-more"}, queue="fragile"))
    expect(fragile.locator("td.waiting")).to_have_text(str(waiting + 1), timeout=10_000)
    assert page.errors == []  # type: ignore[attr-defined]


def test_at_phone_width_the_pages_do_not_scroll_sideways(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    page = login(browser, server, "operator", img)
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/queues", "/schedules"):
        page.goto(f"{server.url}{path}")
        expect(page.locator("tbody tr").first).to_be_visible()
        page.wait_for_load_state("networkidle")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, (path, width)
        # every cell is in sight, the operator's buttons too (no table to scroll either)
        # (read in one go: the page redraws its rows as it re-reads, every few seconds)
        boxes = page.evaluate("""[...document.querySelectorAll('tbody td')].map(td => {
            const r = td.getBoundingClientRect(); return [r.left, r.right]; })""")
        assert boxes and all(left >= 0 and right <= 390 for left, right in boxes), (path, boxes)
    expect(page.get_by_role("button", name="Trigger").first).to_be_visible()
    # (read in one go, as the cells: a live redraw may replace the button between reads)
    right = page.evaluate("""Math.max(...[...document.querySelectorAll('button')]
        .filter(b => b.textContent.trim() === 'Trigger')
        .map(b => b.getBoundingClientRect().right))""")
    assert 0 < right <= 390, right
    assert page.errors == []  # type: ignore[attr-defined]


def test_an_answer_read_before_a_change_is_not_drawn_over_one_read_after_it(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    """The page draws again on live events, on its timer and after its buttons, so
    draws overlap: an answer read before a change that comes back last (a busy server)
    must not put the old state back on the page (it stayed until the next change or
    the 15 s timer: a resumed schedule shown paused)."""
    app = server.app
    server.run(lambda: app.schedules.create("overlap", "0 5 * * *", "yearly_report"))
    server.run(lambda: app.schedules.pause("overlap", actor="cli:ann@host"))
    page = login(browser, server, "operator", img)
    page.goto(f"{server.url}/schedules")
    overlap = row(page, "overlap")
    expect(overlap.locator("td.status")).to_have_text("paused")
    expect(page.locator("#live")).to_be_visible()
    held: list[tuple[Any, Any]] = []

    def hold_the_first_read(route: Any) -> None:
        if held or route.request.method != "GET":
            route.continue_()
        else:  # read now ("overlap" paused), answered once the page has moved on
            held.append((route, route.fetch()))

    page.route("**/api/schedules", hold_the_first_read)
    try:
        # a change made elsewhere: the page reads the list again, and that read is held
        server.run(lambda: app.schedules.pause("weekly-sync", actor="cli:ann@host"))
        for _ in range(400):
            if held:
                break
            page.wait_for_timeout(50)
        assert held, "the page did not read the schedules again after a live change"
        overlap.get_by_role("button", name="Resume").click()
        expect(overlap.locator("td.status")).to_have_text("active")
        page.wait_for_timeout(1500)  # (the resume's own live redraw, if any, is drawn)
        stale, answer = held[0]
        stale.fulfill(response=answer)
        page.wait_for_timeout(1000)
        expect(overlap.locator("td.status")).to_have_text("active", timeout=100)
    finally:
        page.unroute("**/api/schedules")
        server.run(lambda: app.schedules.resume("weekly-sync", actor="cli:ann@host"))
        server.run(lambda: app.schedules.delete("overlap"))
    assert page.errors == []  # type: ignore[attr-defined]


def test_an_operator_creates_a_schedule_from_the_form_and_deletes_it(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    page = login(browser, server, "operator", img)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Schedules").click()
    form = page.locator("#new-schedule")
    expect(form).to_be_visible()
    out = form.locator("#sched-out")
    # a bad cron: the server's error, shown at the form, its field marked; nothing made
    page.locator("#sched-name").fill("from the form")
    page.locator("#sched-workflow").select_option("yearly_report")
    page.locator("#sched-cron").fill("61 * * * *")
    form.get_by_role("button", name="Create").click()
    expect(out.get_by_role("alert")).to_contain_text("invalid cron expression '61 * * * *'")
    expect(page.locator("#sched-cron")).to_have_attribute("aria-invalid", "true")
    expect(row(page, "from the form")).to_have_count(0)

    page.locator("#sched-cron").fill("30 6 * * *")
    page.locator("#sched-timezone").fill("Europe/Berlin")
    page.locator("#sched-overlap").select_option("buffer_one")
    form.get_by_role("button", name="Create").click()
    expect(out.get_by_role("status")).to_have_text("Created from the form.")
    expect(page.locator("#sched-cron")).not_to_have_attribute("aria-invalid", "true")
    made = row(page, "from the form")
    expect(made.locator("td.status")).to_have_text("active")
    expect(made.locator("td.spec")).to_contain_text("30 6 * * * (Europe/Berlin)")
    expect(made.locator("td.spec")).to_contain_text("overlap buffer_one")
    expect(made.locator("td.name")).to_contain_text("made at run time")
    # its next ticks: 06:30 in Berlin is 05:30 UTC in winter, 04:30 in summer
    expect(made.locator("td.next time")).to_have_count(3)
    for tick in made.locator("td.next time").all():
        expect(tick).to_have_text(re.compile(r", 0[45]:30:00 UTC$"))

    # every row's buttons (Delete the third) are in sight: the table does not scroll
    wrap = page.locator(".table-wrap").first
    assert wrap.evaluate("w => w.scrollWidth <= w.clientWidth"), wrap.evaluate(
        "w => [w.scrollWidth, w.clientWidth]")

    # the same name again: the 409, inline, at the name; the schedule is left as it is
    page.locator("#sched-name").fill("from the form")
    page.locator("#sched-every").fill("60")
    form.get_by_role("button", name="Create").click()
    expect(out.get_by_role("alert")).to_contain_text("a schedule named 'from the form' exists")
    expect(page.locator("#sched-name")).to_have_attribute("aria-invalid", "true")
    expect(made.locator("td.spec")).to_contain_text("30 6 * * *")

    # Delete is offered for schedules made at run time, not for one still in code
    expect(row(page, "yearly_report").get_by_role("button", name="Delete")).to_have_count(0)
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.once("dialog", answer)  # Delete asks first
    made.get_by_role("button", name="Delete").click()
    expect(made).to_have_count(0)
    expect(page.get_by_role("status").filter(has_text="Deleted from the form.")).to_be_visible()
    assert asked and asked[0].startswith('Delete schedule "from the form"?')
    assert "from the form" not in [s.name for s in server.run(server.app.schedules.list)]

    token = f"token:{server.result['names']['operator']}"
    records = server.run(lambda: server.app.store.audit_records(server.app.name, after_seq=0,
                                                                limit=10_000))
    assert [(r.action, r.target) for r in records
            if r.actor == token and r.target == "from the form"] == [
        ("schedule.created", "from the form"), ("schedule.deleted", "from the form")]
    # (the browser logs the refused requests themselves, the 400 and the 409: no more)
    assert [e for e in page.errors  # type: ignore[attr-defined]
            if not re.search(r"status of (400 \(Bad Request\)|409 \(Conflict\))", e)] == []
    assert len(page.errors) == 2  # type: ignore[attr-defined]


# -- with no live worker: a console opened as a client (cantata serve without a worker) ----

SPACED = "  spaced  name "  # spaces at both ends and doubled: shown exactly


def with_partitions(app: App) -> App:
    """The shop's flow plus a queue whose rate holds per customer (partition)."""
    with_flow(app)
    app.queue("per-customer", rate=Rate(2, per=3600))
    return app


async def seed_unserved(app: App) -> dict[str, Any]:
    """A worker begins partitioned runs (2 of each of 3 customers, the rate; the third
    of each waits an hour) and stops cleanly: no live worker is left, the console alone
    serves the pages."""
    tokens, names = await make_tokens(app)
    await app.schedules.create(SPACED, "0 3 1 1 *", "yearly_report")
    worker = with_partitions(make_shop(str(app._store_spec)))
    async with worker:
        for i in range(9):
            await worker.start("await_approval", {"id": f"P-{i}"}, queue="per-customer",
                               partition=f"customer-{i % 3}")
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            stats = {q.name: q for q in await app.queue_stats()}
            if stats["per-customer"].in_progress == 6:
                break
            assert asyncio.get_running_loop().time() < deadline, stats
            await asyncio.sleep(0.05)
    return {"tokens": tokens, "names": names}


@pytest.fixture(scope="module")
def unserved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("browser-unserved") / "shop.db"
    app = with_partitions(make_shop(f"sqlite:///{path}"))
    with ServerThread(app, serve=False, setup=seed_unserved) as srv:
        yield srv


def test_a_partitioned_queues_figures_are_not_read_against_its_limits(
    browser: Browser, unserved: ServerThread, img: Any
) -> None:
    """6 runs began in the hour of Rate(2, per=3600), held per customer: the sum is said
    to be of all partitions, and the busiest partition's 2 is what is read against 2."""
    page = login(browser, unserved, "viewer", img)
    page.goto(f"{unserved.url}/queues")
    queue = page.locator('tr[data-queue="per-customer"]')
    began = queue.locator("td.began")
    expect(began).to_contain_text("6 in 1.0 h in all partitions")
    expect(began.locator(".per-partition")).to_have_text("busiest partition: 2 of 2")
    assert "of 2 in" not in began.inner_text()  # (the old "6 of 2 in 1 min")
    expect(queue.locator("td.in-progress")).to_contain_text("6 in all partitions")
    expect(queue.locator("td.in-progress .per-partition")).to_have_text("busiest partition: 2")
    expect(queue.locator("td.limits")).to_have_text("rate 2 per 3600 s (each partition)")
    # a queue whose runs have no partition key reads as before
    fragile = page.locator('tr[data-queue="fragile"]')
    expect(fragile.locator("td.limits")).to_have_text("concurrency 1 · rate 5 per 60 s")
    expect(fragile.locator("td.began")).to_have_text("0 of 5 in 1 min")
    assert page.errors == []  # type: ignore[attr-defined]


class Traffic:
    """The page's requests to the schedules API, sent and answered, in seconds from
    when it began to be watched: what a missed notice shows (the click's POST never
    sent, or sent and not answered in time; CI once missed one for 15 s)."""

    def __init__(self, page: Any) -> None:
        self.began = time.monotonic()
        self.seen: list[str] = []
        page.on("request", lambda r: self._note("sent", r))
        page.on("requestfinished", lambda r: self._note("answered", r))
        page.on("requestfailed", lambda r: self._note(f"failed ({r.failure})", r))

    def _note(self, what: str, request: Any) -> None:
        if "/api/schedules" in request.url:
            at = time.monotonic() - self.began
            self.seen.append(f"{at:+.2f} s {what} {request.method} {request.url}")

    @contextlib.contextmanager
    def said(self) -> Iterator[None]:
        try:
            yield
        except AssertionError as failed:
            raise AssertionError(
                f"{failed}\nthe page's schedules requests: {self.seen}") from None


def test_names_with_spaces_at_their_ends_or_doubled_are_shown_exactly(
    browser: Browser, unserved: ServerThread, img: Any
) -> None:
    page = login(browser, unserved, "operator", img)
    page.goto(f"{unserved.url}/schedules")
    name = row(page, SPACED).locator("td.name strong")
    expect(name).to_be_visible()
    # as rendered (innerText follows the CSS): not collapsed to "spaced name"
    assert name.inner_text() == SPACED
    # outlined, its exact text in a tooltip
    expect(name.locator("[title]")).to_have_attribute("title", 'Exact name: "  spaced  name "')
    traffic = Traffic(page)
    row(page, SPACED).get_by_role("button", name="Pause").click()
    done = page.get_by_role("status").filter(has_text="Paused")
    # (the action's POST and the page's read after it: seconds on a loaded machine)
    with traffic.said():
        expect(done).to_be_visible(timeout=15_000)
    assert done.inner_text() == f"Paused {SPACED}."
    row(page, SPACED).get_by_role("button", name="Resume").click()
    with traffic.said():
        expect(page.get_by_role("status").filter(has_text="Resumed")).to_be_visible(
            timeout=15_000)
    for width in (1360, 390):  # on a phone too (the rows are blocks there)
        page.set_viewport_size({"width": width, "height": 844})
        assert row(page, SPACED).locator("td.name strong").inner_text() == SPACED
    assert page.errors == []  # type: ignore[attr-defined]


def test_without_a_live_worker_the_pages_say_nothing_ticks_or_begins(
    browser: Browser, unserved: ServerThread, img: Any
) -> None:
    page = login(browser, unserved, "operator", img)
    page.goto(f"{unserved.url}/schedules")
    banner = page.locator("#no-worker")
    expect(banner).to_contain_text("No worker is serving this app")
    expect(banner).to_contain_text("no schedule ticks")
    expect(row(page, SPACED).locator("td.status")).to_contain_text("no worker: not ticking")

    page.goto(f"{unserved.url}/queues")
    expect(banner).to_contain_text("no queued run begins")
    # a worker starts: the page says so at its next read (every 5 s)
    worker = with_partitions(make_shop(str(unserved.app._store_spec)))
    unserved.run(lambda: worker.open(serve=True))
    try:
        expect(banner).to_have_count(0, timeout=15_000)
    finally:
        unserved.run(worker.close)
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_queued_runs_page_shows_its_queue_its_place_and_follows_it(
    browser: Browser, server: ServerThread, img: Any
) -> None:
    """A run started in a queue shows the queue (a link to it on the queues page), its
    place among the runs waiting there, `running` once it began, and the queue's limits;
    its place moves up live as the runs before it begin. (Last of the module: it lets
    the seeded queue move on.)"""
    first, _, third = server.result["queued"]
    page = login(browser, server, "viewer", img)
    page.goto(f"{server.url}/runs/{first}")
    expect(page.locator("dd.queue-place")).to_have_text(re.compile(r"^running"))
    page.goto(f"{server.url}/runs/{third}")
    expect(page.locator("dd.queue")).to_have_text("fragile priority 0")
    expect(page.locator("dd.queue-limits")).to_have_text("concurrency 1 · rate 5 per 60 s")
    place = page.locator("dd.queue-place")
    expect(place).to_contain_text("waiting: 2nd in line (1 run begins before it), since")
    expect(page.locator("#live")).to_be_visible()
    # the running run ends: the next one begins, and this one is next
    server.run(lambda: server.app.publish("invoice.approved", {"order_id": "Q-0"}))
    expect(place).to_contain_text("waiting: 1st in line (0 runs begin before it)",
                                  timeout=10_000)
    page.locator("dd.queue").get_by_role("link", name="fragile").click()
    expect(page).to_have_url(re.compile(r"/queues\?queue=fragile$"))
    expect(page.locator('tr.chosen[data-queue="fragile"]')).to_be_visible()
    assert page.errors == []  # type: ignore[attr-defined]
