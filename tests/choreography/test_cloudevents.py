"""The envelope: ``cantata.Event`` as CloudEvents 1.0 structured JSON."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cantata import Event, InvalidEvent

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def full_event() -> Event[Any]:
    return Event(
        type="order.placed",
        data={"order_id": 42, "lines": [{"sku": "A-1", "qty": 2}]},
        id="ev-1",
        source="cantata/shop",
        subject="order-42",
        time="2025-01-02T03:04:05.678901Z",
        correlation_id="tx-1",
        causation_id="ev-0",
        traceparent=TRACEPARENT,
    )


def test_to_cloudevent_has_the_attributes_and_extensions() -> None:
    ce = full_event().to_cloudevent()
    assert ce == {
        "specversion": "1.0",
        "id": "ev-1",
        "source": "cantata/shop",
        "type": "order.placed",
        "subject": "order-42",
        "time": "2025-01-02T03:04:05.678901Z",
        "datacontenttype": "application/json",
        "data": {"order_id": 42, "lines": [{"sku": "A-1", "qty": 2}]},
        "correlationid": "tx-1",
        "causationid": "ev-0",
        "traceparent": TRACEPARENT,
    }


def test_to_json_is_the_structured_mode_object() -> None:
    ev = full_event()
    assert json.loads(ev.to_json()) == ev.to_cloudevent()


def test_a_new_event_gets_an_id_and_a_utc_time() -> None:
    a, b = Event(type="order.placed", data=None), Event(type="order.placed", data=None)
    assert a.id and a.id != b.id
    assert a.time.endswith("Z")
    assert a.timestamp > 0
    ce = a.to_cloudevent()
    for absent in ("subject", "correlationid", "causationid", "traceparent"):
        assert absent not in ce  # CloudEvents: unset attributes are left out, not null


def test_from_json_reads_a_foreign_cloudevent() -> None:
    raw = json.dumps(
        {
            "specversion": "1.0",
            "id": "A234-1234-1234",
            "source": "https://github.com/cloudevents/spec/pull",
            "type": "com.github.pull_request.opened",
            "subject": "123",
            "time": "2018-04-05T17:31:00Z",
            "datacontenttype": "application/json",
            "data": {"number": 123},
            "comexampleextension1": "value",
        }
    )
    ev = Event.from_json(raw)
    assert ev.id == "A234-1234-1234"
    assert ev.type == "com.github.pull_request.opened"
    assert ev.source == "https://github.com/cloudevents/spec/pull"
    assert ev.subject == "123"
    assert ev.data == {"number": 123}
    assert ev.correlation_id is None and ev.causation_id is None


GOOD = {"specversion": "1.0", "id": "e1", "source": "s", "type": "order.placed"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not JSON"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ("[1, 2, 3]", "JSON object"),
        ('"order.placed"', "JSON object"),
        ("null", "JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "type"}), "type"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "id"}), "id"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "specversion"}), "specversion"),
        (json.dumps({**GOOD, "specversion": "0.3"}), "specversion"),
        (json.dumps({**GOOD, "specversion": 1.0}), "specversion"),
        (json.dumps({**GOOD, "type": 42}), "type"),
        (json.dumps({**GOOD, "type": "order placed!"}), "type"),
        (json.dumps({**GOOD, "id": ["x"]}), "id"),
        (json.dumps({**GOOD, "subject": {"nested": True}}), "subject"),
        (json.dumps({**GOOD, "time": 1712345678}), "time"),
        (json.dumps({**GOOD, "time": "yesterday"}), "RFC 3339"),
        (json.dumps({**GOOD, "correlationid": 7}), "correlationid"),
        (json.dumps({**GOOD, "causationid": []}), "causationid"),
        (json.dumps({**GOOD, "traceparent": {}}), "traceparent"),
    ],
)
def test_from_json_on_garbage_raises_invalid_event(raw: bytes | str, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message) as info:
        Event.from_json(raw)
    assert info.value.code == "invalid_event"


def test_from_json_refuses_what_is_not_text() -> None:
    with pytest.raises(InvalidEvent, match="not JSON"):
        Event.from_json(None)  # type: ignore[arg-type]


# -- round trip ---------------------------------------------------------------------------

_token = st.from_regex(r"[A-Za-z0-9_\-]{1,8}", fullmatch=True)
_types = st.lists(_token, min_size=1, max_size=4).map(".".join)
_text = st.text(min_size=1, max_size=20)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
_times = st.datetimes(
    min_value=dt.datetime(1970, 1, 2),
    max_value=dt.datetime(9999, 1, 1),
).map(lambda d: d.isoformat() + "Z")

events = st.builds(
    Event,
    type=_types,
    data=_json,
    id=_text,
    source=_text,
    subject=st.none() | st.text(max_size=20),
    time=_times,
    correlation_id=st.none() | _text,
    causation_id=st.none() | _text,
    traceparent=st.none() | st.just(TRACEPARENT),
)


@given(events)
def test_round_trip_through_json(ev: Event[Any]) -> None:
    assert Event.from_json(ev.to_json()) == ev
    assert Event.from_json(ev.to_json().decode()) == ev
    assert Event.from_cloudevent(ev.to_cloudevent()) == ev
