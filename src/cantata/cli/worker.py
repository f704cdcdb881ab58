"""``cantata worker APP``: serve an app's workflows and handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Annotated

import typer

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
) -> None:
    """Run a worker: resume unfinished runs, execute new ones, handle events."""
    the_app = load_app(app)
    if store is not None:
        the_app.configure(store=store_url(store))
    if broker:
        the_app.configure(broker=broker)
    if service:
        the_app.services = frozenset(service)
    logging.getLogger("cantata").setLevel(logging.INFO)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        async with the_app:
            console.print(
                f"cantata worker {the_app.engine.worker_id} serving app [bold]{the_app.name}[/] "
                f"({len(the_app.workflows)} workflows, {len(the_app.handlers)} handlers) on "
                f"{mask_url(the_app.store.url)}"
            )
            await stop.wait()
            console.print("stopping: unfinished runs stay in the store for the next worker")

    asyncio.run(main())
