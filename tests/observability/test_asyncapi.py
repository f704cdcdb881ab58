"""The AsyncAPI 3.0 document: channels, operations per group, schemas from pydantic."""

from __future__ import annotations

from typing import Any

import orjson
import pydantic
import pytest

from cantata import Event, HandlerContext
from cantata.errors import ConfigurationError
from cantata.observability.asyncapi import asyncapi_document
from tests.helpers import make_app

from .scenarios import shop_app


class Line(pydantic.BaseModel):
    sku: str
    quantity: int


class OrderPlaced(pydantic.BaseModel):
    order_id: int
    lines: list[Line]


def typed_app() -> Any:
    app = shop_app("memory://")

    @app.on("order.placed", group="billing", emits=["invoice.created"])
    async def bill(event: Event[OrderPlaced], ctx: HandlerContext) -> None: ...

    @app.on("order.*", group="analytics")
    async def count(event: Event[Any]) -> None: ...

    return app


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/")
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_document_shape_and_every_ref_resolves() -> None:
    doc = asyncapi_document(typed_app())
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "shop events" and doc["info"]["version"]
    assert doc["defaultContentType"] == "application/cloudevents+json"
    orjson.dumps(doc)  # JSON-ready

    refs: list[str] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(doc)
    assert refs
    for ref in refs:
        resolve(doc, ref)


def test_channels_and_operations_per_group() -> None:
    doc = asyncapi_document(typed_app())
    channels, ops = doc["channels"], doc["operations"]
    # addresses are the subjects on the wire: cantata.<app>.<type>
    assert channels["order.placed"]["address"] == "cantata.shop.order.placed"
    for event_type in ("inventory.reserved", "payment.charged", "order.shipped",
                       "order.approved", "invoice.requested", "invoice.approved",
                       "invoice.created"):
        assert channels[event_type]["address"] == f"cantata.shop.{event_type}"

    wildcard = channels["order._any_"]
    assert wildcard["address"] == "cantata.shop.order.{token2}"
    assert "token2" in wildcard["parameters"]

    def actors(action: str, channel: str) -> set[str]:
        return {
            op["x-cantata-group"] for op in ops.values()
            if op["action"] == action and op["channel"]["$ref"] == f"#/channels/{channel}"
        }

    assert actors("receive", "order.placed") == {"inventory", "billing"}
    assert actors("send", "inventory.reserved") == {"inventory"}
    assert actors("send", "invoice.created") == {"billing"}
    assert actors("receive", "order.approved") == {"start:place_order"}
    assert actors("send", "order.shipped") == {"place_order"}  # ctx.emit in the workflow
    assert actors("receive", "invoice.approved") == {"invoice_order"}  # wait_for_event
    assert actors("receive", "order._any_") == {"analytics"}
    for op_id in ops:
        assert all(c.isalnum() or c in "._-" for c in op_id), op_id


def test_payload_schema_from_the_pydantic_model_and_cloudevents_headers() -> None:
    doc = asyncapi_document(typed_app())
    message = resolve(doc, doc["channels"]["order.placed"]["messages"]["order.placed"]["$ref"])
    assert message["name"] == "order.placed"
    envelope, own = message["payload"]["allOf"]
    assert resolve(doc, envelope["$ref"])["required"] == ["specversion", "id", "source", "type"]
    assert own["properties"]["type"] == {"type": "string", "const": "order.placed"}
    schema = resolve(doc, own["properties"]["data"]["$ref"])
    assert schema["title"] == "OrderPlaced"
    assert set(schema["required"]) == {"order_id", "lines"}
    line = resolve(doc, schema["properties"]["lines"]["items"]["$ref"])
    assert line["properties"]["sku"]["type"] == "string"
    # CloudEvents attributes travel in the body (structured mode), not as headers
    attributes = resolve(doc, envelope["$ref"])["properties"]
    assert {"specversion", "id", "source", "type", "correlationid", "causationid",
            "traceparent", "signature", "data"} <= set(attributes)
    headers = resolve(doc, message["headers"]["$ref"])
    assert set(headers["properties"]) == {"Content-Type", "Nats-Msg-Id", "Cantata-Outbox"}
    assert headers["required"] == ["Content-Type", "Nats-Msg-Id"]
    assert message["correlationId"] == {"$ref": "#/components/correlationIds/correlationid"}
    assert resolve(doc, message["correlationId"]["$ref"])["location"] == (
        "$message.payload#/correlationid")
    # an untyped event still has a message, with an open data schema
    untyped = resolve(doc, "#/components/messages/payment.charged")
    assert "$ref" not in untyped["payload"]["allOf"][1]["properties"]["data"]


