"""Typed handlers: ``Event[Model]`` validates data; invalid data goes to the DLQ at once."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import pydantic

import cantata
from cantata import HandlerContext, RegistrationError
from tests.choreography.helpers import FAST, SETTLE, eventually, make_app

if TYPE_CHECKING:
    # The common pattern of importing a name for annotations only.
    from cantata import HandlerContext as LazyContext


class OrderPlaced(pydantic.BaseModel):
    order_id: int
    quantity: int
    note: str = ""


async def test_typed_handler_gets_validated_model_data(store_url: str) -> None:
    app = make_app(store_url)
    got: list[cantata.Event[OrderPlaced]] = []

    @app.on("order.placed", group="inventory", retry=FAST)
    async def reserve(event: cantata.Event[OrderPlaced], ctx: HandlerContext) -> None:
        got.append(event)
        await ctx.emit("inventory.reserved", {"order_id": event.data.order_id})

    async with app:
        ev = await app.publish("order.placed", {"order_id": "12", "quantity": 3})
        await eventually(lambda: got)

    [typed] = got
    assert isinstance(typed.data, OrderPlaced)
    assert typed.data == OrderPlaced(order_id=12, quantity=3)  # "12" coerced, default filled
    assert typed.id == ev.id
    assert typed.correlation_id == ev.correlation_id


async def test_invalid_data_goes_to_the_dlq_at_once_and_later_events_flow(store_url: str) -> None:
    app = make_app(store_url)
    calls: list[int] = []

    @app.on("order.placed", group="inventory", retry=FAST)
    async def reserve(event: cantata.Event[OrderPlaced]) -> None:
        calls.append(event.data.order_id)

    async with app:
        bad = await app.publish("order.placed", {"order_id": 1, "quantity": "lots"})
        [dl] = await eventually(app.dead_letters)
        await app.publish("order.placed", {"order_id": 2, "quantity": 1})
        await eventually(lambda: calls == [2], what="a later valid event to be handled")
        await asyncio.sleep(SETTLE)
        assert len(await app.dead_letters()) == 1

    assert dl.event.id == bad.id
    assert dl.group == "inventory"
    assert dl.attempts == 1  # no retries: invalid data cannot get better
    assert dl.error.startswith("ValidationError: ")
    assert "quantity" in dl.error
    assert "order_id" not in dl.error  # only the bad field is named


async def test_every_bad_field_is_named(store_url: str) -> None:
    app = make_app(store_url)

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[OrderPlaced]) -> None: ...

    async with app:
        await app.publish("order.placed", {"quantity": "x"})
        await app.publish("order.placed", "not an object")
        dls = await eventually(lambda: _count(app, 2))

    missing, not_object = sorted(dls, key=lambda d: "order_id" not in d.error)
    assert "order_id" in missing.error and "quantity" in missing.error
    assert not_object.error.startswith("ValidationError: ")
    assert all(d.attempts == 1 for d in dls)


async def _count(app: cantata.App, n: int) -> list[cantata.DeadLetter]:
    dls = await app.dead_letters()
    return dls if len(dls) == n else []


async def test_an_untyped_handler_gets_plain_data(store_url: str) -> None:
    app = make_app(store_url)
    got: list[object] = []

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any]) -> None:
        got.append(event.data)

    async with app:
        await app.publish("order.placed", {"quantity": "lots"})
        await eventually(lambda: got)
    assert got == [{"quantity": "lots"}]


async def test_a_typed_handler_validates_even_with_a_type_checking_only_annotation(
    store_url: str,
) -> None:
    app = make_app(store_url)

    @app.on("order.placed", group="inventory", retry=FAST)
    async def reserve(event: cantata.Event[OrderPlaced], ctx: LazyContext) -> None:
        assert isinstance(event.data, OrderPlaced)

    async with app:
        await app.publish("order.placed", {"order_id": 1, "quantity": "lots"})
        [dl] = await eventually(app.dead_letters)
    assert dl.error.startswith("ValidationError: ")
    assert dl.attempts == 1


async def test_an_unresolvable_event_model_is_not_silently_ignored(store_url: str) -> None:
    class LocalOrder(pydantic.BaseModel):
        order_id: int

    app = make_app(store_url)
    got: list[object] = []
    with contextlib.suppress(RegistrationError):  # refusing it loudly is fine too

        @app.on("order.placed", group="inventory")
        async def reserve(event: cantata.Event[LocalOrder]) -> None:
            got.append(event.data)

        async with app:
            await app.publish("order.placed", {"order_id": "7"})
            await eventually(lambda: got)
        assert got == [LocalOrder(order_id=7)]


async def test_event_data_that_does_not_fit_a_started_workflows_type_goes_to_the_dlq_at_once(
    store_url: str,
) -> None:
    """A ``start_on`` trigger whose workflow takes a model: data that is not one is
    dead-lettered with the validation reason in its first attempt (it cannot get
    better), no run is written (not one that fails in its first line), and later
    events start their runs."""
    app = make_app(store_url)

    @app.workflow
    async def fulfil(ctx: cantata.WorkflowContext, order: OrderPlaced) -> int:
        return order.quantity

    app.start_on("order.placed", fulfil)
    async with app:
        bad = await app.publish("order.placed", {"order_id": 1, "quantity": "lots"})
        [dl] = await eventually(app.dead_letters, what="the bad event to be dead-lettered")
        await app.publish("order.placed", {"order_id": 2, "quantity": 3})
        [run] = await eventually(lambda: app.find_runs(workflow="fulfil"))
        assert await app.get_handle(run.run_id).result(timeout=10) == 3
        await asyncio.sleep(SETTLE)
        assert len(await app.dead_letters()) == 1
        assert len(await app.find_runs(workflow="fulfil")) == 1

    assert dl.event.id == bad.id
    assert dl.group == "start:fulfil"
    assert dl.attempts == 1  # no retries
    assert dl.error.startswith("ValidationError: field 'quantity': Input should be a valid "
                               "integer"), dl.error
    assert "order_id" not in dl.error  # only the bad field is named
    assert "workflow 'fulfil' argument 1 (order), declared OrderPlaced" in dl.error, dl.error
    assert "\n" not in dl.error
