"""``cantata publish | dlq``: choreography from the command line."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from cantata.errors import ConfigurationError
from cantata.model.checks import check_type_filter
from cantata.server.models import dead_letter_out

from .common import (
    BROKER_HELP,
    check_broker,
    check_known,
    client_app,
    console,
    fmt_date,
    operator,
    parse_duration,
    parse_json,
    print_json,
    print_line,
    run,
    say,
    show,
    table,
)
from .runs import AppOpt, JsonOpt, StoreOpt

BrokerOpt = Annotated[
    str | None, typer.Option("--broker", help=BROKER_HELP.format(app="--app"))
]


def register(cli: typer.Typer) -> None:
    cli.command("publish")(publish)
    dlq = typer.Typer(help="Dead letters: list, replay, discard, redrive.", no_args_is_help=True)
    dlq.command("list")(dlq_list)
    dlq.command("replay")(dlq_replay)
    dlq.command("redrive")(dlq_redrive)
    dlq.command("discard")(dlq_discard)
    cli.add_typer(dlq, name="dlq")


def publish(
    type: Annotated[str, typer.Argument(help="Event type, e.g. order.placed.")],
    data: Annotated[str, typer.Option("--data", help="JSON data of the event.")] = "null",
    subject: Annotated[
        str | None, typer.Option("--subject", help="The event's subject (CloudEvents).")
    ] = None,
    correlation_id: Annotated[
        str | None,
        typer.Option("--correlation-id", help="Join this business transaction (default: "
                     "a new one, the event's id)."),
    ] = None,
    app: AppOpt = None,
    store: StoreOpt = None,
    broker: BrokerOpt = None,
) -> None:
    """Publish an event; prints its id (and warns on stderr when nothing in the app
    listens to its type: an orphan, stored all the same)."""
    the_app = client_app(app, store, broker)
    value = parse_json(data, "--data")
    check_broker(the_app, publishing=True)

    async def go() -> None:
        async with the_app.client():
            event, orphan = await the_app._publish(
                type, value, subject=subject, correlation_id=correlation_id, id=None,
                actor=operator(),
            )
            print_line(event.id)
            if orphan:
                typer.echo(
                    "cantata: warning: no handler, workflow trigger or wait in app "
                    f"{the_app.name!r} listens to {event.type} (an orphan event): check "
                    "the type", err=True,
                )

    run(go)


def dlq_list(
    app: AppOpt = None,
    store: StoreOpt = None,
    group: Annotated[str | None, typer.Option("--group", help="Only this group's.")] = None,
    type: Annotated[str | None, typer.Option("--type", help="Only this event type.")] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="At most this many (the oldest).")
    ] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List dead letters, oldest first."""
    check_type_filter("--type", type)  # as GET /api/dead-letters?type= refuses it
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            letters = await the_app.dead_letters(limit=limit, group=group, type=type)
            if not letters and group is not None:
                await check_known(the_app, "handler", group, "--group")
        if as_json:  # as GET /api/dead-letters answers them
            print_json([dead_letter_out(d) for d in letters])
            return
        out = table(f"dead letters of {the_app.name}", "id", "group", "event", "attempts",
                    "failed at (UTC)", "error")
        for d in letters:
            out.add_row(
                Text(d.id), Text(d.group), Text(f"{d.event.type} {d.event.id}"),
                str(d.attempts), fmt_date(d.failed_at.timestamp()), Text(d.error),
            )
        show(out)

    run(go)


def dlq_replay(
    dead_letter_id: Annotated[
        str | None, typer.Argument(help="Dead letter id (see dlq list).", show_default=False)
    ] = None,
    all_letters: Annotated[
        bool, typer.Option("--all", help="Replay every dead letter (of --group / --type).")
    ] = False,
    group: Annotated[str | None, typer.Option("--group", help="With --all: only this group's.")
                     ] = None,
    type: Annotated[str | None, typer.Option("--type", help="With --all: only this type.")
                    ] = None,
    app: AppOpt = None,
    store: StoreOpt = None,
    broker: BrokerOpt = None,
) -> None:
    """Redeliver a dead letter (or, with --all, every matching one) to its group,
    through the broker the app's workers use (--broker)."""
    if all_letters == (dead_letter_id is not None):
        raise ConfigurationError("give either a dead letter ID or --all (with --group/--type)")
    if dead_letter_id is not None and (group or type):
        raise ConfigurationError("--group and --type go with --all")
    check_type_filter("--type", type)
    the_app = client_app(app, store, broker)
    check_broker(the_app)  # before any letter leaves the list

    async def go() -> None:
        async with the_app.client():
            if dead_letter_id is not None:
                dl = await the_app.replay(dead_letter_id, actor=operator())
                console.print(Text(f"redelivering {dl.event.type} {dl.event.id} to group "
                                   f"{dl.group}"))
                return
            if group is not None and not await the_app.dead_letters(limit=1, group=group):
                await check_known(the_app, "handler", group, "--group")
            who, seen = operator(), set()
            while True:  # page: each replay takes its letter off the list
                page = await the_app.dead_letters(limit=1000, group=group, type=type)
                # once per (group, event): one that fails again at once is not looped on
                batch = [d for d in page if (d.group, d.event.id) not in seen]
                for dl in batch:
                    await the_app.replay(dl.id, actor=who)
                    seen.add((dl.group, dl.event.id))
                if not batch or len(page) < 1000:
                    break
            say(f"redelivering {len(seen)} dead letter(s)")

    run(go)


def dlq_discard(
    dead_letter_id: Annotated[str, typer.Argument(help="Dead letter id (see dlq list).")],
    app: AppOpt = None,
    store: StoreOpt = None,
) -> None:
    """Remove a dead letter for good (it is not redelivered; the audit log keeps it)."""
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            dl = await the_app.discard(dead_letter_id, actor=operator())
            console.print(Text(f"discarded {dl.id}: {dl.event.type} {dl.event.id} of group "
                               f"{dl.group}"))

    run(go)


def dlq_redrive(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Only deliveries pending this long (90s, 5m).")
    ] = "60s",
    app: AppOpt = None,
    store: StoreOpt = None,
    broker: BrokerOpt = None,
) -> None:
    """Publish again the events a group has had pending too long (after the broker lost
    its data), through the broker the app's workers use (--broker); groups that handled
    them already are not bothered."""
    seconds = parse_duration(older_than)
    the_app = client_app(app, store, broker)
    check_broker(the_app)

    async def go() -> None:
        async with the_app.client():
            n = await the_app.redrive(older_than=seconds)
        if n:
            say(f"re-drove {n} event(s) pending for over {older_than}")
        else:
            say(f"nothing to re-drive: no event pending for over {older_than} (or the "
                "broker reads the store directly)")

    run(go)
