"""Retries, attempts, backoff, per-step timeouts and sync steps."""

from __future__ import annotations

import asyncio
import io
import itertools
import math
import re
import threading
import time
from typing import Any

import pytest
from rich.console import Console

import cantata
from cantata import (
    CantataError,
    Retry,
    StepFailed,
    StepTimeout,
    WorkflowContext,
    WorkflowFailed,
)
from cantata.observability.trace import render_timeline

from .helpers import eventually, make_app


async def test_step_is_retried_with_attempts_counted_from_one(store_url: str) -> None:
    app = make_app(store_url)
    seen: list[cantata.StepInfo] = []

    @app.step(retry=Retry(max_attempts=3, initial_interval=0.01))
    async def charge(amount: int) -> str:
        seen.append(cantata.step_info())
        if len(seen) < 3:
            raise ConnectionError(f"gateway busy ({len(seen)})")
        return f"charged {amount}"

    @app.workflow
    async def pay(ctx: WorkflowContext, amount: int) -> str:
        return str(await ctx.run(charge, amount))

    async with app:
        h = await app.start(pay, 7)
        assert await h.result(timeout=5) == "charged 7"
        attempts = await app.store.load_attempts(app.name, h.run_id)
    assert [s.attempt for s in seen] == [1, 2, 3]
    assert {s.step for s in seen} == {"charge"}
    assert {s.run_id for s in seen} == {h.run_id}
    # every attempt is recorded with its start, end, error type and text
    assert [(a.attempt, a.error_type) for a in attempts] == [
        (1, "ConnectionError"), (2, "ConnectionError"), (3, None),
    ]
    assert attempts[0].error == "gateway busy (1)"
    assert all(a.ended_at is not None and a.ended_at >= a.started_at for a in attempts)


async def test_exhausted_retries_raise_step_failed_naming_the_original_error(
    store_url: str,
) -> None:
    app = make_app(store_url)
    count = 0

    @app.step(retry=Retry(max_attempts=3, initial_interval=0.01))
    async def charge(amount: int) -> None:
        nonlocal count
        count += 1
        raise ConnectionError(f"gateway down for {amount}")

    @app.workflow
    async def pay(ctx: WorkflowContext, amount: int) -> dict[str, object]:
        try:
            await ctx.run(charge, amount)
        except StepFailed as exc:
            return {
                "step": exc.step, "type": exc.error_type, "message": exc.error_message,
                "attempts": exc.attempts, "text": str(exc),
                "is_cantata": isinstance(exc, CantataError),
            }
        return {}

    async with app:
        h = await app.start(pay, 12)
        out = await h.result(timeout=5)
    assert count == 3
    assert out["step"] == "charge"
    assert out["type"] == "ConnectionError"
    assert out["message"] == "gateway down for 12"
    assert out["attempts"] == 3
    assert "ConnectionError" in str(out["text"]) and "gateway down for 12" in str(out["text"])
    assert out["is_cantata"] is True


async def test_uncaught_step_failure_fails_the_run_with_the_original_error(
    store_url: str,
) -> None:
    app = make_app(store_url)

    @app.step(retry=Retry(max_attempts=2, initial_interval=0.01))
    async def charge(amount: int) -> None:
        raise KeyError("no such card")

    @app.workflow
    async def pay(ctx: WorkflowContext, amount: int) -> None:
        await ctx.run(charge, amount)

    async with app:
        h = await app.start(pay, 1)
        with pytest.raises(WorkflowFailed) as info:
            await h.result(timeout=5)
    err = info.value.error or ""
    assert err.startswith("StepFailed")
    assert "KeyError" in err and "no such card" in err


async def test_non_retryable_error_fails_at_once(store_url: str) -> None:
    app = make_app(store_url)
    count = 0

    @app.step(retry=Retry(max_attempts=5, initial_interval=0.01, non_retryable=(ValueError,)))
    async def charge(amount: int) -> None:
        nonlocal count
        count += 1
        raise ValueError(f"amount {amount} is negative")

    @app.workflow
    async def pay(ctx: WorkflowContext, amount: int) -> str:
        try:
            await ctx.run(charge, amount)
        except StepFailed as exc:
            return f"{exc.error_type}/{exc.attempts}/{exc.error_message}"
        return "?"

    async with app:
        h = await app.start(pay, -3)
        assert await h.result(timeout=5) == "ValueError/1/amount -3 is negative"
        attempts = await app.store.load_attempts(app.name, h.run_id)
    assert count == 1
    assert len(attempts) == 1


