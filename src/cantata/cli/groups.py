"""``cantata groups [retire]``: the handler groups and triggers of an app, and retiring
one that no code serves any more (docs/operating.md, "Retiring a group")."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from cantata.observability.groups import GroupInfo
from cantata.observability.timeline import fmt_seconds
from cantata.server.models import group_out

from .common import (
    client_app,
    operator,
    print_json,
    refuse_options_before,
    run,
    say,
    show,
    table,
)
from .runs import AppOpt, JsonOpt, StoreOpt


def register(cli: typer.Typer) -> None:
    groups = typer.Typer(
        help="Handler groups and start_on triggers: list them (`cantata groups` or "
        "`cantata groups list`: what they are declared for, their backlog, who serves "
        "them), retire one no code serves any more.",
        invoke_without_command=True,
    )
    groups.callback()(groups_alone)
    groups.command("list")(list_groups)
    groups.command("retire")(retire)
    cli.add_typer(groups, name="groups")


def groups_alone(
    ctx: typer.Context,
    app: AppOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List every declared handler group and trigger (as `cantata groups list`)."""
    if ctx.invoked_subcommand is None:
        list_groups(app, store, as_json)
        return
    refuse_options_before(ctx, "groups")


def list_groups(
    app: AppOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List every declared handler group and trigger: the event types it is declared
    for, its pending deliveries (how many, the oldest's age, in progress), its dead
    letters, and whether a live worker serves it now."""
    the_app = client_app(app, store)

    async def go() -> tuple[list[GroupInfo], float]:
        async with the_app.client():
            return await the_app.groups(), the_app.clock.now()

    found, now = run(go)
    if as_json:
        print_json([group_out(g, now) for g in found])  # (as GET /api/groups answers)
        return
    if not found:
        say(f"no handler group or trigger is declared in app {the_app.name}")
        return
    out = table(f"handler groups and triggers of {the_app.name}", "group", "kind", "types",
                "pending", "oldest pending", "in progress", "dead letters", "served by")
    for g in found:
        s = g.stats
        oldest = "" if s.oldest_pending_at is None else fmt_seconds(now - s.oldest_pending_at)
        out.add_row(Text(s.group), s.kind or "not declared", Text(", ".join(s.patterns)),
                    str(s.pending), oldest, str(s.in_progress), str(s.dead_letters),
                    Text(_served(g)))
    show(out)
    unserved = [g.stats.group for g in found
                if g.served is False and g.stats.kind is not None and g.stats.pending]
    if unserved:
        which = "it" if len(unserved) == 1 else "each"
        say(f"no live worker serves {', '.join(unserved)}: start the service that declares "
            f"{which}, or retire a group no code serves any more with `cantata groups "
            "retire GROUP`")


def _served(g: GroupInfo) -> str:
    if g.served_by:
        return ", ".join(g.served_by)
    return "unknown" if g.served is None else "no live worker"


def retire(
    group: Annotated[str, typer.Argument(
        help="The group (see `cantata groups`); a trigger's is start:WORKFLOW.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")
                   ] = False,
    actor: Annotated[str | None, typer.Option(
        "--actor", help="Who retires it, for the audit log (default: cli:user@host).")
    ] = None,
    app: AppOpt = None,
    store: StoreOpt = None,
) -> None:
    """Retire a handler group (or trigger) no code serves any more: its declaration is
    removed (new events get no delivery for it) and its pending deliveries are ended as
    retired (not handled); its dead letters stay. Refused while a live worker serves it."""
    the_app = client_app(app, store)
    if not yes:
        typer.confirm(
            f"Retire group {group!r} of app {the_app.name}? Its pending deliveries end "
            "unhandled", abort=True,
        )

    async def go() -> None:
        async with the_app.client():
            done = await the_app.retire_group(group, actor=actor or operator())
        if not done.changed:
            say(f"nothing to retire: group {group!r} is not declared in app {the_app.name} "
                "and has no pending delivery to end (retired already? `cantata groups` "
                "lists the groups)")
        else:
            types = ", ".join(d.pattern for d in done.declarations) or "no declaration left"
            say(f"retired group {group!r} of app {the_app.name} (declared for {types}): "
                f"{done.ended} pending deliver{'y' if done.ended == 1 else 'ies'} ended "
                "unhandled")
        if done.held:
            say(f"{done.held} deliver{'y is' if done.held == 1 else 'ies are'} held by a "
                "live worker (one that started serving the group meanwhile): left to it")
        if done.dead_letters:
            say(f"its {done.dead_letters} dead letter(s) stay: `cantata dlq list --group "
                f"{group}`, then replay or discard them")

    run(go)
