"""``cantata publish | dlq``: choreography from the command line."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from .common import client_app, console, operator, parse_duration, parse_json, run
from .runs import AppOpt, StoreOpt


def register(cli: typer.Typer) -> None:
    cli.command("publish")(publish)
    dlq = typer.Typer(help="Dead letters: list and replay.", no_args_is_help=True)
    dlq.command("list")(dlq_list)
    dlq.command("replay")(dlq_replay)
    dlq.command("redrive")(dlq_redrive)
    cli.add_typer(dlq, name="dlq")


def publish(
    type: Annotated[str, typer.Argument(help="Event type, e.g. order.placed.")],
    data: Annotated[str, typer.Option("--data", help="JSON data of the event.")] = "null",
    subject: Annotated[str | None, typer.Option("--subject")] = None,
    correlation_id: Annotated[str | None, typer.Option("--correlation-id")] = None,
    app: AppOpt = None,
    store: StoreOpt = None,
) -> None:
    """Publish an event; prints its id."""
    the_app = client_app(app, store)
    value = parse_json(data, "--data")

    async def go() -> None:
        async with the_app.client():
            event = await the_app.publish(
                type, value, subject=subject, correlation_id=correlation_id
            )
            console.print(event.id)

    run(go)


def dlq_list(
    app: AppOpt = None,
    store: StoreOpt = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 100,
) -> None:
    """List dead letters, oldest first."""
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            letters = await the_app.dead_letters(limit=limit)
        table = Table(title=f"dead letters of {the_app.name}")
        for col in ("id", "group", "event", "attempts", "failed at", "error"):
            table.add_column(col)
        for d in letters:
            table.add_row(
                d.id, d.group, f"{d.event.type} {d.event.id}", str(d.attempts),
                d.failed_at.strftime("%Y-%m-%d %H:%M:%S"), d.error[:100],
            )
        console.print(table)

    run(go)


def dlq_replay(
    dead_letter_id: Annotated[str, typer.Argument(help="Dead letter id (see dlq list).")],
    app: AppOpt = None,
    store: StoreOpt = None,
) -> None:
    """Redeliver a dead letter to its group."""
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            dl = await the_app.replay(dead_letter_id, actor=operator())
            console.print(f"redelivering {dl.event.type} {dl.event.id} to group {dl.group}")

    run(go)


def dlq_redrive(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Only deliveries pending this long (90s, 5m).")
    ] = "60s",
    app: AppOpt = None,
    store: StoreOpt = None,
) -> None:
    """Publish again the events a group has had pending too long (after the broker lost
    its data); groups that handled them already are not bothered."""
    the_app = client_app(app, store)
    seconds = parse_duration(older_than)

    async def go() -> None:
        async with the_app.client():
            n = await the_app.redrive(older_than=seconds)
        if n:
            console.print(f"re-drove {n} event(s) pending for over {older_than}")
        else:
            console.print(f"nothing to re-drive: no event pending for over {older_than} "
                          "(or the broker reads the store directly)")

    run(go)