async def test_non_retryable_matches_subclasses() -> None:
    app = make_app("memory://")  # the engine decides, whatever the backend
    count = 0

    class CardDeclined(ValueError):
        pass

    @app.step(retry=Retry(max_attempts=5, initial_interval=0.01, non_retryable=(ValueError,)))
    async def charge() -> None:
        nonlocal count
        count += 1
        raise CardDeclined("declined")

    @app.workflow
    async def pay(ctx: WorkflowContext) -> None:
        await ctx.run(charge)

    async with app:
        h = await app.start(pay)
        with pytest.raises(WorkflowFailed, match="CardDeclined"):
            await h.result(timeout=5)
    assert count == 1


async def test_backoff_is_roughly_exponential() -> None:
    app = make_app("memory://")
    starts: list[float] = []

    @app.step(retry=Retry(max_attempts=4, initial_interval=0.05, backoff=3.0, jitter=0.1))
    async def flaky() -> None:
        starts.append(time.monotonic())
        raise ConnectionError("still down")

    @app.workflow
    async def wf(ctx: WorkflowContext) -> None:
        await ctx.run(flaky)

    async with app:
        h = await app.start(wf)
        with pytest.raises(WorkflowFailed):
            await h.result(timeout=5)
    assert len(starts) == 4
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # nominal 0.05, 0.15, 0.45 s (+/- 10 % jitter, plus a little bookkeeping)
    for gap, nominal in zip(gaps, (0.05, 0.15, 0.45), strict=True):
        assert nominal * 0.85 <= gap <= nominal * 1.1 + 0.1, gaps
    assert gaps[2] / gaps[0] >= 3.0, gaps
    assert gaps[2] / gaps[1] >= 1.8, gaps


async def test_backoff_is_capped_by_max_interval() -> None:
    app = make_app("memory://")
    starts: list[float] = []

    @app.step(retry=Retry(max_attempts=4, initial_interval=0.05, backoff=10.0,
                          max_interval=0.06, jitter=0.0))
    async def flaky() -> None:
        starts.append(time.monotonic())
        raise ConnectionError("still down")

    @app.workflow
    async def wf(ctx: WorkflowContext) -> None:
        await ctx.run(flaky)

    async with app:
        h = await app.start(wf)
        with pytest.raises(WorkflowFailed):
            await h.result(timeout=5)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.045
    assert all(g < 0.06 + 0.12 for g in gaps), gaps  # capped: never 0.5 or 5 s


