"""``cantata retry | fork``: continue failed runs with fixed code (docs/operating.md)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from .common import (
    client_app,
    console,
    operator,
    print_json,
    print_line,
    resolve_run,
    run,
)
from .runs import AppOpt, JsonOpt, KeyOpt, RunArg, StoreOpt, run_details


def register(cli: typer.Typer) -> None:
    cli.command("retry")(retry)
    cli.command("fork")(fork)


def retry(
    run_id: RunArg = None,
    app: AppOpt = None,
    store: StoreOpt = None,
    key: KeyOpt = None,
    include_compensated: Annotated[
        bool, typer.Option("--include-compensated", help="Retry a compensated run too.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Retry even if the app's code (module:app) "
                           "does not replay the run's history.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Continue a failed run from its failed step with the deployed code.

    Completed steps are not run again. Deploy the fix first: the run is taken by a
    worker whose code replays its history. Given the app's code (--app module:app), the
    retry is refused when that code does not replay the run's history (--force: anyway).
    """
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            rec = await resolve_run(the_app, run_id, key)
            handle = the_app.get_handle(rec.run_id)
            await handle.retry(actor=operator(), include_compensated=include_compensated,
                               force=force)
            after = await handle.info()
            shown = await run_details(the_app, after) if as_json else None
        if shown is not None:  # the run as `cantata run --json` shows it
            print_json(shown)
            return
        console.print(Text(f"run {after.run_id} ({after.workflow}) is {after.status} again "
                           f"(retry {after.epoch}): a worker continues it from its failed step"))

    run(go)


def fork(
    run_id: RunArg = None,
    from_step: Annotated[
        str, typer.Option("--from-step", help="History key to restart at, e.g. charge#1.")
    ] = "",
    app: AppOpt = None,
    store: StoreOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a new run that reuses a run's recorded results before a step."""
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            rec = await resolve_run(the_app, run_id, key)
            handle = await the_app.fork(rec.run_id, from_step, actor=operator())
            new = await handle.info()
            shown = await run_details(the_app, new) if as_json else None
        if shown is not None:  # the new run as `cantata run --json` shows it
            print_json(shown)
            return
        print_line(new.run_id)

    run(go)
