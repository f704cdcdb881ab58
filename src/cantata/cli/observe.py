"""``cantata trace | stalled | graph | asyncapi``: seeing business transactions."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.table import Table
from rich.text import Text

from cantata.app import App
from cantata.errors import AmbiguousRunId, ConfigurationError, RunNotFound, StoreUnavailable
from cantata.model.records import utc_datetime
from cantata.model.status import RunStatus
from cantata.observability.assemble import TRACE_ADVICE
from cantata.observability.asyncapi import asyncapi_document
from cantata.observability.eventmap import choreography_mermaid
from cantata.observability.graph import code_mermaid, workflow_mermaid
from cantata.observability.node import UNADDRESSED_TASK, TraceNode, TraceNotFound
from cantata.observability.stalled import Stall, find_stalls
from cantata.observability.timeline import fmt_seconds, render_timeline
from cantata.observability.trace import DEFAULT_LIMIT, build_trace
from cantata.server.flow_out import served
from cantata.server.models import stall_out, stall_where, trace_out
from cantata.store.factory import mask_url

from .common import (
    client_app,
    console,
    existing_store,
    load_app,
    parse_duration,
    print_json,
    resolve_run,
    run,
    say,
    show,
    store_url,
)
from .runs import AppOpt, CodeStoreOpt, JsonOpt, KeyOpt, StoreOpt

AppArg = Annotated[str, typer.Argument(help="The app, as module:attribute.")]


def register(cli: typer.Typer) -> None:
    cli.command("trace")(trace)
    cli.command("stalled")(stalled)
    cli.command("graph")(graph)
    cli.command("asyncapi")(asyncapi)


def trace(
    id: Annotated[
        str | None,
        typer.Argument(help="Correlation id, or any run or event id in it, or a unique start "
                       "of a run id.", show_default=False),
    ] = None,
    app: AppOpt = None,
    store: StoreOpt = None,
    key: KeyOpt = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=30_000, help="Records read per kind.")
    ] = DEFAULT_LIMIT,
    as_json: Annotated[bool, typer.Option("--json", help="Print the tree as JSON.")] = False,
) -> None:
    """Show a whole business transaction as a timeline, and where it stands."""
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            root = await _trace_of(the_app, id, key, limit)
            now = the_app.clock.now()
        if as_json:  # as GET /api/trace/{id} answers it
            print_json(trace_out(root, id or root.correlation_id or "", now))
        else:
            console.print(render_timeline(root, now=now))

    run(go)


async def _trace_of(app: App, ref: str | None, key: str | None, limit: int) -> TraceNode:
    """The trace an id names; a run named by key or id prefix gives its transaction's."""
    if key is None and ref:
        try:
            return await build_trace(app.store, app.name, ref, limit=limit)
        except TraceNotFound as exc:
            try:  # perhaps the start of a run id
                rec = await resolve_run(app, ref)
            except AmbiguousRunId:
                raise
            except RunNotFound:  # the library's advice in the command's own terms
                raise TraceNotFound(str(exc).replace(
                    TRACE_ADVICE, "check the id, --app and --store")) from None
    else:
        rec = await resolve_run(app, ref, key)
    return await build_trace(app.store, app.name, rec.correlation_id, limit=limit)


def again(command: str, target: str, app: str | None, store: str | None) -> str:
    """``cantata COMMAND TARGET`` with the ``--app`` and ``--store`` given to this one
    (as typed: a module:attribute stays one; a store password stays out)."""
    words = ["cantata", *command.split(), target]
    if app is not None:
        words += ["--app", app]
    if store is not None:
        masked = mask_url(store)
        words += ["--store", store if masked == store else "URL"]
    return shlex.join(words)


def _detail(stall: Stall, app: str | None, store: str | None, width: int = 0) -> str:
    """What a stall is stuck on; a dead letter's with the command that replays it (as
    :func:`again`). ``width``: cut the error, never the command, to about that."""
    n = stall.node
    if stall.hint is not None and stall.hint == n.detail:  # (a saga's hop the code lacks)
        return stall.hint
    if stall.hint is not None:  # the cause, when the store tells it
        return f"{n.detail or n.error or ''} ({stall.hint})".lstrip()
    if n.kind == "wait":
        return n.detail or ""
    if n.kind == "dead_letter":
        hint = f" (replay: {again('dlq replay', n.ref or '', app, store)})"
        error = n.error or ""
        if width and len(error) + len(hint) > width:
            error = error[:max(width - len(hint), 40)] + "…"
        return error + hint
    if n.kind in ("step", "compensation") and n.group and stall.reason == "pending_step":
        # a step of another service: the task waits for one of that service's workers
        waiting = f"waiting for a worker of service {n.group}"
        return f"{waiting}; last error: {n.error}" if n.error else waiting
    if n.kind in ("step", "compensation") and n.detail == UNADDRESSED_TASK:
        return f"waiting for a service that declares step {n.name}"
    if n.kind == "run" and n.detail:  # its queue and place, or a cancel not applied yet
        return f"{n.detail}; last error: {n.error}" if n.error else n.detail
    return n.error or ""


