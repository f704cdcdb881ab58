"""Signed events: forged, unsigned, rotated and id-pre-empting events never reach code."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from cantata import (
    App,
    ConfigurationError,
    DuplicateEventId,
    Event,
    HandlerContext,
    WaitTimeout,
)
from cantata.model.signing import Signer
from tests.choreography.helpers import eventually, make_app

K1 = "first-secret-0123456789"
K2 = "second-secret-0123456789"


def shop(store: str, **kw: Any) -> tuple[App, list[Any]]:
    app = make_app(store, **kw)
    seen: list[Any] = []

    @app.on("payment.charged", group="shipping")
    async def ship(event: Event[Any], ctx: HandlerContext) -> None:
        seen.append(event.data)

    return app, seen


async def forge(app: App, data: Any, *, signature: str | None) -> Event[Any]:
    """Put an event on the log as someone with broker access but without the key."""
    event = Event("payment.charged", data, signature=signature)
    await app.store.append_events(app.name, [event])
    app._emitted([event])
    return event


async def dead_errors(app: App, n: int) -> list[str]:
    dls = await eventually(
        lambda: _at_least(app, n), what=f"{n} dead letter(s)", timeout=15
    )
    return sorted(d.error for d in dls)


async def _at_least(app: App, n: int) -> Any:
    dls = await app.dead_letters()
    return dls if len(dls) >= n else None


async def test_signed_events_are_handled_and_forged_or_unsigned_dead_lettered(
    store_url: str,
) -> None:
    app, seen = shop(store_url, signing_keys={"k1": K1}, require_signatures=True)
    async with app:
        await app.publish("payment.charged", {"amount": 99})
        await forge(app, {"amount": 1_000_000}, signature="k1:" + "0" * 64)
        await forge(app, {"amount": 5}, signature=None)
        await eventually(lambda: seen, what="the signed event handled")
        errors = await dead_errors(app, 2)
        assert errors[0].startswith("SignatureInvalid: ") and "forged" in errors[0]
        assert errors[1].startswith("SignatureMissing: ")
        assert seen == [{"amount": 99}]


async def test_a_handler_can_require_signatures_alone(store_url: str) -> None:
    app = make_app(store_url, signing_keys={"k1": K1})
    strict: list[Any] = []
    lax: list[Any] = []

    @app.on("payment.charged", group="shipping", require_signature=True)
    async def ship(event: Event[Any]) -> None:
        strict.append(event.data)

    @app.on("payment.charged", group="mailer")
    async def mail(event: Event[Any]) -> None:
        lax.append(event.data)

    async with app:
        await forge(app, {"amount": 5}, signature=None)
        await eventually(lambda: lax, what="the lax group handled it")
        errors = await dead_errors(app, 1)
        assert errors[0].startswith("SignatureMissing: ")
        assert strict == []


async def test_keys_rotate(store_url: str) -> None:
    """Events signed with the old key still verify while it is listed."""
    app, seen = shop(store_url, signing_keys={"k2": K2, "k1": K1}, require_signatures=True)
    old = Signer({"k1": K1}, app=app.name)
    async with app:
        signed_old = old.sign(Event("payment.charged", {"n": 1}))
        await app.store.append_events(app.name, [signed_old])
        app._emitted([signed_old])
        await app.publish("payment.charged", {"n": 2})
        await eventually(lambda: len(seen) == 2, what="both handled")
        assert await app.dead_letters() == []
        published = await app.publish("payment.charged", {"n": 3})
        assert published.signature is not None and published.signature.startswith("k2:")
        assert published.to_cloudevent()["signaturekeyid"] == "k2"


async def test_triggers_and_waits_ignore_forged_events(store_url: str) -> None:
    app = make_app(store_url, signing_keys={"k1": K1}, require_signatures=True)

    @app.workflow
    async def refund(ctx: Any, data: Any) -> Any:
        return data

    @app.workflow
    async def await_payment(ctx: Any, order: str) -> Any:
        ev = await ctx.wait_for_event("payment.charged", match={"order": order}, timeout=1.5)
        return ev.data

    app.start_on("refund.requested", refund)
    async with app:
        waiting = await app.start(await_payment, "o-1")
        forged = Event("refund.requested", {"amount": 10})
        await app.store.append_events(app.name, [forged])
        app._emitted([forged])
        await forge(app, {"order": "o-1"}, signature="k1:" + "1" * 64)
        errors = await dead_errors(app, 1)
        assert errors[0].startswith("SignatureMissing: ")
        with pytest.raises(Exception) as info:
            await waiting.result(timeout=20)
        assert "WaitTimeout" in str(info.value) or isinstance(info.value, WaitTimeout)
        assert [r.workflow for r in await app.list_runs()] == ["await_payment"]


async def test_a_used_id_is_a_duplicate_or_refused(store_url: str) -> None:
    app, seen = shop(store_url)
    async with app:
        first = await app.publish("payment.charged", {"amount": 99}, id="pay-1")
        again = await app.publish("payment.charged", {"amount": 99}, id="pay-1")
        assert again.duplicate and not first.duplicate
        assert again.id == first.id and again.data == first.data
        with pytest.raises(DuplicateEventId, match=r"pay-1.*other content"):
            await app.publish("payment.charged", {"amount": 0}, id="pay-1")
        await app.publish("order.placed", {"n": 1}, id="ord-1")
        with pytest.raises(DuplicateEventId, match=r"'ord-1' was already used by an "
                                                   r"order\.placed event"):
            await app.publish("order.placed", {"n": 2}, id="ord-1")
        await eventually(lambda: seen, what="handled")
        assert seen == [{"amount": 99}]


async def test_a_forged_event_cannot_pre_empt_the_real_one(store_url: str) -> None:
    """The forger publishes first with the real id: it is dead-lettered, never handled,
    and the real publisher is told the id was taken instead of being silently dropped."""
    app, seen = shop(store_url, signing_keys={"k1": K1}, require_signatures=True)
    async with app:
        forged = Event("payment.charged", {"amount": 0}, id="pay-7")
        await app.store.append_events(app.name, [forged])
        app._emitted([forged])
        errors = await dead_errors(app, 1)
        assert "SignatureMissing" in errors[0]
        with pytest.raises(DuplicateEventId, match=r"pay-7.*\{'amount': 0\}.*\{'amount': 99\}"):
            await app.publish("payment.charged", {"amount": 99}, id="pay-7")
        assert seen == []


def test_bad_key_configuration_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="too short"):
        App("shop", store="memory://", signing_keys={"k1": "short"})
    with pytest.raises(ConfigurationError, match="signing_key_id 'k3'"):
        App("shop", store="memory://", signing_keys={"k1": K1}, signing_key_id="k3")
    with pytest.raises(ConfigurationError, match="needs signing_keys"):
        App("shop", store="memory://", require_signatures=True)


async def test_require_signature_without_keys_fails_at_start() -> None:
    app = App("shop", store="memory://")

    @app.on("x.y", group="g", require_signature=True)
    async def h(event: Event[Any]) -> None: ...

    with pytest.raises(ConfigurationError, match="no signing_keys"):
        async with app:
            pass


def test_the_signature_covers_the_content() -> None:
    signer = Signer({"k1": K1}, app="shop")
    event = signer.sign(Event("a.b", {"amount": 1}, correlation_id="c"))
    assert signer.accepts(event, required=True)
    for change in ({"data": {"amount": 2}}, {"type": "a.c"}, {"correlation_id": "d"},
                   {"subject": "s"}, {"source": "evil"}, {"id": "other"}):
        assert not signer.accepts(dataclasses.replace(event, **change)), change
    round_trip = Event.from_json(event.to_json())
    assert signer.accepts(round_trip, required=True)
    assert not Signer({"k1": K2}, app="shop").accepts(event)


def test_an_event_signed_without_a_correlation_id_verifies_with_its_id_as_one() -> None:
    """Another system's signed event that carries no correlation id is given its own id
    as one when it arrives from the broker (docs/guide.md §4): its signature still holds;
    any other correlation id does not."""
    signer = Signer({"k1": K1}, app="shop")
    signed = signer.sign(Event("payment.charged", {"amount": 1}, id="pay-1"))
    assert signed.correlation_id is None
    arrived = dataclasses.replace(signed, correlation_id="pay-1")
    assert signer.accepts(arrived, required=True)
    assert not signer.accepts(dataclasses.replace(signed, correlation_id="tx-2"))
    assert not signer.accepts(dataclasses.replace(arrived, data={"amount": 2}))


@pytest.mark.nats
async def test_on_nats_an_outside_event_takes_its_id_and_a_different_one_is_refused(
    nats_url: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A forger on the broker uses an id first: the real publisher is told (not silently
    dropped); a later broker message with a used id and other content is dead-lettered
    naming both."""
    import nats as nats_client

    from tests.broker.nats_support import app_name, nats_broker, streams_removed

    name = app_name("preempt")
    broker = nats_broker(nats_url)
    app = App(name, store=f"sqlite:///{tmp_path}/a.db", broker=broker, poll_interval=0.05)
    seen: list[Any] = []

    @app.on("payment.charged", group="shipping")
    async def ship(event: Event[Any]) -> None:
        seen.append(event.data)

    async with streams_removed(nats_url, name), app:
        names = broker.names(name)
        nc = await nats_client.connect(nats_url)
        try:
            js = nc.jetstream()
            forged = Event("payment.charged", {"amount": 0}, id="pay-9", source="evil")
            await js.publish(names.event(forged.type), forged.to_json(), stream=names.stream)
            await eventually(lambda: seen, what="the outside event handled")
            with pytest.raises(DuplicateEventId, match=r"pay-9"):
                await app.publish("payment.charged", {"amount": 99}, id="pay-9")
            real = await app.publish("payment.charged", {"amount": 5}, id="pay-10")
            await eventually(lambda: len(seen) == 2, what="the real one handled")
            # a message reusing a handled event's id with other content: refused, said
            clash = dataclasses.replace(real, data={"amount": 1_000_000})
            await js.publish(names.event(clash.type), clash.to_json(), stream=names.stream,
                             headers={"Nats-Msg-Id": "other-copy"})
            await eventually(lambda: "reusing event id pay-10" in caplog.text,
                             what="the clash refused")
            [handled] = await eventually(app.dead_letters, what="the clash dead-lettered")
            # one reusing an id stored but never addressed to the group: dead-lettered
            other = Event("payment.refunded", {"amount": 7}, id="ref-1")
            await app.publish("payment.refunded", {"amount": 7}, id="ref-1")
            wrong = dataclasses.replace(other, type="payment.charged", data={"amount": 8})
            await js.publish(names.event(wrong.type), wrong.to_json(), stream=names.stream)

            async def two() -> list[Any]:
                letters = await app.dead_letters()
                return letters if len(letters) == 2 else []

            letters = await eventually(two, what="the second clash dead-lettered")
        finally:
            await nc.close()
    # each dead-lettered as itself (a stand-in carrying the message): the stored events
    # keep their deliveries
    assert handled.error.startswith("DuplicateEventId: event id pay-10")
    assert "1000000" in handled.event.data["payload"]
    [dl] = [d for d in letters if d.id != handled.id]
    assert dl.error.startswith("DuplicateEventId: event id ref-1")
    assert "'amount': 7" in dl.error and "'amount': 8" in dl.error
    assert "1000000" in caplog.text
    assert seen == [{"amount": 0}, {"amount": 5}]
