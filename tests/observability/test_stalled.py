"""``find_stalls`` / ``stalls_of``: which transactions are stuck, where, and since when."""

from __future__ import annotations

import datetime as dt
import time

from cantata import App
from cantata.observability.stalled import REASONS, Stall, find_stalls, stalls_of
from cantata.observability.trace import build_trace

from .scenarios import Scenario


def by_reason(stalls: list[Stall]) -> dict[str, list[Stall]]:
    out: dict[str, list[Stall]] = {}
    for s in stalls:
        out.setdefault(s.reason, []).append(s)
    return out


async def test_every_kind_of_stall_is_found_and_named(scenario: Scenario, reader: App) -> None:
    now = reader.clock.now() + 1
    stalls = await find_stalls(reader.store, reader.name, older_than=0.5, now=now)
    ids = scenario.ids
    assert {s.reason for s in stalls} == set(REASONS)
    found = by_reason(stalls)

    [pending] = found["pending_step"]
    assert (pending.correlation_id, pending.node.kind, pending.node.name) == (
        ids["pending"], "run", "restock")

    [waiting] = found["waiting_event"]
    assert (waiting.correlation_id, waiting.node.kind, waiting.node.name) == (
        ids["waiting"], "wait", "invoice.approved")

    [dead] = found["dead_letter"]
    assert (dead.correlation_id, dead.node.kind, dead.node.group) == (
        ids["dead"], "dead_letter", "payment")
    assert dead.node.error == "RuntimeError: card of order 4 declined"

    unhandled = found["unhandled_event"]
    assert {s.correlation_id for s in unhandled} == {ids["dead"], ids["unhandled"]}
    assert {(s.node.kind, s.node.group) for s in unhandled} == {("handler", "audit")}

    [comp] = found["compensation_failed"]
    assert (comp.correlation_id, comp.node.kind, comp.node.name) == (
        ids["comp_failed"], "compensation", "refund")
    assert comp.node.error == "RuntimeError: refund API is down"

    # finished transactions are not stalls
    assert not {ids["compensated"], ids["retried"], ids["hybrid"]} & {
        s.correlation_id for s in stalls}
    for s in stalls:
        assert s.since.tzinfo == dt.UTC and s.since <= dt.datetime.fromtimestamp(now, dt.UTC)
    assert [s.since for s in stalls] == sorted(s.since for s in stalls)


async def test_recent_work_is_not_stalled(reader: App) -> None:
    now = reader.clock.now()
    assert await find_stalls(reader.store, reader.name, older_than=3600, now=now) == []


async def test_limit_bounds_the_answer(reader: App) -> None:
    now = reader.clock.now() + 1
    stalls = await find_stalls(reader.store, reader.name, older_than=0.5, now=now, limit=2)
    assert len(stalls) == 2


async def test_stalls_of_one_trace_use_its_correlation_id(
    scenario: Scenario, reader: App
) -> None:
    root = await build_trace(reader.store, reader.name, scenario.ids["dead"])
    now = time.time() + 1
    stalls = stalls_of(root, 0.5, now)
    assert sorted((s.reason, s.node.group) for s in stalls) == [
        ("dead_letter", "payment"), ("unhandled_event", "audit")]
    assert {s.correlation_id for s in stalls} == {scenario.ids["dead"]}
    assert stalls_of(root, 3600, now) == []
