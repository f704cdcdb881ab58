"""cantata.testing: the skipping clock and crash injection at every checkpoint."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

import cantata
from cantata import App, Retry, testing


def build(ledger: list[str], idempotent_release: bool) -> App:
    app = App("t")

    @app.step
    async def reserve(order: dict[str, Any]) -> str:
        key = cantata.step_info().idempotency_key.split(":", 1)[1]  # run id varies per run
        if key not in ledger:  # idempotent: keyed by the step's idempotency key
            ledger.append(key)
        return "r"

    @app.step
    async def release(order: dict[str, Any]) -> None:
        if not idempotent_release or "release" not in ledger:
            ledger.append("release")

    @app.step(retry=Retry(max_attempts=2, initial_interval=1, non_retryable=(ValueError,)))
    async def charge(order: dict[str, Any]) -> str:
        if order["fail"]:
            raise ValueError("declined")
        return "c"

    @app.workflow
    async def place(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
        await ctx.run(reserve, order, compensate=release)
        await ctx.sleep(3600)
        await ctx.run(charge, order)
        return {"ok": True}

    return app


async def test_an_hour_of_sleep_passes_at_once() -> None:
    app = build([], True)
    started = time.monotonic()
    async with testing.environment(app):
        handle = await app.start("place", {"fail": False})
        assert await handle.result(timeout=10) == {"ok": True}
    assert time.monotonic() - started < 5


async def test_a_handlers_hours_of_retry_backoff_pass_at_once() -> None:
    """Handler retries read the app's clock as step retries do: a failing handler
    reaches the dead-letter queue after hours of backoff, in well under a second."""
    app = App("t")
    seen: list[float] = []

    @app.on("thing.happened", group="g",
            retry=Retry(max_attempts=4, initial_interval=3600, max_interval=86400, jitter=0.0))
    async def flaky(event: cantata.Event[Any]) -> None:
        seen.append(app.clock.now())
        raise RuntimeError("downstream unavailable")

    started = time.monotonic()
    async with testing.environment(app):
        await app.publish("thing.happened", {})

        async def dead() -> bool:
            return len(await app.dead_letters()) == 1

        await testing.eventually(dead, timeout=10)
    assert time.monotonic() - started < 5
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert len(seen) == 4
    for gap, nominal in zip(gaps, (3600, 7200, 14400), strict=True):  # virtual hours
        assert nominal <= gap < nominal + 5, gaps


@pytest.mark.parametrize("fail", [False, True])
async def test_idempotent_flows_survive_a_crash_at_every_checkpoint(fail: bool) -> None:
    ledger: list[str] = []
    app = build(ledger, idempotent_release=True)
    report = await testing.crash_test(app, "place", {"fail": fail},
                                      effects=lambda: sorted(ledger), reset=ledger.clear)
    assert report.clean.status == ("compensated" if fail else "completed")
    # a crash right after the start is stored, then before and after each later checkpoint
    assert len(report.points) >= 7 and report.points[0].when == "after"
    report.assert_ok()


async def test_a_compensation_that_is_not_idempotent_is_reported() -> None:
    ledger: list[str] = []
    app = build(ledger, idempotent_release=False)
    report = await testing.crash_test(app, "place", {"fail": True},
                                      effects=lambda: sorted(ledger), reset=ledger.clear)
    assert report.failures
    with pytest.raises(AssertionError, match="crash safety violated"):
        report.assert_ok()


async def test_a_simulated_crash_is_a_kill_the_cut_attempt_counts() -> None:
    """After its crash the worker writes nothing (it excuses no attempt): a step that
    ran but whose result was not stored is a WorkerLost attempt, as under kill -9."""
    # Before failing the run for its lost attempts, the engine waits up to one lease
    # for an excuse that never comes (docs/leases.md): of the skip clock's time, so the
    # default 10 s lease costs no real time.
    app = App("t")
    began = time.monotonic()
    charges: list[int] = []

    @app.step(retry=Retry(max_attempts=1))
    async def charge(order: dict[str, Any]) -> str:
        charges.append(order["id"])
        return "charged"

    @app.workflow
    async def pay(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> str:
        result: str = await ctx.run(charge, order)
        return result

    report = await testing.crash_test(app, pay, {"id": 1},
                                      effects=lambda: list(charges), reset=charges.clear)
    assert report.clean.status == "completed"
    # checkpoint 2 stores charge's result: a crash before it cuts the only attempt
    cut = next(p for p in report.points if (p.checkpoint, p.when) == (2, "before"))
    assert cut.outcome.status == "failed" and "WorkerLost" in (cut.outcome.error or "")
    assert cut.effects == [1] and not cut.same  # charged once, never again
    stored = next(p for p in report.points if (p.checkpoint, p.when) == (2, "after"))
    assert stored.outcome.status == "completed" and stored.effects == [1] and stored.same
    assert time.monotonic() - began < 5.0  # (a lease of real time: 10 s and more)
