"""``cantata queues`` and ``cantata schedules list|pause|resume|trigger|delete``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.table import Table
from rich.text import Text

from cantata.flow.schedules import ScheduleInfo
from cantata.model.flow import QueueStats
from cantata.server.flow_out import queues_out, schedules_out, served

from .common import client_app, console, fmt_date, fmt_duration, operator, print_json, run, say
from .runs import AppOpt, StoreOpt

if TYPE_CHECKING:
    from cantata.app import App

T = TypeVar("T")

NameArg = Annotated[str, typer.Argument(help="The schedule's name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def register(cli: typer.Typer) -> None:
    cli.command("queues")(queues)
    schedules = typer.Typer(help="Durable schedules: list, pause, resume, trigger, delete.",
                            no_args_is_help=True)
    schedules.command("list")(list_schedules)
    schedules.command("pause")(pause)
    schedules.command("resume")(resume)
    schedules.command("trigger")(trigger)
    schedules.command("delete")(delete)
    cli.add_typer(schedules, name="schedules")


def queues(app: AppOpt = None, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Queues: runs waiting (depth), in progress, begun in the rate window, oldest waiting."""
    the_app = client_app(app, store)
    if as_json:  # the API's objects (GET /api/queues)
        print_json(run(lambda: _read(the_app, queues_out)))
        return

    async def go() -> tuple[float, list[QueueStats], bool]:
        async with the_app.client():
            now, stats = the_app.clock.now(), list(await the_app.queue_stats())
            return now, stats, await served(the_app)

    now, stats, is_served = run(go)
    table = Table("queue", "waiting", "in progress", "rate", "oldest waiting", "limits")
    for q in stats:
        spec = q.spec
        limits = ", ".join(
            f"{k}={v}" for k, v in (("concurrency", spec.concurrency),
                                    ("per_worker", spec.per_worker),
                                    ("priorities", spec.priorities or None)) if v is not None
        ) or "-"
        oldest = None if q.oldest_waiting_at is None else now - q.oldest_waiting_at
        table.add_row(Text(q.name), str(q.waiting), _in_progress(q), _began(q),
                      fmt_duration(oldest), limits)
    console.print(table if stats else "no queues")
    if stats and not is_served:
        _unserved(the_app.name, "no queued run begins")


def _in_progress(q: QueueStats) -> str:
    """Runs in progress; of a partitioned queue, with its busiest partition's count
    (read against the concurrency, which holds per partition)."""
    if not q.partitioned:
        return str(q.in_progress)
    of = "" if q.spec.concurrency is None else f" of {q.spec.concurrency}"
    return f"{q.in_progress} (busiest partition {q.partition_peak_in_progress}{of})"


def _began(q: QueueStats) -> str:
    """Runs begun in the window, of the rate if the queue has one; of a partitioned
    queue, the sum is not read against the rate (it holds per partition): its busiest
    partition's count is."""
    rate = q.spec.rate
    if not q.partitioned:
        return f"{q.began_last_window} of {rate}" if rate else f"{q.began_last_window} in 60s"
    window = f"{rate.per:g}s" if rate else "60s"
    of = f" of {rate}" if rate else ""
    return f"{q.began_last_window} in {window} (busiest partition {q.partition_peak_began}{of})"


def _unserved(app: str, consequence: str) -> None:
    say(f"no worker is serving app {app!r} (no live worker heartbeat): {consequence} "
        "until a worker runs (cantata worker MODULE:app)")


def list_schedules(app: AppOpt = None, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Every schedule: when it ticks, its policies, whether paused, its next tick."""
    the_app = client_app(app, store)
    if as_json:  # the API's objects (GET /api/schedules)
        print_json(run(lambda: _read(the_app, schedules_out)))
        return

    async def go() -> tuple[list[ScheduleInfo], bool]:
        async with the_app.client():
            return list(await the_app.schedules.list()), await served(the_app)

    rows, is_served = run(go)
    table = Table("schedule", "workflow", "when", "zone", "overlap", "catch-up", "state",
                  "next tick (UTC)")
    for s in rows:
        table.add_row(
            Text(s.name), Text(s.workflow), Text(s.when), Text(s.timezone), s.overlap,
            s.catch_up,
            "paused" if s.paused else "not in code" if s.in_code is False else "active",
            "-" if s.next_tick is None else fmt_date(s.next_tick.timestamp()),
        )
    console.print(table if rows else "no schedules")
    if rows and not is_served:
        _unserved(the_app.name, "no schedule ticks (the next ticks pass without a run)")


async def _read(app: App, read: Callable[[App], Awaitable[list[T]]]) -> list[T]:
    async with app.client():
        return await read(app)


def pause(name: NameArg, app: AppOpt = None, store: StoreOpt = None) -> None:
    """Stop starting runs of a schedule until it is resumed."""
    _act(app, store, name, "pause")
    say(f"schedule {name}: paused")


def resume(name: NameArg, app: AppOpt = None, store: StoreOpt = None) -> None:
    """Start runs of a schedule again, from its next tick."""
    _act(app, store, name, "resume")
    say(f"schedule {name}: resumed")


def delete(name: NameArg, app: AppOpt = None, store: StoreOpt = None) -> None:
    """Remove a schedule (one declared in code returns when a worker of that code opens the app)."""
    _act(app, store, name, "delete")
    say(f"schedule {name}: deleted")


def trigger(name: NameArg, app: AppOpt = None, store: StoreOpt = None) -> None:
    """Start one run of a schedule now."""
    the_app = client_app(app, store)

    async def go() -> str:
        async with the_app.client():
            return (await the_app.schedules.trigger(name, actor=operator())).run_id

    say(f"schedule {name}: started run {run(go)}")


def _act(app: str | None, store: str | None, name: str, action: str) -> None:
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            await getattr(the_app.schedules, action)(name, actor=operator())

    run(go)
