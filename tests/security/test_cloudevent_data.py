"""CloudEvents input: ``data_base64`` is decoded, never dropped; bad input is refused."""

from __future__ import annotations

import base64
import contextlib

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cantata import Event, InvalidEvent

BASE = {"specversion": "1.0", "id": "e1", "source": "tests", "type": "order.placed"}


def ce(**kw: object) -> bytes:
    return orjson.dumps({**BASE, **kw})


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_json_data_base64_is_parsed() -> None:
    event = Event.from_json(ce(data_base64=b64(b'{"order_id": 42}'),
                               datacontenttype="application/json"))
    assert event.data == {"order_id": 42}
    assert Event.from_json(ce(data_base64=b64(b"[1,2]"))).data == [1, 2]
    assert Event.from_json(ce(data_base64=b64(b'"x"'),
                              datacontenttype="application/vnd.shop+json")).data == "x"


def test_text_and_binary_data_base64() -> None:
    assert Event.from_json(ce(data_base64=b64("héllo".encode()),
                              datacontenttype="text/plain; charset=utf-8")).data == "héllo"
    raw = bytes(range(256))
    event = Event.from_json(ce(data_base64=b64(raw), datacontenttype="application/octet-stream"))
    assert event.data == raw
    assert Event.from_json(event.to_json()).data == raw  # (it was its base64 text)
    empty = Event.from_cloudevent({**BASE, "data_base64": "", "datacontenttype": ""})
    assert Event.from_json(empty.to_json()).data == b""


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"data_base64": "***"}, "not valid base64"),
        ({"data_base64": 5}, "must be a base64 string"),
        ({"data_base64": b64(b"{nope"), "datacontenttype": "application/json"}, "not the JSON"),
        ({"data_base64": b64(b"x"), "data": 1}, "not both"),
        ({"data_base64": b64(b"\xff\xfe"), "datacontenttype": "text/plain"}, "not UTF-8"),
        ({"signaturekeyid": 3, "signature": "ab"}, "signaturekeyid"),
    ],
)
def test_bad_input_is_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        Event.from_json(ce(**fields))


json_data = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(json_data)
def test_data_and_data_base64_agree(data: object) -> None:
    plain = Event.from_json(ce(data=data))
    encoded = Event.from_json(ce(data_base64=b64(orjson.dumps(data))))
    assert plain.data == encoded.data == data


@given(st.binary(max_size=300))
def test_garbage_never_escapes_as_another_error(raw: bytes) -> None:
    with contextlib.suppress(InvalidEvent):
        Event.from_json(raw)


@given(st.dictionaries(st.sampled_from(
    ["specversion", "id", "source", "type", "time", "subject", "data", "data_base64",
     "datacontenttype", "correlationid", "signature", "signaturekeyid"]),
    st.none() | st.integers() | st.text(max_size=20) | st.lists(st.integers(), max_size=2),
))
def test_any_envelope_is_accepted_or_refused_cleanly(fields: dict[str, object]) -> None:
    try:
        event = Event.from_cloudevent({**BASE, **fields})
    except InvalidEvent:
        return
    again = Event.from_json(event.to_json())
    assert (again.id, again.type, again.data) == (event.id, event.type, event.data)


@pytest.mark.parametrize("data", [2**64, [-(2**70)], {"n": {"deep": [2**64]}}, {1: "x"}])
def test_data_json_cannot_carry_is_refused_with_the_reason(data: object) -> None:
    with pytest.raises(InvalidEvent, match="is not JSON"):
        Event.from_cloudevent({**BASE, "data": data})


@pytest.mark.parametrize(("raw", "wrong", "todo"), [
    (b"{nope", "not JSON", "structured JSON mode"),
    (b"", "not JSON", "structured JSON mode"),
    (b"[" + ce() + b"]", "expected a JSON object, got list", "each event as its own message"),
    (b'"order.placed"', "expected a JSON object, got str", "structured JSON mode"),
    (orjson.dumps({"type": "order.placed"}), "missing attribute(s) specversion, id, source",
     "needs specversion '1.0', id, source and type"),
])
def test_garbage_is_refused_saying_what_was_wrong_and_what_to_send(
    raw: bytes, wrong: str, todo: str
) -> None:
    with pytest.raises(InvalidEvent) as info:
        Event.from_json(raw)
    assert wrong in str(info.value) and todo in str(info.value), str(info.value)
