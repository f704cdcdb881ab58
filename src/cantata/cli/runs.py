"""``cantata start | runs | run | cancel``: orchestration from the command line."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import typer
from rich.text import Text

from cantata.app import App
from cantata.declare.defs import Parameters
from cantata.engine.recovery import find_records
from cantata.engine.values import SET_VALUE, values_of
from cantata.errors import CantataError, ConfigurationError, RunNotFound
from cantata.model import codec
from cantata.model.attributes import parse_attr
from cantata.model.records import ENTRY_FAILED, RunRecord, branch_cancelled
from cantata.model.status import call_status
from cantata.observability.timeline import BRANCH_CANCELLED
from cantata.server import params
from cantata.server.errors import ApiError
from cantata.server.flow_out import run_queue
from cantata.server.models import run_detail, run_out, steps_out

from .common import (
    STORE_HELP,
    check_known,
    client_app,
    console,
    fmt_date,
    fmt_duration,
    fmt_stamp,
    fmt_time,
    load_app,
    operator,
    parse_json,
    print_json,
    print_line,
    refuse_options_before,
    resolve_run,
    run,
    show,
    table,
    use_existing_store,
)

AppOpt = Annotated[
    str | None,
    typer.Option("--app", help="App name or module:attribute (default: $CANTATA_APP)."),
]
StoreOpt = Annotated[
    str | None, typer.Option("--store", help=STORE_HELP.format(app="--app"))
]
# for the commands whose APP is module:attribute
CodeStoreOpt = Annotated[
    str | None, typer.Option("--store", help=STORE_HELP.format(app="APP"))
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
    "interrupted": "yellow",
}


class InvalidArguments(ConfigurationError):
    """``cantata start`` with arguments the workflow cannot be called with (the HTTP
    API answers 422 ``invalid_arguments``)."""

    code = "invalid_arguments"


class RunEnded(CantataError):
    """``cantata cancel`` of a run that already ended (the HTTP API answers 409)."""

    code = "run_final"


def styled(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def register(cli: typer.Typer) -> None:
    from .repin import repin

    cli.command("start")(start)
    runs = typer.Typer(
        help="List runs (filtered by status, workflow, attributes, key, version, creation "
        "time); re-pin the live runs of a version to older code, for a rollback.",
        invoke_without_command=True,
    )
    runs.callback()(list_runs)
    runs.command("repin")(repin)
    cli.add_typer(runs, name="runs")
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
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="The same key returns the same run (at most "
                     "one run per key)."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result.")] = False,
    store: CodeStoreOpt = None,
) -> None:
    """Start a workflow run (a worker must be running to execute it)."""
    the_app = load_app(app)
    use_existing_store(the_app, store)
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
    wdef = the_app.workflows.get(workflow)
    takes = None if wdef is None else Parameters.of(wdef)
    problem = None if takes is None else takes.problem(len(values))
    if problem is not None:  # refused before anything is stored, as over HTTP
        raise InvalidArguments(f"{problem}: pass --input JSON for one argument or --args "
                               "JSON-LIST for several")

    async def go() -> None:
        async with the_app.client():
            handle = await the_app.start(workflow, *values, idempotency_key=idempotency_key,
                                         actor=operator())
            print_line(handle.run_id)
            if wait:
                result = await handle.result()
                print_line(orjson.dumps(result).decode())

    run(go)


TIME_FORMATS = ("an RFC 3339 time with its zone (2026-01-31T12:00:00Z, "
                "2026-01-31T13:00:00+01:00) or POSIX seconds (1769860800)")


def time_option(option: str, value: str | None) -> float | None:
    """``--since``/``--until`` read as ``GET /api/runs`` reads its ``since``/``until``
    (:func:`cantata.server.params.timestamp`): POSIX seconds, or an RFC 3339 time a run
    is shown at meaning that run and the later (since) / earlier (until) ones.

    Raises:
        ConfigurationError: naming the option, the value and the formats it takes.
    """
    try:
        return params.timestamp(option.removeprefix("--"), value)
    except ApiError:
        raise ConfigurationError(f"{option} {value!r} is invalid: give {TIME_FORMATS}") from None


KeyOpt = Annotated[
    str | None, typer.Option("--key", help="Find the run by its idempotency key instead.")
]
RunArg = Annotated[
    str | None, typer.Argument(help="The run id, or a unique start of it.", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def list_runs(
    ctx: typer.Context,
    app: AppOpt = None,
    store: StoreOpt = None,
    status: Annotated[
        str | None,
        typer.Option("--status", help="pending, running, compensating, completed, "
                     "compensated, failed or cancelled."),
    ] = None,
    workflow: Annotated[
        str | None, typer.Option("--workflow", help="Only this workflow's runs.")
    ] = None,
    attr: Annotated[
        list[str] | None,
        typer.Option("--attr", help="NAME=VALUE: runs with this search attribute (repeatable)."),
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="Idempotency key.")] = None,
    version: Annotated[
        str | None, typer.Option("--version", help="Only the runs pinned to this code "
                                 "version (the version column).")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only the runs created at or after this "
                                 f"time: {TIME_FORMATS} (as GET /api/runs?since=).")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Only the runs created before this time "
                                 "(same formats; as GET /api/runs?until=).")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=10_000, help="At most this many (the newest).")
    ] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first (filtered by status, workflow, attributes, key, version,
    creation time)."""
    if ctx.invoked_subcommand is not None:
        refuse_options_before(ctx, "runs")  # (they would be ignored: repin takes its own)
        return
    wanted = dict(parse_attr(a) for a in attr or [])
    created_since, created_until = time_option("--since", since), time_option("--until", until)
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            found = await find_records(
                the_app.engine, idempotency_key=key, attributes=wanted or None,
                workflow=workflow, status=status, limit=limit, version=version,
                since=created_since, until=created_until,
            )
            if not found and workflow is not None and not await find_records(
                the_app.engine, workflow=workflow, limit=1
            ):
                await check_known(the_app, "workflow", workflow, "--workflow")
        if as_json:  # each run as GET /api/runs lists it
            print_json([run_out(r) for r, _ in found])
            return
        out = table(f"runs of {the_app.name}", "run id", "workflow", "status", "version",
                    "created (UTC)", "updated (UTC)", "key", "error",
                    ids=("run id", "version"))
        for r, _ in found:
            out.add_row(
                Text(r.run_id), Text(r.workflow), styled(str(r.status)), Text(r.version or ""),
                fmt_date(r.created_at), fmt_time(r.updated_at), Text(r.idempotency_key or ""),
                Text(r.error or ""),
            )
        show(out)

    run(go)


