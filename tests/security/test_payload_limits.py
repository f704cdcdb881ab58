"""``App(max_payload=...)``: oversize arguments, results and events are refused clearly."""

from __future__ import annotations

from typing import Any

import pytest

from cantata import (
    App,
    ConfigurationError,
    Event,
    PayloadTooLarge,
    SerializationError,
    WorkflowFailed,
)
from tests.choreography.helpers import eventually, make_app

BIG = "x" * 5000  # over the 4 KiB limit the tests set


def app_with_flow(store: str, **kw: Any) -> App:
    app = make_app(store, max_payload=4096, **kw)

    @app.step
    def produce(n: int) -> str:
        return "y" * n

    @app.workflow
    async def flow(ctx: Any, n: int) -> str:
        result: str = await ctx.run(produce, n)
        return result

    return app


async def test_an_oversize_argument_is_refused_before_anything_is_stored(store_url: str) -> None:
    app = app_with_flow(store_url)
    async with app.client():
        with pytest.raises(PayloadTooLarge,
                           match=r"arguments of workflow flow are \d+ bytes.*4096"):
            await app.start("flow", BIG)
        with pytest.raises(SerializationError,
                           match=r"^arguments of workflow flow are not JSON-serialisable"):
            await app.start("flow", object())
        assert await app.list_runs() == []
        with pytest.raises(PayloadTooLarge, match=r"data of event order.placed is 5\d\d\d bytes"):
            await app.publish("order.placed", {"blob": BIG})
    assert issubclass(PayloadTooLarge, SerializationError)


async def test_an_oversize_result_fails_the_step_without_retries(store_url: str) -> None:
    app = app_with_flow(store_url)
    async with app:
        handle = await app.start("flow", 10_000)
        with pytest.raises(WorkflowFailed, match="PayloadTooLarge"):
            await handle.result(timeout=30)
        ok = await app.start("flow", 10)
        assert await ok.result(timeout=30) == "y" * 10


async def test_a_handler_emitting_an_oversize_event_is_dead_lettered(store_url: str) -> None:
    app = make_app(store_url, max_payload=4096)

    @app.on("order.placed", group="inventory")
    async def reserve(event: Event[Any], ctx: Any) -> None:
        await ctx.emit("inventory.reserved", {"blob": BIG})

    async with app:
        await app.publish("order.placed", {"id": 1})
        dls = await eventually(app.dead_letters, what="the dead letter", timeout=20)
        assert dls[0].error.startswith("PayloadTooLarge: data of event inventory.reserved")


async def test_offload_lets_large_events_through_the_embedded_log(sqlite_url: str) -> None:
    app = make_app(sqlite_url, max_payload=4096, offload_above=2048)
    got: list[int] = []

    @app.on("order.placed", group="inventory")
    async def reserve(event: Event[Any]) -> None:
        got.append(len(event.data["blob"]))

    async with app:
        await app.publish("order.placed", {"blob": BIG})
        await eventually(lambda: got, what="the large event handled")
    assert got == [len(BIG)]


@pytest.mark.parametrize("kw", [{"max_payload": 0}, {"max_payload": "1MB"},
                                {"offload_above": -5}])
def test_bad_limits_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="whole number of bytes"):
        App("shop", store="memory://", **kw)


@pytest.mark.nats
async def test_offload_carries_events_over_the_brokers_limit_by_claim_check(
    nats_url: str, tmp_path: Any
) -> None:
    """A 1.5 MB event is more than NATS takes (1 MB): with offload_above it travels as
    a claim check and the handler gets all of it; without, publish refuses it."""
    import asyncio

    import nats

    from tests.broker.nats_support import app_name, streams_removed

    name = app_name("claim")
    app = App(name, store=f"sqlite:///{tmp_path}/a.db", broker=nats_url, poll_interval=0.05,
              max_payload=4 * 1024 * 1024, offload_above=64 * 1024)
    got: list[int] = []

    @app.on("scan.uploaded", group="scanner")
    async def scan(event: Event[Any]) -> None:
        got.append(len(event.data["blob"]))

    big = "z" * 1_500_000
    async with streams_removed(nats_url, name), app:
        nc = await nats.connect(nats_url)
        sizes: list[int] = []
        try:
            async def capture(msg: Any) -> None:
                sizes.append(len(msg.data))

            await nc.subscribe(f"cantata.{name}.>", cb=capture)
            await nc.flush()
            await app.publish("scan.uploaded", {"blob": big})
            await app.publish("scan.uploaded", {"blob": "small"})
            await eventually(lambda: len(got) == 2, what="both handled", timeout=20)
            await asyncio.sleep(0.2)
        finally:
            await nc.close()
        assert await app.dead_letters() == []
    assert sorted(got) == [5, len(big)]
    assert max(sizes) < 64 * 1024, sizes  # the large one went as a claim check

    plain = App(app_name("noclaim"), store=f"sqlite:///{tmp_path}/b.db", broker=nats_url,
                max_payload=4 * 1024 * 1024)
    async with streams_removed(nats_url, plain.name), plain.client():
        with pytest.raises(PayloadTooLarge, match="max_payload"):
            await plain.publish("scan.uploaded", {"blob": big})
