"""Signed events whose data is bytes (a CloudEvent's ``data_base64``): the signature
covers the base64 text as CloudEvents carries it, so another system can make it, and it
verifies before and after the store and the broker (docs/security.md)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cantata import App, Event, Retry
from cantata.broker.nats import NatsBroker
from cantata.model.signing import Signer
from tests.choreography.helpers import eventually, make_app

KEY = "outside-secret-0123456789"
RAW = bytes(range(256)) + b"\x00tail"


def outside_signature(ce: dict[str, Any]) -> str:
    """What a system not written with Cantata computes, from docs/security.md alone."""
    content = {k: ce.get(k) for k in ("id", "source", "type", "subject", "time",
                                      "correlationid", "causationid")}
    if "data_base64" in ce:
        content["data_base64"] = ce["data_base64"]
    else:
        content["data"] = ce.get("data")
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(KEY.encode(), text.encode("ascii"), hashlib.sha256).hexdigest()


def binary_cloudevent(event_id: str, raw: bytes = RAW) -> dict[str, Any]:
    ce: dict[str, Any] = {
        "specversion": "1.0", "id": event_id, "source": "https://scanner.example",
        "type": "scan.done", "time": "2026-12-05T10:00:00Z", "subject": "doc-1",
        "datacontenttype": "application/octet-stream",
        "data_base64": base64.b64encode(raw).decode(),
    }
    ce["signature"] = outside_signature(ce)
    ce["signaturekeyid"] = "k1"
    return ce


def test_binary_data_is_signed_over_its_base64_text() -> None:
    signer = Signer({"k1": KEY}, legacy="sign")  # (the outside system's form, no app)
    event = Event.from_cloudevent(binary_cloudevent("scan-1"))
    assert event.data == RAW
    assert signer.problem(event, required=True) is None
    ours = signer.sign(dataclasses.replace(event, signature=None))
    assert ours.signature == event.signature  # the same canonical form, both ways
    # bytes and the string of their base64 are two contents, not one
    as_text = dataclasses.replace(event, data=base64.b64encode(RAW).decode())
    assert signer.problem(as_text) is not None
    assert signer.problem(dataclasses.replace(event, data=RAW[:-1])) is not None
    assert signer.problem(Event.from_json(ours.to_json()), required=True) is None


def test_a_signature_cantata_made_before_over_bytes_still_verifies() -> None:
    """Until this release the signature covered the bytes' Python text (``b'...'``):
    events signed so are still in flight while services are upgraded."""
    event = Event("scan.done", RAW, id="scan-1", correlation_id="scan-1")
    old = json.dumps(
        {"id": event.id, "source": event.source, "type": event.type, "subject": None,
         "time": event.time, "correlationid": "scan-1", "causationid": None, "data": RAW},
        sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str,
    ).encode("ascii")
    digest = hmac.new(KEY.encode(), old, hashlib.sha256).hexdigest()
    signed = dataclasses.replace(event, signature=f"k1:{digest}")
    signer = Signer({"k1": KEY}, app="scans")
    assert signer.problem(signed, required=True) is None
    assert signer.problem(dataclasses.replace(signed, data=RAW + b"!")) is not None


async def arrive(app: App, ce: dict[str, Any]) -> None:
    """Put an outside system's CloudEvent where the app's broker takes events from:
    NATS in binary mode (``ce-`` headers, the bytes as the body), or the event log."""
    broker = app._broker
    if isinstance(broker, NatsBroker):
        import nats

        headers = {f"ce-{k}": str(v) for k, v in ce.items()
                   if k not in ("data_base64", "datacontenttype")}
        headers["content-type"] = ce["datacontenttype"]
        names = broker.names(app.name)
        nc = await nats.connect(broker.url.split("?")[0])
        try:
            await nc.jetstream().publish(
                names.event(ce["type"]), base64.b64decode(ce["data_base64"]),
                stream=names.stream, headers=headers,
            )
        finally:
            await nc.close()
    else:
        event = Event.from_cloudevent(ce)
        await app.store.append_events(app.name, [event])
        app._emitted([event])


async def test_a_signed_binary_event_is_handled_as_bytes_on_every_backend(
    store_url: str,
) -> None:
    app = make_app(store_url, signing_keys={"k1": KEY}, require_signatures=True)
    seen: list[Any] = []

    @app.on("scan.done", group="archive")
    async def archive(event: Event[Any]) -> None:
        seen.append(event.data)

    async with app:
        good = binary_cloudevent("scan-good")
        await arrive(app, good)
        forged = binary_cloudevent("scan-forged")
        forged["data_base64"] = base64.b64encode(RAW + b"!").decode()
        await arrive(app, forged)
        await eventually(lambda: seen, what="the signed binary event handled")
        [dead] = await eventually(app.dead_letters, what="the forged one dead-lettered")
        stored = await app.store.get_event(app.name, "scan-good")
    assert seen == [RAW]
    assert dead.error.startswith("SignatureInvalid: ")
    assert dead.event.data == RAW + b"!"
    assert stored is not None and stored.data == RAW


@pytest.mark.parametrize("digest", ["k1:" + "é" * 64, "k1:\u2603", "k1:" + "0" * 63 + "\u00e9"])
def test_a_signature_that_is_not_hex_is_refused_not_a_crash(digest: str) -> None:
    signer = Signer({"k1": KEY}, app="scans")
    problem = signer.problem(Event("scan.done", {"n": 1}, signature=digest))
    assert problem is not None and "does not match" in str(problem)


async def test_a_non_ascii_signature_is_dead_lettered_and_waits_go_on(
    store_url: str,
) -> None:
    """A signature with a non-ASCII character (anyone on the broker can send one) is
    a forged one: dead-lettered, and a workflow waiting for the type is not broken."""
    app = make_app(store_url, signing_keys={"k1": KEY}, require_signatures=True)
    seen: list[Any] = []

    @app.on("scan.done", group="archive")
    async def archive(event: Event[Any]) -> None:
        seen.append(event.data)

    @app.workflow
    async def await_scan(ctx: Any, doc: str) -> Any:
        ev = await ctx.wait_for_event("scan.done", match={"doc": doc}, timeout=30)
        return ev.data

    async with app:
        waiting = await app.start(await_scan, "d-1")
        await eventually(lambda: _waiting(app, waiting.run_id), what="the wait begun")
        bad = Event("scan.done", {"doc": "d-1", "forged": True}, signature="k1:" + "\u00e9" * 64)
        await app.store.append_events(app.name, [bad])
        app._emitted([bad])
        [dead] = await eventually(app.dead_letters, what="the forged one dead-lettered")
        good = await app.publish("scan.done", {"doc": "d-1"})
        assert await waiting.result(timeout=20) == {"doc": "d-1"}
        await eventually(lambda: seen, what="the signed one handled")
    assert dead.error.startswith("SignatureInvalid: ")
    assert seen == [good.data]


async def _waiting(app: App, run_id: str) -> bool:
    trace = await app.trace(run_id)
    return any(child.kind == "wait" for child in trace.children)


@pytest.mark.nats
async def test_an_outside_binary_event_sent_twice_is_one_event(
    nats_url: str, tmp_path: Any
) -> None:
    """The same binary event twice on NATS (another system's retry: a new message id)
    is a repeat of the stored one, not a clash of ids (docs/security.md)."""
    from tests.broker.nats_support import app_name, nats_broker, streams_removed

    app = App(app_name("bin"), store=f"sqlite:///{tmp_path}/a.db", broker=nats_broker(nats_url),
              poll_interval=0.05)
    seen: list[Any] = []

    @app.on("scan.done", group="archive")
    async def archive(event: Event[Any]) -> None:
        seen.append(event.data)

    async with streams_removed(nats_url, app.name), app:
        ce = binary_cloudevent("scan-twice")
        await arrive(app, ce)
        await eventually(lambda: seen, what="the binary event handled")
        await arrive(app, ce)
        other = binary_cloudevent("scan-after", b"after")
        await arrive(app, other)
        await eventually(lambda: len(seen) == 2, what="the next one handled")
        assert await app.dead_letters() == []
    assert seen == [RAW, b"after"]


texts = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20)
datas = st.binary(max_size=64) | st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8,
)
CHANGES = ["id", "source", "type", "subject", "correlation_id", "causation_id", "data", "time"]


@given(data=datas, other=datas, text=texts, change=st.sampled_from(CHANGES))
def test_any_change_to_a_signed_event_is_caught_and_the_wire_keeps_it(
    data: Any, other: Any, text: str, change: str
) -> None:
    signer = Signer({"k1": KEY}, app="scans")
    event = signer.sign(Event("scan.done", data, subject="s", correlation_id="c",
                              causation_id="d"))
    assert signer.problem(Event.from_json(event.to_json()), required=True) is None
    value: Any = {"data": other, "type": "scan.other", "time": "2020-01-01T00:00:00Z"}.get(
        change, text)
    changed = dataclasses.replace(event, **{change: value})
    if getattr(changed, change) == getattr(event, change) and (
            type(getattr(changed, change)) is type(getattr(event, change))):
        return  # (no change drawn)
    assert signer.problem(changed) is not None, change


async def test_a_replayed_binary_dead_letter_is_bytes_and_still_verifies(
    store_url: str,
) -> None:
    app = make_app(store_url, signing_keys={"k1": KEY}, require_signatures=True)
    seen: list[Any] = []

    @app.on("scan.done", group="archive", retry=Retry(max_attempts=1))
    async def archive(event: Event[Any]) -> None:
        seen.append(event.data)
        if len(seen) == 1:
            raise RuntimeError("archive down")

    async with app:
        await arrive(app, binary_cloudevent("scan-replayed"))
        [dead] = await eventually(app.dead_letters, what="the first attempt dead-lettered")
        assert dead.error.startswith("RuntimeError: ") and dead.event.data == RAW
        await app.replay(dead.id)
        await eventually(lambda: len(seen) == 2, what="the replay handled")
        assert await app.dead_letters() == []
    assert seen == [RAW, RAW]


async def test_bytes_reach_a_workflow_and_its_steps_as_bytes() -> None:
    """Bytes data stays bytes where a parameter or a return is typed ``bytes``: the
    data of a binary event a ``start_on`` run takes, a step's recorded result."""
    app = make_app("memory://", signing_keys={"k1": KEY})

    @app.step
    async def checksum(blob: bytes) -> bytes:
        assert isinstance(blob, bytes)
        return hashlib.sha256(blob).digest()

    @app.workflow
    async def scanned(ctx: Any, blob: bytes) -> list[Any]:
        digest = await ctx.run(checksum, blob)
        return [blob == RAW, digest == hashlib.sha256(RAW).digest(), list(blob[:3])]

    app.start_on("scan.done", scanned)
    async with app:
        await arrive(app, binary_cloudevent("scan-run"))
        [run] = await eventually(app.list_runs, what="the run started")
        assert await app.get_handle(run.run_id).result(timeout=20) == [True, True, [0, 1, 2]]
