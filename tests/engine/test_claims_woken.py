"""What wakes a worker's claim loop on PostgreSQL: a run that may have become claimable
(``runnable``), not a run of its own that ended (each such wake was a claim statement
and a read of the next wake-up time that found nothing)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cantata import App, WorkflowContext
from tests.helpers import with_schema

from .helpers import make_app

pytestmark = pytest.mark.postgres


def build(url: str, name: str) -> App:
    app = make_app(url, name)

    @app.step
    async def echo(n: int) -> int:
        return n

    @app.workflow
    async def short(ctx: WorkflowContext, n: int) -> int:
        result: int = await ctx.run(echo, n)
        return result

    return app


def count_claims(app: App) -> list[int]:
    """The claims of ``app``'s store from now on (one entry each)."""
    claims: list[int] = []
    store: Any = app.store
    claim_runs = store.claim_runs

    async def counted(*args: Any, **kw: Any) -> Any:
        claims.append(1)
        return await claim_runs(*args, **kw)

    store.claim_runs = counted
    return claims


async def test_runs_that_end_here_do_not_wake_the_claim_loop(
    postgres_url: str, pooled_schema: str
) -> None:
    async with build(with_schema(postgres_url, pooled_schema), "ends") as app:
        await asyncio.sleep(0.2)  # (the claim loop's first look)
        claims = count_claims(app)
        for n in range(6):
            assert await (await app.start("short", n)).result(timeout=10) == n
            await asyncio.sleep(0.1)  # (the loop lets 50 ms of notices come together)
        assert len(claims) <= 1, claims  # (its safety-net look, seconds apart)


async def test_a_run_started_by_a_client_wakes_the_workers_claim_loop(
    postgres_url: str, pooled_schema: str
) -> None:
    """A run made with no owner (by a client that serves nothing) says ``runnable``: the
    worker claims it at once, not at its safety-net look seconds later."""
    url = with_schema(postgres_url, pooled_schema)
    async with build(url, "starts") as worker:
        await asyncio.sleep(0.2)  # (the claim loop's first look)
        claims = count_claims(worker)
        async with build(url, "starts").client() as client:
            for n in range(3):
                handle = await client.start("short", n)
                started = time.monotonic()
                assert await handle.result(timeout=10) == n
                assert time.monotonic() - started < 1.0
        assert claims
