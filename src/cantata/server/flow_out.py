"""The schedules and queues of an app as ``GET /api/schedules`` and ``GET /api/queues``
answer them, and as ``cantata schedules list --json`` and ``cantata queues --json``
print them, and a run's place in its queue (no web framework here: the CLI imports
it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cantata.engine.identity import live_workers
from cantata.model.records import RunRecord
from cantata.model.status import RunStatus
from cantata.server.models import (
    QueueOut,
    RunQueueOut,
    ScheduleOut,
    queue_out,
    run_queue_out,
    schedule_out,
)

if TYPE_CHECKING:
    from cantata.app import App


async def schedules_out(app: App, name: str | None = None) -> list[ScheduleOut]:
    """Every schedule of the open ``app`` (only ``name``'s if given: none if it has no
    such schedule), each with the run its ticks started last, read now."""
    is_served = await served(app)
    out = []
    for s in await app.schedules.list():
        if name is not None and s.name != name:
            continue
        last = None if s.last_run_id is None else await app.store.get_run(app.name, s.last_run_id)
        out.append(schedule_out(s, last, is_served))
    return out


async def queues_out(app: App) -> list[QueueOut]:
    """Every queue of the open ``app`` with its figures now (``app.queue_stats()``)."""
    stats = await app.queue_stats()
    now, is_served = app.clock.now(), await served(app)
    return [queue_out(q, now, is_served) for q in stats]


async def served(app: App) -> bool:
    """Whether a live worker serves ``app`` now (its expiry not passed): one
    ticks the schedules and begins the queued runs. A console (or the CLI) alone is
    no worker."""
    now = app.clock.now()
    return bool(await live_workers(app.store, app.name, now=now))


async def run_queue(app: App, run: RunRecord) -> RunQueueOut | None:
    """Where ``run`` stands in the queue it was started in (None for a run started in
    none, or one whose queue row was pruned long after it began): its place while it
    waits, and the queue's limits. ``GET /api/runs/{run_id}`` and ``cantata run
    --json`` answer it."""
    entry = await app.store.run_queue(app.name, run.run_id)
    if entry is None:
        return None
    place = (await app.store.queue_position(app.name, run.run_id)
             if run.status == RunStatus.PENDING else None)
    specs = {q.name: q for q in await app.store.queues(app.name)}
    return run_queue_out(run, entry, place, specs.get(entry.queue))
