"""A signature binds an event to the app it was published to: an event signed in one
app does not verify in another app holding the same key (docs/security.md). Signatures
of the legacy form (bound to no app) verify as before unless the app refuses them."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from typing import Any

import pytest

from cantata import App, ConfigurationError, Event, SignatureInvalid
from cantata.broker.nats import NatsBroker
from cantata.model.signing import Signer
from tests.choreography.helpers import eventually, make_app

KEY = "shared-secret-0123456789"
KEYS = {"k1": KEY}


def legacy_signature(event: Event[Any]) -> str:
    """The signature a release before this one made (docs of then: no ``app``)."""
    content = {"id": event.id, "source": event.source, "type": event.type,
               "subject": event.subject, "time": event.time,
               "correlationid": event.correlation_id, "causationid": event.causation_id,
               "data": event.data}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "k1:" + hmac.new(KEY.encode(), text.encode("ascii"), hashlib.sha256).hexdigest()


def test_a_signature_names_its_form_and_covers_the_app() -> None:
    shop = Signer(KEYS, app="shop")
    event = shop.sign(Event("payment.charged", {"amount": 99}, correlation_id="c"))
    assert event.signature is not None and event.signature.startswith("k1:v2.")
    assert shop.problem(event, required=True) is None
    assert shop.problem(Event.from_json(event.to_json()), required=True) is None
    problem = Signer(KEYS, app="billing").problem(event)
    assert isinstance(problem, SignatureInvalid) and "app 'billing'" in str(problem)
    # the app binding cannot be stripped: without its prefix it is no legacy signature
    stripped = dataclasses.replace(event, signature=event.signature.replace("v2.", ""))
    assert isinstance(Signer(KEYS, app="billing").problem(stripped), SignatureInvalid)
    assert isinstance(shop.problem(stripped), SignatureInvalid)
    unknown = dataclasses.replace(event, signature=event.signature.replace("v2.", "v3."))
    problem = shop.problem(unknown)
    assert isinstance(problem, SignatureInvalid) and "'v3'" in str(problem)


def test_a_legacy_signature_verifies_in_any_app_unless_refused() -> None:
    event = Event("payment.charged", {"amount": 99}, id="pay-1")
    old = dataclasses.replace(event, signature=legacy_signature(event))
    for app in ("shop", "billing"):
        assert Signer(KEYS, app=app).problem(old, required=True) is None
    # a correlation id given on arrival (docs/guide.md) does not break it either
    arrived = dataclasses.replace(old, correlation_id="pay-1")
    assert Signer(KEYS, app="shop").problem(arrived, required=True) is None
    problem = Signer(KEYS, app="shop", legacy="refuse").problem(old)
    assert isinstance(problem, SignatureInvalid) and "legacy signature" in str(problem)
    assert isinstance(Signer(KEYS, app="shop").problem(
        dataclasses.replace(old, data={"amount": 1})), SignatureInvalid)


def test_an_app_can_sign_in_the_legacy_form_for_older_releases() -> None:
    """``legacy_signatures='sign'``: the first step of a rolling upgrade, while services
    of an earlier release (which know the legacy form only) still verify."""
    event = Event("payment.charged", {"amount": 99})
    signed = Signer(KEYS, app="shop", legacy="sign").sign(event)
    assert signed.signature == legacy_signature(event)
    assert Signer(KEYS, app="billing").problem(signed) is None  # (bound to no app)
    with pytest.raises(ConfigurationError, match="legacy_signatures='never'"):
        App("shop", store="memory://", signing_keys=KEYS, legacy_signatures="never")


async def deliver(app: App, event: Event[Any]) -> None:
    """Put ``event`` where ``app``'s broker takes events from, as someone who copied it
    from another app's traffic: its NATS subjects, or its event log."""
    broker = app._broker
    if isinstance(broker, NatsBroker):
        import nats

        names = broker.names(app.name)
        nc = await nats.connect(broker.url.split("?")[0])
        try:
            await nc.jetstream().publish(names.event(event.type), event.to_json(),
                                         stream=names.stream)
        finally:
            await nc.close()
    else:
        await app.store.append_events(app.name, [event])
        app._emitted([event])


def billing(store_url: str, **kw: Any) -> tuple[App, list[Any]]:
    app = make_app(store_url, name="billing", signing_keys=KEYS, require_signatures=True,
                   **kw)
    seen: list[Any] = []

    @app.on("payment.charged", group="ledger")
    async def book(event: Event[Any]) -> None:
        seen.append(event.data)

    return app, seen


async def test_an_event_signed_in_another_app_is_refused_on_every_backend(
    store_url: str,
) -> None:
    """Two apps hold the same key: an event signed in ``shop`` replayed into
    ``billing`` is dead-lettered (``SignatureInvalid``); one signed by an earlier release
    (bound to no app) is still handled, as before."""
    app, seen = billing(store_url)
    async with app:
        replayed = Signer(KEYS, app="shop").sign(Event("payment.charged", {"amount": 1}))
        await deliver(app, replayed)
        [dead] = await eventually(app.dead_letters, what="the replayed event dead-lettered")
        event = Event("payment.charged", {"amount": 2})
        await deliver(app, dataclasses.replace(event, signature=legacy_signature(event)))
        await app.publish("payment.charged", {"amount": 3})
        await eventually(lambda: len(seen) == 2, what="the legacy and the own one handled")
        assert len(await app.dead_letters()) == 1
    assert dead.event.id == replayed.id
    assert dead.error.startswith("SignatureInvalid: ") and "app 'billing'" in dead.error
    assert sorted(d["amount"] for d in seen) == [2, 3]


async def test_an_app_that_refuses_legacy_signatures_dead_letters_them(
    store_url: str,
) -> None:
    app, seen = billing(store_url, legacy_signatures="refuse")
    async with app:
        event = Event("payment.charged", {"amount": 2})
        await deliver(app, dataclasses.replace(event, signature=legacy_signature(event)))
        [dead] = await eventually(app.dead_letters, what="the legacy one dead-lettered")
        await app.publish("payment.charged", {"amount": 3})
        await eventually(lambda: seen, what="the app's own event handled")
    assert dead.error.startswith("SignatureInvalid: ") and "legacy" in dead.error
    assert seen == [{"amount": 3}]


def test_a_signer_with_keys_but_no_app_is_refused_not_silently_unbound() -> None:
    """A Signer made outside an App (another Python system that publishes to the app)
    signs for one app: without ``app=`` it used to sign the legacy form, bound to no
    app, which an app with ``legacy_signatures='refuse'`` dead-letters and any app
    holding the key takes. The legacy form is asked for by name (docs/security.md)."""
    with pytest.raises(ConfigurationError) as caught:
        Signer(KEYS)
    message = str(caught.value)
    assert "app=" in message and "legacy='sign'" in message and "\n" not in message
    event = Event("payment.charged", {"amount": 99})
    signed = Signer(KEYS, app="shop").sign(event)
    assert Signer(KEYS, app="shop", legacy="refuse").problem(signed, required=True) is None
    unbound = Signer(KEYS, legacy="sign").sign(event)  # asked for: as before
    assert unbound.signature == legacy_signature(event)
    assert Signer(None).sign(event) is event  # no keys: nothing to sign with, no app needed
    with pytest.raises(ConfigurationError, match="app name"):
        Signer(KEYS, app="")
