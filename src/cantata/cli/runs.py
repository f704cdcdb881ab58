"""``cantata start | runs | run | cancel``: orchestration from the command line."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import typer
from rich.table import Table

from cantata.app import App
from cantata.engine.values import SET_VALUE, values_of
from cantata.errors import ConfigurationError, RunNotFound
from cantata.model import codec
from cantata.model.records import ENTRY_FAILED

from .common import (
    client_app,
    console,
    fmt_duration,
    fmt_time,
    load_app,
    operator,
    parse_json,
    run,
    store_url,
)

AppOpt = Annotated[
    str | None,
    typer.Option("--app", help="App name or module:attribute (default: $CANTATA_APP)."),
]
StoreOpt = Annotated[
    str | None, typer.Option("--store", help="Store URL (default: $CANTATA_STORE).")
]

STATUS_STYLE = {
    "completed": "green",
    "compensated": "yellow",
    "failed": "red",
    "cancelled": "magenta",
    "running": "cyan",
    "pending": "blue",
    "compensating": "yellow",
    "waiting": "blue",
}


def styled(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def register(cli: typer.Typer) -> None:
    cli.command("start")(start)
    cli.command("runs")(list_runs)
    cli.command("run")(show_run)
    cli.command("cancel")(cancel)


def start(
    app: Annotated[str, typer.Argument(help="The app, as module:attribute.")],
    workflow: Annotated[str, typer.Argument(help="Workflow name.")],
    input: Annotated[
        str | None, typer.Option("--input", help="JSON value passed as the single argument.")
    ] = None,
    args: Annotated[
        str | None, typer.Option("--args", help="JSON list of arguments (for several).")
    ] = None,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result.")] = False,
    store: StoreOpt = None,
) -> None:
    """Start a workflow run (a worker must be running to execute it)."""
    the_app = load_app(app)
    if store is not None:
        the_app.configure(store=store_url(store))
    if input is not None and args is not None:
        raise ConfigurationError("give either --input JSON or --args JSON-LIST, not both")
    values: list[Any] = []
    if input is not None:
        values = [parse_json(input, "--input")]
    elif args is not None:
        parsed = parse_json(args, "--args")
        if not isinstance(parsed, list):
            raise ConfigurationError(f"--args must be a JSON list, got {args!r}")
        values = parsed

    async def go() -> None:
        async with the_app.client():
            handle = await the_app.start(workflow, *values, idempotency_key=idempotency_key)
            console.print(handle.run_id)
            if wait:
                result = await handle.result()
                console.print(orjson.dumps(result).decode())

    run(go)


def list_runs(
    app: AppOpt = None,
    store: StoreOpt = None,
    status: Annotated[str | None, typer.Option("--status")] = None,
    workflow: Annotated[str | None, typer.Option("--workflow")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 50,
) -> None:
    """List runs, newest first."""
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            infos = await the_app.list_runs(status=status, workflow=workflow, limit=limit)
        table = Table(title=f"runs of {the_app.name}")
        for col in ("run id", "workflow", "status", "created", "updated", "error"):
            table.add_column(col)
        for i in infos:
            table.add_row(
                i.run_id, i.workflow, styled(str(i.status)),
                i.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                i.updated_at.strftime("%H:%M:%S"), (i.error or "")[:80],
            )
        console.print(table)

    run(go)


def show_run(
    run_id: Annotated[str, typer.Argument(help="The run id.")],
    app: AppOpt = None,
    store: StoreOpt = None,
) -> None:
    """Show one run: status, result or error, and its step history with attempts."""
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            await print_run(the_app, run_id)

    run(go)


async def print_run(app: App, run_id: str) -> None:
    store = app.store
    rec = await store.get_run(app.name, run_id)
    if rec is None:
        raise RunNotFound(f"no run {run_id!r} in app {app.name!r} (store {store.url})")
    history = await store.load_history(app.name, run_id)
    attempts = await store.load_attempts(app.name, run_id)
    console.print(
        f"[bold]run {rec.run_id}[/]  workflow [bold]{rec.workflow}[/]  {styled(str(rec.status))}"
        + ("  [red]flagged for an operator[/]" if rec.flagged else "")
    )
    console.print(f"correlation {rec.correlation_id}   created {fmt_time(rec.created_at)}   "
                  f"updated {fmt_time(rec.updated_at)}")
    console.print(f"args   {rec.args}")
    if rec.result is not None:
        console.print(f"result {rec.result}")
    if rec.error:
        console.print(f"[red]error  {rec.error}[/]")
    values = values_of(history)
    if values:
        console.print("values " + "   ".join(
            f"{k} = {codec.dumps(v)[:120]}" for k, v in sorted(values.items())
        ), markup=False)
    table = Table(title="history")
    for col in ("#", "call", "kind", "status", "attempts", "started", "took", "detail"):
        table.add_column(col)
    by_key: dict[str, list[Any]] = {}
    for a in attempts:
        by_key.setdefault(a.key, []).append(a)
    for e in history:
        took = None
        if e.started_at is not None and e.ended_at is not None:
            took = e.ended_at - e.started_at
        detail = e.error or ""
        if not detail and e.result is not None and e.kind in ("step", "value", "child", SET_VALUE):
            detail = e.result[:60]
        if e.wake_at is not None and e.status == "waiting":
            detail = f"until {fmt_time(e.wake_at)}"
        table.add_row(
            str(e.seq), e.key, e.kind, styled(e.status), str(e.attempts or ""),
            fmt_time(e.started_at), fmt_duration(took),
            f"[red]{detail}[/]" if e.status == ENTRY_FAILED else detail,
        )
        for a in by_key.get(e.key, []):
            if a.error_type:
                table.add_row(
                    "", f"  attempt {a.attempt}", "", "[red]failed[/]", "",
                    fmt_time(a.started_at),
                    fmt_duration(None if a.ended_at is None else a.ended_at - a.started_at),
                    f"[red]{a.error_type}: {a.error}[/]",
                )
    console.print(table)


def cancel(
    run_id: Annotated[str, typer.Argument(help="The run id.")],
    app: AppOpt = None,
    store: StoreOpt = None,
) -> None:
    """Cancel a run: it stops at its next durable point and compensates."""
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            handle = the_app.get_handle(run_id)
            await handle.cancel(actor=operator())
            console.print(f"cancel requested for run {run_id} (now {await handle.status()})")

    run(go)