def test_retry_policy_delays() -> None:
    r = Retry(max_attempts=5, initial_interval=0.1, backoff=2.0, max_interval=0.5, jitter=0.0)
    assert [r.delay(n) for n in (1, 2, 3, 4, 5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    jittered = Retry(initial_interval=1.0, jitter=0.1)
    for _ in range(50):
        assert 0.9 <= jittered.delay(1) <= 1.1
    defaults = Retry()
    assert (defaults.max_attempts, defaults.initial_interval, defaults.backoff,
            defaults.max_interval) == (3, 0.5, 2.0, 30.0)
    with pytest.raises(CantataError):
        Retry(max_attempts=0)


def test_max_interval_caps_the_delay_jitter_included() -> None:
    """The cap applies after the jitter: no delay is above max_interval (Retry()'s
    capped delays were up to 33 s), and a long run of attempts cannot overflow."""
    capped = Retry()
    delays = [capped.delay(10) for _ in range(500)]
    assert max(delays) <= 30.0
    assert min(delays) >= 27.0  # the jitter still spreads them below the cap
    assert len(set(delays)) > 1
    assert Retry(max_attempts=5000, jitter=0.0).delay(4000) == 30.0
    small = Retry(initial_interval=1.0, max_interval=10.0, jitter=0.5)
    assert all(0.5 <= small.delay(1) <= 1.5 for _ in range(200))  # below the cap: +/-


def test_retry_intervals_longer_than_100_years_are_refused_naming_the_limit() -> None:
    for option in ("initial_interval", "max_interval"):
        for value in (1e16, math.inf):
            options: dict[str, Any] = {option: value}
            with pytest.raises(cantata.ConfigurationError, match=(
                rf"Retry {option} must be at most 3155760000 seconds \(100 years\), "
                rf"got {re.escape(repr(value))}"
            )):
                Retry(**options)


async def test_step_timeout_counts_as_a_failed_attempt_and_is_retried(store_url: str) -> None:
    app = make_app(store_url)
    attempts_seen: list[int] = []

    @app.step(retry=Retry(max_attempts=3, initial_interval=0.01), timeout=0.1)
    async def lookup(x: int) -> int:
        attempt = cantata.step_info().attempt
        attempts_seen.append(attempt)
        if attempt == 1:
            await asyncio.sleep(5)  # hangs: cut short by the timeout
        return x * 2

    @app.workflow
    async def wf(ctx: WorkflowContext, x: int) -> int:
        return int(await ctx.run(lookup, x))

    async with app:
        t0 = time.monotonic()
        h = await app.start(wf, 21)
        assert await h.result(timeout=5) == 42
        assert time.monotonic() - t0 < 2
        attempts = await app.store.load_attempts(app.name, h.run_id)
    assert attempts_seen == [1, 2]
    assert attempts[0].error_type == "StepTimeout"
    assert "0.1" in (attempts[0].error or "")
    assert attempts[1].error_type is None


async def test_step_that_always_times_out_fails_with_step_timeout(store_url: str) -> None:
    app = make_app(store_url)

    @app.step(retry=Retry(max_attempts=2, initial_interval=0.01), timeout=0.05)
    async def hang() -> None:
        await asyncio.sleep(5)

    @app.workflow
    async def wf(ctx: WorkflowContext) -> str:
        try:
            await ctx.run(hang)
        except StepFailed as exc:
            return f"{exc.error_type}/{exc.attempts}"
        return "?"

    async with app:
        h = await app.start(wf)
        assert await h.result(timeout=5) == "StepTimeout/2"
    assert issubclass(StepTimeout, CantataError)


async def test_sync_steps_run_in_a_thread() -> None:
    app = make_app("memory://")  # the engine decides, whatever the backend
    main_thread = threading.get_ident()
    seen: list[tuple[int, int, str]] = []

    @app.step(retry=Retry(max_attempts=2, initial_interval=0.01))
    def blocking(x: int) -> int:
        info = cantata.step_info()
        seen.append((threading.get_ident(), info.attempt, info.step))
        time.sleep(0.05)  # would block the event loop if not in a thread
        if info.attempt == 1:
            raise ConnectionError("retry me")
        return x + 1

    @app.workflow
    async def wf(ctx: WorkflowContext, x: int) -> int:
        return int(await ctx.run(blocking, x))

    async with app:
        h = await app.start(wf, 1)
        assert await h.result(timeout=5) == 2
    assert [(a, s) for _, a, s in seen] == [(1, "blocking"), (2, "blocking")]
    assert all(tid != main_thread for tid, _, _ in seen)


async def test_sync_step_timeout() -> None:
    app = make_app("memory://")  # the engine decides, whatever the backend

    @app.step(retry=Retry(max_attempts=1), timeout=0.05)
    def slow() -> None:
        time.sleep(0.3)

    @app.workflow
    async def wf(ctx: WorkflowContext) -> str:
        try:
            await ctx.run(slow)
        except StepFailed as exc:
            return exc.error_type
        return "?"

    async with app:
        h = await app.start(wf)
        assert await h.result(timeout=5) == "StepTimeout"


def test_step_info_outside_a_step_raises() -> None:
    with pytest.raises(CantataError, match="outside a step"):
        cantata.step_info()


def test_a_retry_that_is_not_a_policy_is_refused_where_it_is_declared() -> None:
    """``retry=3`` (meaning "3 attempts") is refused by the decorator, naming the
    option, the value and the policy to pass, not met by every run as an AttributeError."""
    app = make_app("memory://")

    async def charge(amount: int) -> str:
        return "ok"

    async def book(tx: cantata.Tx) -> None:
        return None

    async def on_paid(event: cantata.Event[dict[str, int]]) -> None:
        return None

    attempts = r"retry=Retry\(max_attempts=3\)"
    for declare in (
        lambda: app.step(retry=3)(charge),  # type: ignore[call-overload]
        lambda: app.step(retry=3),  # type: ignore[call-overload]  # before it decorates anything
        lambda: app.transaction(retry=3)(book),  # type: ignore[call-overload]
        lambda: app.on("order.paid", group="mail", retry=3)(on_paid),  # type: ignore[arg-type]
        lambda: cantata.http_step("POST", "http://127.0.0.1:1/x", retry=3),  # type: ignore[arg-type]
    ):
        with pytest.raises(cantata.RegistrationError, match=rf"retry=3 .*{attempts}"):
            declare()
    with pytest.raises(cantata.RegistrationError, match=r"retry='fast' needs a cantata\.Retry"):
        app.step(retry="fast")(charge)  # type: ignore[call-overload]
    assert "charge" not in app.steps


def test_retry_options_of_the_wrong_type_name_the_option() -> None:
    for kwargs, match in (
        ({"max_attempts": "3"}, r"max_attempts='3'.*whole number"),
        ({"max_attempts": 2.5}, r"max_attempts=2\.5.*whole number"),
        ({"max_attempts": True}, r"max_attempts=True.*whole number"),
        ({"initial_interval": "1"}, r"initial_interval must be a number of seconds >= 0, got '1'"),
        ({"max_interval": None}, r"max_interval must be a number of seconds >= 0, got None"),
        ({"backoff": "2"}, r"backoff must be a number, got '2'"),
        ({"jitter": float("nan")}, r"jitter must be a number, got nan"),
    ):
        with pytest.raises(cantata.ConfigurationError, match=match):
            Retry(**kwargs)


def test_seconds_options_of_the_wrong_type_are_refused_naming_the_option() -> None:
    app = make_app("memory://")

    async def charge(amount: int) -> str:
        return "ok"

    async def flow(ctx: WorkflowContext) -> None:
        return None

    wrong: dict[str, Any] = {"timeout": "x", "heartbeat_timeout": True}
    for option, value in wrong.items():
        with pytest.raises(cantata.RegistrationError, match=(
            rf"{option} must be a number of seconds > 0, got {value!r}"
        )):
            app.step(**{option: value})(charge)
    for value in ("60", None):
        with pytest.raises(cantata.RegistrationError, match=(
            rf"cleanup_timeout must be a number of seconds > 0, got {value!r}"
        )):
            app.workflow(cleanup_timeout=value)(flow)  # type: ignore[call-overload]  # on purpose
    with pytest.raises(cantata.RegistrationError, match=(
        r"Step\(charge\) timeout must be a number of seconds > 0, got 'x'"
    )):
        cantata.Step("charge", timeout="x")  # type: ignore[arg-type]
    with pytest.raises(cantata.ConfigurationError, match=(
        "lease must be a number of seconds > 0, got '1'"
    )):
        make_app("memory://", lease="1")
    assert app.steps == {} and app.workflows == {}


def backoff_app(url: str, starts: list[float], interval: float, **kw: Any) -> cantata.App:
    """One step that fails on every attempt, with a backoff of ``interval`` seconds."""
    app = make_app(url, name="backoff", **kw)

    @app.step(retry=Retry(max_attempts=2, initial_interval=interval, jitter=0.0))
    async def call_api() -> None:
        starts.append(time.time())
        raise ConnectionError("downstream unavailable")

    @app.workflow
    async def job(ctx: WorkflowContext) -> None:
        await ctx.run(call_api)

    return app


@pytest.mark.parametrize("park_after", [None, 0.2])
async def test_a_graceful_restart_keeps_the_rest_of_a_retry_backoff(
    store_url: str, park_after: float | None
) -> None:
    """The next attempt's due time is stored with the failed attempt: a worker that
    stops (a deploy) and the one resuming the run wait for it, not start at once.
    With ``park_after`` the run waits parked in the store, as a sleep does."""
    if store_url.startswith("memory://"):
        pytest.skip("a memory:// store ends with its app: there is nothing to resume")
    starts: list[float] = []
    first = backoff_app(store_url, starts, 2.0, park_after=park_after)
    async with first:
        h = await first.start("job")

        async def failed_once() -> bool:
            attempts = await first.store.load_attempts(first.name, h.run_id)
            return any(a.error_type == "ConnectionError" for a in attempts)

        await eventually(failed_once)
        ended = (await first.store.load_attempts(first.name, h.run_id))[0].ended_at
        assert ended is not None
        out = io.StringIO()  # the trace shows when the next attempt is due
        Console(file=out, width=200, color_system=None).print(
            render_timeline(await first.trace(h.run_id)))
        assert "step call_api  running" in out.getvalue()
        assert "next attempt" in out.getvalue(), out.getvalue()
        await asyncio.sleep(0.5)
        assert first.engine.metrics.parked == (0 if park_after is None else 1)
    assert len(starts) == 1  # the worker stopped 0.5 s into the 2 s backoff

    second = backoff_app(store_url, starts, 2.0, park_after=park_after)
    async with second:
        with pytest.raises(WorkflowFailed, match="ConnectionError"):
            await second.get_handle(h.run_id).result(timeout=10)
        attempts = await second.store.load_attempts(second.name, h.run_id)
    assert len(starts) == 2, starts
    assert starts[1] - ended >= 2.0 - 0.05, starts[1] - ended
    assert starts[1] - ended < 3.5
    assert [a.error_type for a in attempts] == ["ConnectionError", "ConnectionError"]
