"""``cantata retry | fork``: continue failed runs with fixed code (docs/operating.md)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from cantata.app import App

from .common import (
    client_app,
    console,
    operator,
    print_json,
    print_line,
    resolve_run,
    run,
    run_dict,
)
from .runs import AppOpt, JsonOpt, KeyOpt, RunArg, StoreOpt


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
    as_json: JsonOpt = False,
) -> None:
    """Continue a failed run from its failed step with the deployed code.

    Completed steps are not run again. Deploy the fix first: the run is taken by a
    worker whose code replays its history.
    """
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            rec = await resolve_run(the_app, run_id, key)
            handle = the_app.get_handle(rec.run_id)
            await handle.retry(actor=operator(), include_compensated=include_compensated)
            after = await handle.info()
            attrs = await attributes_of(the_app, after.run_id)
        if as_json:
            print_json(run_dict(after, attrs))
            return
        console.print(Text(f"run {after.run_id} ({after.workflow}) is {after.status} again "
                           f"(retry {after.epoch}): a worker continues it from its failed step"))

    run(go)


async def attributes_of(app: App, run_id: str) -> dict[str, str]:
    """A run's search attributes, as ``--json`` prints them."""
    return (await app.store.run_attributes(app.name, [run_id])).get(run_id, {})


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
            attrs = await attributes_of(the_app, new.run_id)
        if as_json:
            print_json(run_dict(new, attrs))
            return
        print_line(new.run_id)

    run(go)
