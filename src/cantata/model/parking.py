"""What wakes a parked run (docs/architecture.md, parking): pure rules, no I/O.

A run waiting in ``ctx.sleep``, ``ctx.wait_for_event`` or ``ctx.call`` may be evicted
from its worker: it is released in the store with a :class:`Parking`, and any worker
serving its workflow claims it again when it is due (``wake_at``), when an event its
wait matches is stored, when it is cancelled, or when the child it waits for ends.

An event wait is stored as ``waits_for`` = ``"<type> <keys>"`` (the match's keys, a
JSON list) and ``wait_match`` = the canonical JSON of the match. An event wakes the
parked waits whose ``wait_match`` equals what its data holds under their keys
(:func:`candidates`): one index lookup per kind of match, whatever the number of
parked runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# wake_at of a wait that has no time limit: parked until an event, a child or a cancel.
FOREVER = 1e18


@dataclass(frozen=True, slots=True)
class Parking:
    """How a released run is woken: its due time, and the event wait it parks in."""

    wake_at: float
    waits_for: str | None = None
    wait_match: str | None = None


def _norm(value: Any) -> Any:
    # 1.0 == 1 in a match: both are stored as 1.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def canonical(match: Mapping[str, Any]) -> str:
    """The canonical JSON of a match (sorted keys, integral floats as ints)."""
    return json.dumps({k: _norm(v) for k, v in match.items()}, sort_keys=True,
                      separators=(",", ":"), default=str)


def event_wait(event_type: str, match: Mapping[str, Any] | None) -> tuple[str, str]:
    """``(waits_for, wait_match)`` of a wait for ``event_type`` matching ``match``."""
    keys = sorted((match or {}).keys())
    return f"{event_type} {json.dumps(keys, separators=(',', ':'))}", canonical(match or {})


def split_waits_for(waits_for: str) -> tuple[str, list[str]]:
    """``(event type, match keys)`` of a stored ``waits_for``."""
    event_type, _, keys = waits_for.partition(" ")
    found = json.loads(keys) if keys else []
    return event_type, [str(k) for k in found]


def _lookup(data: Any, key: str) -> tuple[bool, Any]:
    value = data
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def candidates(keys: list[str], datas: Iterable[Any]) -> list[str]:
    """The ``wait_match`` values of waits on ``keys`` that events with ``datas`` match."""
    out: set[str] = set()
    for data in datas:
        values: dict[str, Any] = {}
        for key in keys:
            found, value = _lookup(data, key)
            if not found:
                break
            values[key] = value
        else:
            out.add(canonical(values))
    return sorted(out)