@pytest.mark.parametrize("broker", ["embedded", "nats://nats.internal:4222?prefix=staging"])
def test_the_relays_header_is_documented_as_its_store_mark_on_the_apps_stream(
    broker: str,
) -> None:
    """The relay's ``Cantata-Outbox`` names its store and the app's stream
    (nats_names.outbox_mark), not a constant: a schema that matches the relay's real
    values and no other stream's."""
    import re

    from cantata.broker.nats_names import Names, outbox_mark

    doc = asyncapi_document(make_app("memory://", broker=broker))
    outbox = doc["components"]["schemas"]["NatsHeaders"]["properties"]["Cantata-Outbox"]
    assert "const" not in outbox
    stream = Names("shop", "staging" if "prefix" in broker else "").stream
    assert stream in outbox["description"]
    pattern = re.compile(outbox["pattern"])
    assert pattern.search(outbox_mark("0" * 32, stream))
    assert pattern.search(outbox_mark("a strange store id!" * 9, stream))  # (hashed)
    for other in ("1", "", outbox_mark("0" * 32, Names("billing").stream),
                  outbox_mark("0" * 32, Names("shop", "prod").stream),
                  f"{outbox_mark('0' * 32, stream)}x", f"a b/{stream}"):
        assert not pattern.search(other), other


def test_an_app_without_events_gives_an_empty_but_valid_document() -> None:
    doc = asyncapi_document(make_app("memory://"))
    assert doc["channels"] == {} and doc["operations"] == {}


def test_a_wildcard_and_a_type_spelled_like_its_key_are_two_channels() -> None:
    # `_any_` is a legal event-type token: the key of `order.*` must not be taken by
    # the exact type `order._any_` (nor `*.placed` by `_any_.placed`).
    app = make_app("memory://")

    @app.on("order.*", group="audit")
    async def audit(event: Event[Any]) -> None: ...

    @app.on("order._any_", group="weird")
    async def weird(event: Event[Any]) -> None: ...

    @app.on("*.placed", group="audit2")
    async def placed(event: Event[Any]) -> None: ...

    @app.on("_any_.placed", group="weird2")
    async def odd(event: Event[Any]) -> None: ...

    doc = asyncapi_document(app)
    channels, ops = doc["channels"], doc["operations"]
    by_address = {c["address"]: key for key, c in channels.items()}
    assert set(by_address) == {
        "cantata.shop.order.{token2}", "cantata.shop.order._any_",
        "cantata.shop.{token1}.placed", "cantata.shop._any_.placed",
    }
    for key in channels:
        assert all(c.isalnum() or c in "._-" for c in key), key
    assert set(doc["components"]["messages"]) == set(channels)

    def receivers(address: str) -> set[str]:
        ref = f"#/channels/{by_address[address]}"
        return {op["x-cantata-group"] for op in ops.values()
                if op["action"] == "receive" and op["channel"]["$ref"] == ref}

    assert receivers("cantata.shop.order.{token2}") == {"audit"}
    assert receivers("cantata.shop.order._any_") == {"weird"}
    assert receivers("cantata.shop.{token1}.placed") == {"audit2"}
    assert receivers("cantata.shop._any_.placed") == {"weird2"}
    literal = channels[by_address["cantata.shop.order._any_"]]
    message = resolve(doc, next(iter(literal["messages"].values()))["$ref"])
    assert message["payload"]["allOf"][1]["properties"]["type"] == {
        "type": "string", "const": "order._any_"}


def test_a_broker_prefix_given_twice_is_refused_as_the_app_refuses_it() -> None:
    app = make_app("memory://")
    app.configure(broker="nats://127.0.0.1:4222?prefix=ok&prefix=ko")
    with pytest.raises(ConfigurationError, match="prefix is given twice"):
        asyncapi_document(app)


def _conforms(envelope: dict[str, Any], ce: dict[str, Any]) -> list[str]:
    """Where a CloudEvent breaks the envelope's attributes (required, string, const),
    or carries an attribute the envelope does not describe."""
    props = envelope["properties"]
    wrong = [f"missing {k}" for k in envelope["required"] if k not in ce]
    for key, value in ce.items():
        schema = props.get(key)
        if schema is None:
            wrong.append(f"{key} is not described")
        elif schema.get("type") == "string" and not isinstance(value, str):
            wrong.append(f"{key} is not a string")
        elif "const" in schema and value != schema["const"]:
            wrong.append(f"{key}={value!r}, the document says {schema['const']!r}")
    return wrong


def test_the_envelope_describes_binary_data_as_it_travels() -> None:
    """Bytes data goes out (a replayed outside event) as ``data_base64`` with
    ``datacontenttype`` ``application/octet-stream``, and consumers take any media type:
    the envelope must not say only ``application/json`` with ``data``."""
    doc = asyncapi_document(typed_app())
    envelope = resolve(doc, "#/components/schemas/CloudEvent")
    signed = Event("order.placed", b"\x00\x01", correlation_id="c", causation_id="d",
                   subject="s", traceparent="00-ab-cd-01", signature="k1:00")
    for ce in (signed.to_cloudevent(), Event("order.placed", {"a": 1}).to_cloudevent(),
               {"specversion": "1.0", "id": "e", "source": "s", "type": "order.placed",
                "datacontenttype": "text/plain", "data_base64": "aGk="}):
        assert _conforms(envelope, ce) == [], ce
    assert envelope["properties"]["data_base64"]["contentEncoding"] == "base64"