def show_run(
    run_id: RunArg = None,
    app: AppOpt = None,
    store: StoreOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one run: status, result or error, and its step history with attempts."""
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            rec = await resolve_run(the_app, run_id, key)
            if as_json:
                print_json(await run_details(the_app, rec))
            else:
                await print_run(the_app, rec.run_id)

    run(go)


async def run_details(app: App, rec: RunRecord) -> dict[str, Any]:
    """``cantata run --json`` (and ``retry``/``fork --json``): the run as
    ``GET /api/runs/{run_id}`` answers it, plus ``superseded``: the entries retries set
    aside, each a step of ``steps`` with its ``epoch`` (docs/operating.md)."""
    store = app.store
    history = await store.load_history(app.name, rec.run_id)
    attempts = await store.load_attempts(app.name, rec.run_id)
    attrs = (await store.run_attributes(app.name, [rec.run_id])).get(rec.run_id, {})
    queue = await run_queue(app, rec)
    out = run_detail(rec, history, attempts, attrs, queue).model_dump(mode="json")
    set_aside = await store.superseded_history(app.name, rec.run_id)
    tried = await store.superseded_attempts(app.name, rec.run_id) if rec.epoch else []
    out["superseded"] = [
        {"epoch": epoch, **step.model_dump(mode="json")}
        for epoch, e in set_aside
        for step in steps_out([e], [a for n, a in tried if n == epoch], None)
    ]
    return out


async def print_run(app: App, run_id: str) -> None:
    store = app.store
    rec = await store.get_run(app.name, run_id)
    if rec is None:
        raise RunNotFound(f"no run {run_id!r} in app {app.name!r} (store {store.url})")
    history = await store.load_history(app.name, run_id)
    attempts = await store.load_attempts(app.name, run_id)
    attrs = (await store.run_attributes(app.name, [run_id])).get(run_id, {})
    superseded = await store.superseded_history(app.name, run_id)
    console.print(
        Text.assemble(("run ", "bold"), (rec.run_id, "bold"), "  workflow ",
                      (rec.workflow, "bold"), "  ", Text.from_markup(styled(str(rec.status))),
                      ("  flagged for an operator" if rec.flagged else "", "red"))
    )
    console.print(Text(f"correlation {rec.correlation_id}   created {fmt_stamp(rec.created_at)}"
                       f"   updated {fmt_stamp(rec.updated_at)}"))
    if rec.idempotency_key is not None or rec.version is not None or rec.epoch:
        console.print(Text(f"key {rec.idempotency_key or '-'}   version {rec.version or 'any'}"
                           + (f"   retried {rec.epoch} time(s)" if rec.epoch else "")))
    if attrs:
        console.print(Text("attributes " + "  ".join(f"{k}={v}" for k, v in attrs.items())))
    console.print(Text(f"args   {rec.args}"))
    if rec.result is not None:
        console.print(Text(f"result {rec.result}"))
    if rec.error:
        console.print(Text(f"error  {rec.error}", style="red"))
    values = values_of(history)
    if values:
        console.print("values " + "   ".join(
            f"{k} = {codec.dumps(v)[:120]}" for k, v in sorted(values.items())
        ), markup=False)
    out = table("history", "#", "call", "kind", "status", "attempts", "started (UTC)", "took",
                "detail")
    by_key: dict[str, list[Any]] = {}
    for a in attempts:
        by_key.setdefault(a.key, []).append(a)
    for e in history:
        status = call_status(e.status, rec.status)  # open calls of an ended run: cut short
        took = None
        if e.started_at is not None and e.ended_at is not None:
            took = e.ended_at - e.started_at
        detail = e.error or ""
        if not detail and e.result is not None and e.kind in ("step", "value", "child", SET_VALUE):
            detail = e.result[:60]
        if e.wake_at is not None and status == "waiting":
            detail = f"until {fmt_stamp(e.wake_at)}"
        if branch_cancelled(e):  # it ended as it did, then its branch got the cancel
            detail = f"{BRANCH_CANCELLED}; {detail}" if detail else BRANCH_CANCELLED
        out.add_row(
            str(e.seq), Text(e.key), e.kind, styled(status), str(e.attempts or ""),
            fmt_time(e.started_at), fmt_duration(took),
            Text(detail, style="red" if e.status == ENTRY_FAILED else ""),
        )
        for a in by_key.get(e.key, []):
            if a.error_type:
                out.add_row(
                    "", f"  attempt {a.attempt}", "", "[red]failed[/]", "",
                    fmt_time(a.started_at),
                    fmt_duration(None if a.ended_at is None else a.ended_at - a.started_at),
                    Text(f"{a.error_type}: {a.error}", style="red"),
                )
    for epoch, e in superseded:
        out.add_row("", Text(e.key), e.kind, f"superseded by retry {epoch}",
                    str(e.attempts or ""), fmt_time(e.started_at), "",
                    Text(e.error or "", style="red"))
    show(out)


def cancel(
    run_id: RunArg = None,
    app: AppOpt = None,
    store: StoreOpt = None,
    key: KeyOpt = None,
) -> None:
    """Cancel a run: it stops at its next durable point and compensates."""
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            rec = await resolve_run(the_app, run_id, key)
            if rec.status.is_final:
                raise RunEnded(f"run {rec.run_id} already ended ({rec.status}): only a live "
                               "run can be cancelled")
            handle = the_app.get_handle(rec.run_id)
            await handle.cancel(actor=operator())
            console.print(Text(f"cancel requested for run {rec.run_id} "
                               f"(now {await handle.status()})"))

    run(go)
