"""Keys, ids, names and other short text fields holding a NUL or a lone surrogate are
refused where they are given, naming the field, on every store: never a driver's error
(PostgreSQL refuses both), never stored cut at the NUL (SQLite). JSON payloads carry a
NUL as they are (JSON escapes it)."""

from __future__ import annotations

import re
import secrets
from typing import Any

import pytest

from cantata import (
    App,
    ConfigurationError,
    DeadLetterNotFound,
    InvalidEvent,
    RunNotFound,
    UnknownAttribute,
    WorkflowContext,
    WorkflowFailed,
)
from cantata.model.event import MAX_ATTRIBUTE
from cantata.observability import TraceNotFound
from tests.helpers import eventually, make_app

BAD = [
    pytest.param("a\x00b", "a NUL character", id="nul"),
    pytest.param("a\ud800b", "a lone surrogate", id="surrogate"),
]


def refusal(field: str, bad: str, what: str) -> str:
    """The start of the message: the field, the value shown with repr(), the fault."""
    return re.escape(f"{field} {bad!r} holds {what}")


@pytest.mark.parametrize(("bad", "what"), BAD)
async def test_start_and_publish_refuse_it_naming_the_field(
    store_url: str, bad: str, what: str
) -> None:
    app = make_app(store_url)

    @app.workflow
    async def echo(ctx: WorkflowContext, x: int) -> int:
        return x

    async with app:
        for field in ("idempotency_key", "correlation_id"):
            given: dict[str, Any] = {field: bad}
            with pytest.raises(ConfigurationError, match=refusal(field, bad, what)):
                await app.start(echo, 1, **given)
        for field in ("id", "subject", "source", "correlation_id"):
            given = {field: bad}
            with pytest.raises(InvalidEvent, match=refusal(f"event attribute {field!r}", bad,
                                                           what)):
                await app.publish("order.placed", {"n": 1}, **given)
        assert await app.list_runs() == []
        ok = await app.start(echo, 1, idempotency_key="order-1", correlation_id="tx-1")
        assert await ok.result(timeout=10) == 1


async def test_ids_too_long_to_index_are_refused_and_the_longest_kept(store_url: str) -> None:
    """Ids, types, correlation ids, idempotency keys and queue partitions are indexed:
    PostgreSQL cannot index text of more than 2,704 bytes. At most 500 characters are
    taken, where they are given (the same bound as on an event from the broker); 500
    characters of 4 bytes each are kept."""
    app = make_app(store_url)

    @app.workflow
    async def echo(ctx: WorkflowContext, x: int) -> int:
        await ctx.emit("order.echoed", {"x": x})
        return x

    app.queue("per-customer", concurrency=1)

    @app.workflow(queue="per-customer")
    async def queued(ctx: WorkflowContext, x: int) -> int:
        return x

    # random, so that PostgreSQL cannot compress it under its limit
    long = secrets.token_hex(5000)
    wide = "".join(chr(0x1F600 + secrets.randbelow(0x40)) for _ in range(MAX_ATTRIBUTE))
    async with app:
        for field in ("correlation_id", "idempotency_key"):
            given: dict[str, Any] = {field: long}
            with pytest.raises(ConfigurationError,
                               match=rf"{field} is 10000 characters long .*at most 500"):
                await app.start(echo, 1, **given)
        with pytest.raises(ConfigurationError,
                           match=r"idempotency_key is 10000000 characters long .*at most 500"):
            await app.start(echo, 1, idempotency_key="x" * 10_000_000)
        with pytest.raises(ConfigurationError,
                           match=r"partition is 10000 characters long .*at most 500"):
            await app.start(queued, 1, partition=long)
        for field in ("id", "correlation_id"):
            given = {field: long}
            with pytest.raises(InvalidEvent,
                               match=rf"'{field}' is 10000 characters long .*at most 500"):
                await app.publish("order.placed", {"n": 1}, **given)
        with pytest.raises(InvalidEvent, match=r"'type' is 10006 characters long"):
            await app.publish(f"order.{long}", {"n": 1})
        assert await app.list_runs() == []
        # the longest, of characters of 4 bytes in UTF-8
        event = await app.publish("order.placed", {"n": 1}, id=wide, correlation_id=wide)
        assert (await app.store.get_event(app.name, event.id)) == event
        run = await app.start(echo, 2, correlation_id=wide, idempotency_key=wide)
        assert await run.result(timeout=10) == 2
        assert (await app.start(echo, 2, idempotency_key=wide)).run_id == run.run_id
        assert [r.run_id for r in await app.find_runs(idempotency_key=wide)] == [run.run_id]
        waited = await app.start(queued, 3, partition=wide)
        assert await waited.result(timeout=10) == 3
        assert (await app.trace(wide)).kind in ("event", "run")


