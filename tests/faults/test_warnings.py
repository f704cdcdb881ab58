"""Warnings during an outage stay readable: one line per cause at most every
``max(10 s, lease)``, with the count of repeats, and one line when it recovers
(docs/leases.md "Warnings"), whichever loop of the worker says it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import Callable

import pytest

from cantata import App
from tests.helpers import eventually

from .harness import time_limit
from .servers import PrivateNats, PrivatePostgres

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(time_limit(120))]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("cantata")]


def _repeated(lines: list[str], cause: str) -> int:
    return sum(cause in line for line in lines)


async def _until(done: Callable[[], bool], timeout: float) -> None:
    """Until ``done()`` or ``timeout`` s on; the assertions that follow say which, with
    the lines logged (what a test waits for is waited for, not slept through)."""
    with contextlib.suppress(AssertionError):
        await eventually(done, timeout, interval=0.05)


async def _until_logged(caplog: pytest.LogCaptureFixture, what: list[str],
                        timeout: float) -> list[str]:
    """The warnings once each of ``what`` is in one of them (or ``timeout`` s on)."""
    def logged() -> bool:
        lines = _warnings(caplog)
        return all(any(w in ln for ln in lines) for w in what)

    await _until(logged, timeout)
    return _warnings(caplog)


async def test_a_store_outage_warns_once_per_cause(
    postgres_store: str, private_postgres: PrivatePostgres, caplog: pytest.LogCaptureFixture,
) -> None:
    """An app without schedules or queues, its store away for 6 s (lease 1 s)."""
    app = App(f"warn{uuid.uuid4().hex[:6]}", store=postgres_store, broker="embedded",
              lease=1.0, poll_interval=0.05)

    @app.workflow
    async def wf(ctx: object) -> int:
        return 1

    with caplog.at_level(logging.WARNING, logger="cantata"):
        async with app:
            await asyncio.sleep(1.0)
            caplog.clear()
            private_postgres.stop()
            await asyncio.sleep(6.0)
            during = _warnings(caplog)
            private_postgres.start()
            after = (await _until_logged(
                caplog, ["schedules: passes work again", "claiming queued runs works again"],
                4.0))[len(during):]
    for cause in ("schedules: a pass failed", "claiming queued runs failed",
                  "PostgreSQL listener at"):
        assert _repeated(during, cause) <= 1, "\n".join(during)
    assert _repeated(during, "schedules: a pass failed") == 1, "\n".join(during)
    assert _repeated(during, "claiming queued runs failed") == 1, "\n".join(during)
    assert any("schedules: passes work again" in line for line in after), "\n".join(after)
    assert any("claiming queued runs works again" in line for line in after), "\n".join(after)
    # no cause says more than one line in an outage shorter than the interval
    causes = collections.Counter(line.split("(")[0] for line in during)
    assert max(causes.values(), default=0) <= 1, "\n".join(during)


async def test_a_nats_outage_warns_once(
    private_nats: PrivateNats, sqlite_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """NATS away for 5 s: one line for the lost connection, one when it is back (not one
    per reconnection attempt, each second)."""
    app = App(f"warn{uuid.uuid4().hex[:6]}", store=sqlite_url, broker=private_nats.url,
              lease=1.0, poll_interval=0.05)

    with caplog.at_level(logging.WARNING, logger="cantata"):
        async with app:
            await asyncio.sleep(0.5)
            caplog.clear()
            private_nats.stop()
            await asyncio.sleep(5.0)
            during = _warnings(caplog)
            private_nats.start()
            after = (await _until_logged(caplog, ["reconnected to NATS"], 4.0))[len(during):]
    assert _repeated(during, "ConnectionRefusedError") <= 1, "\n".join(during)
    assert any("reconnected to NATS" in line for line in after), "\n".join(during + after)


async def test_the_postgresql_listener_warns_at_the_workers_interval(
    postgres_store: str, private_postgres: PrivatePostgres, caplog: pytest.LogCaptureFixture,
) -> None:
    """The store's listening connection is one more cause: during an outage it says so at
    most every ``max(10 s, lease)``, as the worker's loops do (it said so every 30 s).
    Its reconnection is tried every few seconds (3 s connect timeout, 1 s pause), so an
    outage gives a first line at once and a second, counting the repeats, ~10 s on (not
    sooner); the outage lasts until that second line (20 s at most)."""
    app = App(f"warn{uuid.uuid4().hex[:6]}", store=postgres_store, broker="embedded",
              lease=1.0, poll_interval=0.05)

    def listener_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name.startswith("cantata")
                and r.levelno >= logging.WARNING and "PostgreSQL listener at" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="cantata"):
        async with app.client():
            await asyncio.sleep(0.5)
            caplog.clear()
            private_postgres.stop()
            await _until(lambda: len(listener_lines()) >= 2, 20.0)
            # a moment more: a third line right behind the second would be seen
            await asyncio.sleep(1.0)
            records = listener_lines()
            during = [r.getMessage() for r in records]
            private_postgres.start()
            after = await _until_logged(caplog, ["listens again"], 6.0)
    assert len(during) == 2, "\n".join(during)
    assert records[1].created - records[0].created >= 9.5, "\n".join(
        f"{r.created:.2f} {r.getMessage()}" for r in records)
    assert "similar warning(s) in the last 10 s" in during[1], during[1]
    assert any("listens again" in line for line in after), "\n".join(after)


# nats-py leaves the socket of a connection attempt that timed out for the collector
# to close (a ResourceWarning then): its business, not this test's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_nats_server_that_stops_answering_is_said_so(
    private_nats: PrivateNats, sqlite_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """NATS paused (SIGSTOP: connections stay open, nothing answers): the client finds
    it by its pings and its reconnection attempts time out; the line says so, not
    ``TimeoutError: ;`` (a timeout's empty message), and once, not per attempt."""
    import signal

    app = App(f"warn{uuid.uuid4().hex[:6]}", store=sqlite_url, broker=private_nats.url,
              lease=1.0, poll_interval=0.05)
    with caplog.at_level(logging.WARNING, logger="cantata"):
        async with app:
            await asyncio.sleep(0.5)
            caplog.clear()
            assert private_nats.proc is not None
            private_nats.proc.send_signal(signal.SIGSTOP)
            try:
                during = await _until_logged(caplog, ["no answer in time"], 8.0)
            finally:
                private_nats.proc.send_signal(signal.SIGCONT)
            after = (await _until_logged(caplog, ["reconnected to NATS"], 6.0))[len(during):]
    timeouts = [line for line in during if "TimeoutError" in line and "NATS at" in line]
    assert timeouts and all("no answer in time" in line for line in timeouts), "\n".join(during)
    assert not any("TimeoutError: ;" in line for line in during + after), "\n".join(during)
    assert len(timeouts) <= 1, "\n".join(during)
    assert any("reconnected to NATS" in line for line in after), "\n".join(during + after)
