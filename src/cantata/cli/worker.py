"""``cantata worker APP``: serve an app's workflows and handlers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Annotated

import typer

from cantata.errors import ConfigurationError
from cantata.observability import logs
from cantata.store.factory import mask_url

from .common import console, load_app, store_url


def register(cli: typer.Typer) -> None:
    cli.command("worker")(worker)


def worker(
    app: Annotated[str, typer.Argument(help="The app, as module:attribute.")],
    store: Annotated[str | None, typer.Option("--store", help="Store URL.")] = None,
    broker: Annotated[str | None, typer.Option("--broker", help="Broker URL.")] = None,
    service: Annotated[
        list[str] | None,
        typer.Option("--service", help="Serve only this service (repeatable)."),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    ] = "INFO",
    log_format: Annotated[
        str, typer.Option("--log-format", help="text or json (one object per line).")
    ] = "text",
    grace: Annotated[
        float | None,
        typer.Option(
            "--grace", min=0.0,
            help="Seconds a stop lets steps and handlers in progress finish before "
            "releasing them (default: the app's shutdown_grace, 30).",
        ),
    ] = None,
    any_version: Annotated[
        bool,
        typer.Option("--any-version", help="Take runs of every code version, unchecked "
                     "(default: this version's, and others' this code replays)."),
    ] = False,
) -> None:
    """Run a worker: resume unfinished runs, execute new ones, handle events.

    Every logger's records (the app's own too) go to stderr at ``--log-level``; those
    logged inside a step or handler carry its run id, step and attempt (or event id
    and group).
    """
    try:
        logs.configure(log_level, log_format)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    the_app = load_app(app)
    if store is not None:
        the_app.configure(store=store_url(store))
    if broker:
        the_app.configure(broker=broker)
    if service:
        the_app.services = frozenset(service)
    if grace is not None:
        the_app.shutdown_grace = grace
    if any_version:
        the_app.any_version = True

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            # The first signal stops gracefully; a second one releases everything now.
            if stop.is_set():
                console.print("second signal: releasing what still runs now")
                the_app.force_stop()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, on_signal)
        async with the_app:
            console.print(
                f"cantata worker {the_app.engine.worker_id} serving app [bold]{the_app.name}[/] "
                f"({len(the_app.workflows)} workflows, {len(the_app.handlers)} handlers, version "
                f"{the_app.version}) on {mask_url(the_app.store.url)}"
            )
            await stop.wait()
            console.print(
                f"stopping: steps and handlers in progress get up to "
                f"{the_app.shutdown_grace:g} s to finish (a second signal stops at once); "
                "what is left is released to the other workers"
            )

    asyncio.run(main())
