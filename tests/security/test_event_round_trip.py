"""Any JSON data a program publishes reaches the handlers as it was given, signed and
verified, through every store and broker (unicode, NULs, deep nesting, 64-bit ints)."""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cantata import Event
from tests.choreography.helpers import eventually, make_app

KEY = "round-trip-secret-0123456789"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@example(batch=["é\x00☃𝄞 \u2028", {"k\x00": [2**64 - 1, -(2**63), 1e308, -0.0, "\x1f"]}],
         subject="é/☃")
@given(batch=st.lists(json_values, min_size=1, max_size=4),
       subject=st.none() | st.text(st.characters(exclude_characters="\x00",
                                                  exclude_categories=["Cs"]), min_size=1))
async def test_published_data_reaches_handlers_unchanged_and_verified(
    store_url: str, batch: list[Any], subject: str | None
) -> None:
    app = make_app(store_url, name=f"rt{uuid.uuid4().hex[:8]}", signing_keys={"k1": KEY},
                   require_signatures=True)
    seen: dict[str, Event[Any]] = {}

    @app.on("data.sent", group="reader")
    async def read(event: Event[Any]) -> None:
        seen[event.id] = event

    async with app:
        sent = [await app.publish("data.sent", data, subject=subject) for data in batch]
        await eventually(lambda: len(seen) == len(sent), what="every event handled",
                         timeout=30)
        assert await app.dead_letters() == []
        for event, data in zip(sent, batch, strict=True):
            got = seen[event.id]
            assert got.data == data and got.subject == subject
            assert got.signature == event.signature
            stored = await app.store.get_event(app.name, event.id)
            assert stored is not None and stored.data == data
            assert Event.from_json(got.to_json()).data == data
