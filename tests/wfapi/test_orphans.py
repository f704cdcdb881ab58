"""No false orphan warnings: an event kept for a later wait, a choreographed saga's own
failure events."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pytest

import cantata
from cantata import Retry, Saga, Step, WorkflowContext

from .helpers import make_app


async def test_an_event_published_before_the_run_reaches_its_wait_is_no_orphan(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(store_url)

    @app.workflow
    async def approve(ctx: WorkflowContext, n: int) -> int:
        await ctx.sleep(0.3)  # the approval is published while the run sleeps
        ev = await ctx.wait_for_event("invoice.approved", match={"n": n})
        return int(ev.data["n"])

    with caplog.at_level(logging.WARNING, logger="cantata"):
        async with app:
            handle = await app.start(approve, 4)
            await app.publish("invoice.approved", {"n": 4})
            assert await handle.result(timeout=20) == 4
            assert app.metrics.orphans == {}
            # a client process that declares nothing of its own agrees
            if not store_url.startswith("memory://"):
                client = make_app(store_url)
                async with client.client():
                    await client.publish("invoice.approved", {"n": 5})
                    assert client.metrics.orphans == {}
    assert not [r for r in caplog.records if "orphan" in r.getMessage()]


async def test_a_choreographed_saga_reports_no_orphans_of_its_own_events(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(store_url)
    once = Retry(max_attempts=1)

    @app.step(retry=once)
    async def reserve(order: dict[str, Any]) -> str:
        if order.get("fail") == "reserve":
            raise RuntimeError("no stock")
        return "reserved"

    @app.step
    async def release(order: dict[str, Any]) -> None: ...

    @app.step(retry=once)
    async def charge(order: dict[str, Any]) -> str:
        if order.get("fail") == "charge":
            raise RuntimeError("card declined")
        return "charged"

    app.include(Saga("order", Step(reserve, compensate=release), Step(charge),
                     mode="choreographed"))
    with caplog.at_level(logging.WARNING, logger="cantata"):
        async with app:
            for fail in ("reserve", "charge", None):
                handle = await app.start("order", {"fail": fail})
                with contextlib.suppress(cantata.WorkflowError):
                    await handle.result(timeout=15)
            assert app.metrics.orphans == {}
    assert not [r.getMessage() for r in caplog.records if "orphan" in r.getMessage()]


APPROVED = "invoice.approved"


def test_the_waited_types_are_read_from_the_workflow_code() -> None:
    from cantata.declare.waits import literal_waits

    local = "order.paid"

    async def wf(ctx: WorkflowContext, computed: str) -> None:
        await ctx.wait_for_event(APPROVED)
        await ctx.wait_for_event(local, match={"id": 1})
        await ctx.wait_for_event(type="order.shipped")
        await ctx.wait_for_event(computed)  # known only at run time: declared then

    assert literal_waits(wf) == {"invoice.approved", "order.paid", "order.shipped"}
    app = make_app("memory://")
    app.workflow(wf)
    assert ("wf", "order.paid") in app.waits