def stalled(
    older_than: Annotated[
        str, typer.Option("--older-than", help="No progress for this long (90s, 5m, 2h).")
    ] = "5m",
    app: AppOpt = None,
    store: StoreOpt = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=10_000,
                          help="At most this many stalls (and transactions looked at).")
    ] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List business transactions that made no progress for a while, and why."""
    seconds = parse_duration(older_than)
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            now = the_app.clock.now()
            stalls = await find_stalls(
                the_app.store, the_app.name, older_than=seconds, now=now, limit=limit
            )
            unserved = 0 if as_json else await _unserved_runs(the_app)
        if as_json:  # as GET /api/stalled answers them
            print_json([stall_out(s) for s in stalls])
            return
        if not stalls:
            say(f"no stalled transactions in app {the_app.name} (no progress for "
                f"{older_than} or more)")
            _say_unserved(the_app.name, unserved)
            return
        table = Table(title=f"stalled transactions of {the_app.name} (older than {older_than})")
        table.add_column("correlation id", no_wrap=True)
        for col in ("reason", "where", "stuck for"):
            table.add_column(col)
        table.add_column("detail", overflow="fold")
        at = utc_datetime(now)
        for s in stalls:
            # Text cells: user data (ids, error messages) is never read as markup.
            table.add_row(Text(s.correlation_id), s.reason, Text(stall_where(s)),
                          fmt_seconds((at - s.since).total_seconds()),
                          Text(_detail(s, app, store, 200)))
        show(table)
        console.print(Text(f"{len(stalls)} stall(s); see one whole: "
                           + again("trace", stalls[0].correlation_id, app, store)))
        _say_unserved(the_app.name, unserved)

    run(go)


async def _unserved_runs(app: App) -> int:
    """How many live runs (pending, running, compensating) make no progress because no
    live worker serves ``app`` (0 while one does): they count as stalled only later."""
    if await served(app):
        return 0
    counts = await app.store.count_runs(app.name)
    return sum(counts.get(str(s), 0) for s in RunStatus if not s.is_final)


def _say_unserved(app: str, runs: int) -> None:
    """Say, as the console's overview does, that no worker serves the live runs."""
    if runs:
        say(f"no worker is serving app {app!r} (no live worker heartbeat): {runs} live "
            "run(s) make no progress until a worker runs (cantata worker MODULE:app)")


def _has_store(the_app: App) -> bool:
    """True unless the app's store is a SQLite file that does not exist (or memory)."""
    spec = the_app._store_spec
    if not isinstance(spec, str):
        return True
    if spec.startswith("memory://"):
        return False
    if spec.startswith("sqlite:///"):
        path = spec[len("sqlite:///"):].partition("?")[0]
        return Path(path).exists()
    return True


def graph(
    app: AppArg,
    workflow: Annotated[str | None, typer.Argument(help="The workflow to draw.")] = None,
    events: Annotated[
        bool, typer.Option("--events", help="Draw the choreography map instead.")
    ] = False,
    store: CodeStoreOpt = None,
) -> None:
    """Print Mermaid: a workflow's steps and compensations, or (--events) the choreography."""
    if events == (workflow is not None):
        raise ConfigurationError(
            "give either a WORKFLOW to draw or --events for the choreography map"
        )
    the_app = load_app(app)
    if store is not None:  # else its own (App(store=...), else $CANTATA_STORE)
        the_app.configure(store=store_url(store))
    if workflow is not None:
        drawn = code_mermaid(the_app.router, workflow)
        if drawn is not None:
            typer.echo(drawn, nl=False)
            return
    use_store = _has_store(the_app)
    if use_store and isinstance(the_app._store_spec, str):
        # read, never made: a mistyped PostgreSQL schema is not created
        the_app.configure(store=existing_store(the_app._store_spec))

    async def from_code() -> str:
        if workflow is not None:
            return await workflow_mermaid(the_app.router, the_app.name, workflow, None)
        return await choreography_mermaid(the_app.router, the_app.name, None)

    async def go() -> str:
        if not use_store:
            return await from_code()
        try:
            async with the_app.client():
                if workflow is not None:
                    return await workflow_mermaid(the_app.router, the_app.name, workflow,
                                                  the_app.store)
                return await choreography_mermaid(the_app.router, the_app.name, the_app.store)
        except StoreUnavailable as exc:
            typer.echo(f"cantata: warning: {exc}; drawn from the code alone", err=True)
            return await from_code()

    typer.echo(run(go), nl=False)


def asyncapi(
    app: AppArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (default: stdout).")
    ] = None,
    version: Annotated[str, typer.Option("--version", help="info.version of the API.")] = "1.0.0",
) -> None:
    """Write the AsyncAPI 3.0 document (JSON) of every event the app publishes and consumes."""
    doc = asyncapi_document(load_app(app), version=version)
    text = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {output}: {exc.strerror}") from None
    say(f"wrote {output}: {len(doc['channels'])} channels, "
        f"{len(doc['operations'])} operations")
