"""The audit chain's canonical JSON is one text per value: what ``json.dumps`` with the
same options writes, whichever encoder (the C one made once, or the pure one) runs.
A different byte would break every chain hashed before the change."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cantata.store import audit

_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
    allow_infinity=False) | st.text()
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


def _reference(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(_VALUES)
def test_canonical_is_json_dumps_with_its_options(value: Any) -> None:
    assert audit.canonical(value) == _reference(value)


@pytest.mark.parametrize(
    "bad", [math.nan, math.inf, {(1,): "x"}, {1: "a", "b": 2}, {"k": object()}]
)
def test_canonical_refuses_what_json_dumps_refuses(bad: Any) -> None:
    with pytest.raises((ValueError, TypeError)) as ours:
        audit.canonical(bad)
    with pytest.raises((ValueError, TypeError)) as theirs:
        _reference(bad)
    assert type(ours.value) is type(theirs.value)