@pytest.mark.parametrize(("bad", "what"), BAD)
async def test_a_lookup_by_such_an_id_finds_nothing(store_url: str, bad: str, what: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def echo(ctx: WorkflowContext, x: int) -> int:
        return x

    async with app:
        handle = app.get_handle(bad)
        for call in (handle.status(), handle.cancel(), handle.retry(),
                     handle.get_value("total"), app.fork(bad, "step")):
            with pytest.raises(RunNotFound, match=refusal("run id", bad, what)):
                await call
        with pytest.raises(TraceNotFound, match=refusal("correlation id", bad, what)):
            await app.trace(bad)
        with pytest.raises(DeadLetterNotFound, match=refusal("dead letter id", bad, what)):
            await app.discard(bad)
        with pytest.raises(ConfigurationError, match=refusal("find_runs(idempotency_key=...)",
                                                             bad, what)):
            await app.find_runs(idempotency_key=bad)
        with pytest.raises(ConfigurationError, match=refusal("list_runs(workflow=...)", bad,
                                                             what)):
            await app.list_runs(workflow=bad)
        run = await app.start(echo, 1)
        await run.result(timeout=10)
        with pytest.raises(ConfigurationError, match=refusal("actor", bad, what)):
            await run.cancel(actor=bad)


async def test_a_lookup_given_an_object_for_its_id_says_what_to_pass(tmp_path: Any) -> None:
    """``app.publish`` returns the Event and ``app.start`` a RunHandle: one passed where
    its id goes is the lookup's error naming the attribute to pass, not a TypeError from
    deep inside (``argument of type 'Event' is not iterable``)."""
    app = make_app(f"sqlite:///{tmp_path}/c.db")

    @app.workflow
    async def echo(ctx: WorkflowContext, x: int) -> int:
        return x

    async with app:
        event = await app.publish("order.placed", {"n": 1})
        handle = await app.start(echo, 1)
        await handle.result(timeout=10)
        with pytest.raises(TraceNotFound, match=r"^correlation id must be a str, got Event: "
                                                r"pass its \.id$"):
            await app.trace(event)  # type: ignore[arg-type]
        with pytest.raises(RunNotFound, match=r"^run id must be a str, got RunHandle: pass "
                                              r"its \.run_id$"):
            await app.fork(handle, "echo#1")  # type: ignore[arg-type]
        with pytest.raises(RunNotFound, match=r"^run id must be a str, got int: pass the "
                                              r"text itself$"):
            await app.get_handle(42).status()  # type: ignore[arg-type]
        with pytest.raises(RunNotFound, match=r"^run id must be a str, got RunHandle: pass "
                                              r"its \.run_id$"):
            app.get_handle(handle)  # type: ignore[arg-type]  # refused where it is given
        with pytest.raises(DeadLetterNotFound, match="dead letter id must be a str"):
            await app.discard(event)  # type: ignore[arg-type]
        assert (await app.trace(event.id)).kind == "event"


@pytest.mark.parametrize(("bad", "what"), BAD)
async def test_a_search_attribute_holding_it_is_refused_not_stored_cut(
    store_url: str, bad: str, what: str
) -> None:
    app = make_app(store_url)

    @app.workflow
    async def tagged(ctx: WorkflowContext, customer: str) -> str:
        await ctx.set_attributes(customer=bad if customer == "bad" else customer)
        return customer

    async with app:
        refused = await app.start(tagged, "bad")
        with pytest.raises(WorkflowFailed, match=refusal("attribute 'customer'", bad, what)):
            await refused.result(timeout=10)
        plain = await app.start(tagged, "a")
        assert await plain.result(timeout=10) == "a"
        runs = {r.run_id: r.attributes for r in await app.find_runs(workflow="tagged")}
        # SQLite stored the NUL's one as customer='a' (cut there)
        assert runs == {refused.run_id: {}, plain.run_id: {"customer": "a"}}
        found = await app.find_runs(attributes={"customer": "a"})
        assert [r.run_id for r in found] == [plain.run_id]
        with pytest.raises(UnknownAttribute, match=refusal("attribute 'customer'", bad, what)):
            await app.find_runs(attributes={"customer": bad})


@pytest.mark.parametrize(
    "payload",
    [pytest.param({"note": "a\x00b", "\x00key": ["\x00"]}, id="nul")],
)
async def test_a_nul_in_a_json_payload_round_trips(store_url: str, payload: Any) -> None:
    app = make_app(store_url)
    seen: list[Any] = []

    @app.workflow
    async def echo(ctx: WorkflowContext, x: Any) -> Any:
        return x

    @app.on("note.added", group="notes")
    async def note(event: Any, ctx: Any) -> None:
        seen.append(event.data)

    async with app:
        run = await app.start(echo, payload)
        assert await run.result(timeout=10) == payload
        await app.publish("note.added", payload)
        await eventually(lambda: bool(seen))
        assert seen == [payload]


async def test_a_trailing_newline_does_not_slip_past_a_names_pattern() -> None:
    # `$` matches before a final "\n": each pattern must hold for the whole text
    with pytest.raises(ConfigurationError, match=re.escape("app name 'shop\\n' is invalid")):
        App("shop\n", store="memory://")
    app = make_app("memory://")

    @app.workflow
    async def tagged(ctx: WorkflowContext) -> None:
        await ctx.set_attributes(**{"customer\n": 1})

    with pytest.raises(InvalidEvent, match=re.escape("event pattern 'order.*\\n' is invalid")):
        app.on("order.*\n", group="billing")(tagged)
    async with app:
        with pytest.raises(InvalidEvent, match=re.escape("'order.placed\\n' is invalid")):
            await app.publish("order.placed\n", {"n": 1})
        with pytest.raises(WorkflowFailed, match=re.escape("name 'customer\\n' is invalid")):
            await (await app.start(tagged)).result(timeout=10)
        with pytest.raises(UnknownAttribute, match=re.escape("name 'customer\\n' is invalid")):
            await app.find_runs(attributes={"customer\n": 1})
