"""Orphans: events nothing in the app listens to, counted and logged.

An event no handler group, workflow trigger or wait declares is silently never
delivered — the classic failure of choreography. Whoever emits it (``app.publish``,
a handler's or a workflow's ``ctx.emit``, a transactional step) reports it here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

from cantata.declare.router import Router
from cantata.model.event import Event, matches
from cantata.quietlog import QuietLog, reason
from cantata.store.base import Store

log = logging.getLogger("cantata.orphans")


class OrphanCounts(Protocol):
    orphans: dict[str, int]  # event type -> orphans of it seen by this process


class Emitter(Protocol):
    """Whoever emits events (the engine): what the check reads, and where it keeps its
    count and its brief cache of the store's declarations."""

    @property
    def app(self) -> str: ...

    @property
    def store(self) -> Store: ...

    @property
    def router(self) -> Router: ...

    @property
    def metrics(self) -> OrphanCounts: ...

    @property
    def quiet(self) -> QuietLog: ...  # its rate-limited warnings

    # (monotonic time, patterns every service declared), or None: the cache
    declared_patterns: tuple[float, list[str]] | None
    # the read of the declarations under way, shared by the checks that wait for it
    declared_reading: asyncio.Task[list[str]] | None
    # events emitted while the declarations could not be read: checked with the next
    # report (report_orphans)
    orphans_unchecked: list[Event[Any]]


async def check_orphans(engine: Emitter, events: Sequence[Event[Any]]) -> list[Event[Any]]:
    """Count and log each of ``events`` whose type nothing in the app declares.

    This process's handlers and triggers answer most cases without a query; the
    store's declarations add other services' groups and the waits of running runs.

    Returns:
        the orphan events.

    Raises:
        StoreError: the store's declarations could not be read (nothing is counted);
            an emit that goes on all the same calls :func:`report_orphans`.
    """
    orphans = await find_orphans(engine, events)
    for event in orphans:
        seen = engine.metrics.orphans.get(event.type, 0)
        engine.metrics.orphans[event.type] = seen + 1
        # Loud the first time per type, then quiet: the count keeps the tally.
        log.log(
            logging.WARNING if seen == 0 else logging.DEBUG,
            "orphan event: %s (id %s) was published but no handler, workflow trigger or "
            "wait in app %r listens to it (further ones are counted in app.metrics.orphans)",
            event.type, event.id, engine.app,
        )
    return orphans


_UNCHECKED_KEPT = 1000  # events kept for the next report while the check fails


async def report_orphans(
    engine: Emitter, events: Sequence[Event[Any]]
) -> list[Event[Any]] | None:
    """:func:`check_orphans` for events already stored, best-effort: the check is a
    diagnostic, and its read of the store failing never fails the emit (nor restarts
    the run that emitted). The failure is logged (rate-limited, ``engine.quiet``) and
    the events are checked with the next report (the last :data:`_UNCHECKED_KEPT`).

    Returns:
        the orphans among ``events`` (and the earlier unchecked ones), or ``None``:
        the check failed, which are orphans is not known yet.
    """
    batch = [*engine.orphans_unchecked, *events]
    engine.orphans_unchecked = []
    try:
        orphans = await check_orphans(engine, batch)
    except Exception as exc:  # (a store error, most likely: the events are stored)
        kept = [*engine.orphans_unchecked, *batch]  # (and those of reports meanwhile)
        engine.orphans_unchecked = kept[-_UNCHECKED_KEPT:]
        engine.quiet.warning(
            "orphans", "checking emitted events for orphans failed (%s); %d event(s) will "
            "be checked with the next emit", reason(exc), len(engine.orphans_unchecked))
        return None
    engine.quiet.recovered("orphans", "checking emitted events for orphans works again")
    return orphans


async def find_orphans(engine: Emitter, events: Sequence[Event[Any]]) -> list[Event[Any]]:
    """Those of ``events`` whose type nothing in the app declares, neither counted nor
    logged (an event published again under its id, say, is no new orphan)."""
    local = _local_types(engine.router)
    unknown = [e for e in events if not local.known(e.type)]
    if not unknown:
        return []
    declared = await _declared_patterns(engine)
    return [e for e in unknown if not any(matches(p, e.type) for p in declared)]


_CACHE_SECONDS = 2.0


class _LocalTypes:
    """Which event types a router's handlers, triggers and waits match, remembered per
    type (a chain's hops emit the same few types by the thousand). Declarations are
    only ever added, so their counts tell when the answers must be worked out anew."""

    def __init__(self, router: Router) -> None:
        self._router = weakref.ref(router)
        self._sizes = (-1, -1, -1)
        self._patterns: list[str] = []
        self._answers: dict[str, bool] = {}

    def is_for(self, router: Router) -> bool:
        return self._router() is router

    def known(self, event_type: str) -> bool:
        router = self._router()
        if router is None:
            return False
        sizes = (len(router.handlers), len(router.triggers), len(router.waits))
        if sizes != self._sizes:
            self._sizes = sizes
            self._patterns = [h.pattern for h in router.handlers] + [
                t.pattern for t in router.triggers] + [t for _, t in router.waits]
            self._answers = {}
        answer = self._answers.get(event_type)
        if answer is None:
            answer = any(matches(p, event_type) for p in self._patterns)
            if len(self._answers) < _TYPES_KEPT:
                self._answers[event_type] = answer
        return answer


_TYPES_KEPT = 1024
_local: dict[int, _LocalTypes] = {}  # id(router) ->


def _local_types(router: Router) -> _LocalTypes:
    key = id(router)
    found = _local.get(key)
    if found is None or not found.is_for(router):
        found = _local[key] = _LocalTypes(router)
        weakref.finalize(router, _local.pop, key, None)
    return found


async def _declared_patterns(engine: Emitter) -> list[str]:
    """Patterns every service of the app declared, cached briefly (one read per burst:
    the checks that find the cache stale while a read is under way share it, rather
    than each reading the store; a chain's last hops report their orphans by the
    hundred at once)."""
    cached = engine.declared_patterns
    now = time.monotonic()
    if cached is not None and now - cached[0] < _CACHE_SECONDS:
        return list(cached[1])
    loop = asyncio.get_running_loop()
    reading = engine.declared_reading
    if reading is None or reading.done() or reading.get_loop() is not loop:
        reading = engine.declared_reading = loop.create_task(_read_declared(engine, now))
    return list(await asyncio.shield(reading))


async def _read_declared(engine: Emitter, now: float) -> list[str]:
    patterns = [d.pattern for d in await engine.store.declarations(engine.app) if d.pattern]
    engine.declared_patterns = (now, patterns)
    return patterns
