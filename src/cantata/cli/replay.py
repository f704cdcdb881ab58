"""``cantata check-replay APP``: the gate to run before a deploy."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cantata.engine.replaycheck import check_replay
from cantata.errors import CantataError

from .common import console, load_app, run


class ReplayCheckFailed(CantataError):
    """Some stored runs would break under the current code."""

    code = "replay_check_failed"


def register(cli: typer.Typer) -> None:
    cli.command("check-replay")(check)


def check(
    app: Annotated[str, typer.Argument(help="The app (new code), as module:attribute.")],
    store: Annotated[str | None, typer.Option("--store", help="Store URL.")] = None,
    all_runs: Annotated[
        bool, typer.Option("--all", help="Also replay finished runs, not only live ones.")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 1000,
) -> None:
    """Replay stored histories against the current code; list every run it would break."""
    the_app = load_app(app)
    if store:
        the_app.configure(store=store)

    async def go() -> None:
        async with the_app.client():
            problems = await check_replay(the_app, all_runs=all_runs, limit=limit)
            checked = len(await the_app.store.list_runs(the_app.name, limit=limit))
        if not problems:
            console.print(f"[green]ok[/]: the current code replays every checked run "
                          f"({'all' if all_runs else 'live'} runs of {the_app.name}, "
                          f"{checked} stored)")
            return
        table = Table(title="runs the current code would break")
        for col in ("run id", "workflow", "status", "problem", "detail"):
            table.add_column(col)
        for p in problems:
            table.add_row(p.run_id, p.workflow, p.status, p.problem, p.detail[:160])
        console.print(table)
        raise ReplayCheckFailed(
            f"{len(problems)} run(s) would break: deploy the old code until they finish, or "
            "cancel them"
        )

    run(go)
