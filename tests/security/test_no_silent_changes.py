"""Values are stored as given or refused: NaN and infinities never become null."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cantata import App, SerializationError
from cantata.model import codec

json_leaf = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text() | st.floats()
)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _has_nonfinite(v: object) -> bool:
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, dict):
        return any(_has_nonfinite(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_nonfinite(x) for x in v)
    return False


@given(json_values)
def test_a_value_round_trips_or_is_refused(value: object) -> None:
    if _has_nonfinite(value):
        with pytest.raises(SerializationError, match="NaN or infinite"):
            codec.dumps(value, "data")
    else:
        assert codec.loads(codec.dumps(value, "data")) == value


async def test_publish_and_start_refuse_nan() -> None:
    app = App("shop", store="memory://")

    @app.workflow
    async def flow(ctx: object, x: object) -> object:
        return x

    async with app.client():
        with pytest.raises(SerializationError, match=r"data of event order.placed.*\['amount'\]"):
            await app.publish("order.placed", {"amount": float("nan")})
        with pytest.raises(SerializationError, match="NaN or infinite"):
            await app.start(flow, {"x": [1.0, float("-inf")]})
        assert await app.list_runs() == []


@pytest.mark.parametrize(("value", "where"), [
    ({1: "a", "1": "b"}, "has keys 1 and '1' that"),
    ({"order": {True: 1, "true": 2}}, "has keys True and 'true' at ['order'] that"),
    ([{None: 1, "null": 2}], "at [0] that"),
])
def test_keys_that_become_one_json_key_are_refused(value: object, where: str) -> None:
    """JSON keys are strings: ``1`` and ``'1'`` would both be ``"1"``, and one of the two
    values would be lost without a word."""
    with pytest.raises(SerializationError, match="same key in JSON") as info:
        codec.dumps(value, "data of event order.placed")
    assert where in str(info.value)
    assert "use one key" in str(info.value)


@given(st.dictionaries(
    st.integers(-5, 5) | st.booleans() | st.none() | st.sampled_from(["1", "true", "null"]),
    st.integers(-9, 9),
))
def test_keys_that_are_not_strings_become_their_json_text(value: dict[object, int]) -> None:
    try:
        text = codec.dumps(value, "data")
    except SerializationError:
        assert len({str(k).lower() if k is not None else "null" for k in value}) < len(value)
        return
    assert list(codec.loads(text).values()) == list(value.values())


async def test_publish_refuses_keys_that_clash_in_json() -> None:
    app = App("shop", store="memory://")
    async with app.client():
        with pytest.raises(SerializationError, match=r"data of event order.placed"):
            await app.publish("order.placed", {1: "first", "1": "second"})
