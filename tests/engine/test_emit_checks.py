"""``ctx.emit`` checks an event as ``app.publish`` does (model.event.check_publish)."""

from __future__ import annotations

from typing import Any

import pytest

from cantata import InvalidEvent, WorkflowContext

from .helpers import eventually, make_app

BAD = [
    ("Order Placed", None),  # not dot-separated tokens
    ("order.*", None),  # a pattern, not a type
    ("_replay.billing", None),  # a reserved first token (NATS's replay subjects)
    ("", None),
    ("order.placed", ""),  # an empty subject
    ("order.placed", 5),  # a subject that is not a string
]


@pytest.mark.parametrize(("type_", "subject"), BAD)
async def test_ctx_emit_refuses_what_app_publish_refuses(
    sqlite_url: str, type_: str, subject: Any
) -> None:
    app = make_app(sqlite_url)

    @app.workflow
    async def emitter(ctx: WorkflowContext, type_: str, subject: Any) -> list[str]:
        try:
            await ctx.emit(type_, {"n": 1}, subject=subject)
        except InvalidEvent as exc:
            return [type(exc).__name__, str(exc)]
        return ["emitted"]

    async with app:
        with pytest.raises(InvalidEvent) as published:
            await app.publish(type_, {"n": 1}, subject=subject)
        h = await app.start(emitter, type_, subject)
        assert await h.result(timeout=5) == ["InvalidEvent", str(published.value)]
        history = await app.store.load_history(app.name, h.run_id)
        assert [e.kind for e in history] == []  # refused before taking a place in history


async def test_ctx_emit_of_a_valid_event_with_a_subject(sqlite_url: str) -> None:
    app = make_app(sqlite_url)

    @app.workflow
    async def emitter(ctx: WorkflowContext) -> str:
        return (await ctx.emit("order.placed", {"n": 1}, subject="order-7")).id

    async with app:
        event_id = await (await app.start(emitter)).result(timeout=5)
        stored = await app.store.get_event(app.name, event_id)
        assert stored is not None and stored.subject == "order-7"


@pytest.mark.parametrize(("type_", "subject"), BAD)
async def test_a_handlers_emit_refuses_what_app_publish_refuses(
    sqlite_url: str, type_: str, subject: Any
) -> None:
    app = make_app(sqlite_url)
    seen: list[str] = []

    @app.on("order.placed", group="billing")
    async def bill(event: Any, ctx: Any) -> None:
        try:
            await ctx.emit(type_, {"n": 1}, subject=subject)
        except InvalidEvent as exc:
            seen.append(str(exc))

    async with app:
        with pytest.raises(InvalidEvent) as published:
            await app.publish(type_, {"n": 1}, subject=subject)
        await app.publish("order.placed", {"n": 1})
        await eventually(lambda: bool(seen))
        assert seen == [str(published.value)]
