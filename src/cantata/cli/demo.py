"""``cantata demo``: the order flow in both styles, side by side."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cantata.app import App
from cantata.errors import ConfigurationError, WorkflowError

from .common import console, fmt_duration, say


def register(cli: typer.Typer) -> None:
    cli.command("demo")(demo)


@dataclass
class Outcome:
    """What one style did with the orders."""

    shipped: int = 0
    compensated: int = 0
    other: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)


def demo(
    orders: Annotated[
        int, typer.Option("--orders", min=1, max=100_000, help="Orders placed in each style.")
    ] = 20,
    store: Annotated[
        str | None, typer.Option("--store", help="Store URL (default: ./cantata-demo.db).")
    ] = None,
    broker: Annotated[str | None, typer.Option("--broker", help="Broker URL.")] = None,
    processes: Annotated[
        bool,
        typer.Option("--processes", help="Run each service (orders, inventory, payments, "
                     "shipping) as its own worker process."),
    ] = False,
) -> None:
    """Run the order example orchestrated and choreographed, and compare the outcomes."""
    # Imported here, not with the CLI: the example builds its App when imported, and a
    # bad setting ($CANTATA_AUDIT_KEY too short) must fail this command alone, in one line.
    from cantata.examples.orders.app import SERVICES, make_app

    if store is None:
        path = Path.cwd() / "cantata-demo.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        store = f"sqlite:///{path}"
    app = make_app(store, broker or "embedded", name="orders")
    console.print(
        f"[bold]Cantata demo[/]: {orders} orders, reserve → charge → ship; every 5th card is "
        "declined (compensated), every 7th payment meets a gateway hiccup (retried).\n"
        f"store {escape(store)}, broker {escape(broker or 'embedded')}"
        + (f"; one worker process per service: {', '.join(SERVICES)}" if processes else "")
        + "\n"
    )
    workers = _spawn_workers(store, broker or "embedded") if processes else []
    try:
        orchestrated, choreographed = asyncio.run(_run(app, orders, serve=not processes))
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.wait(timeout=10)
    table = Table(title="outcome, side by side")
    table.add_column("")
    table.add_column("orchestrated (saga workflow)", justify="right")
    table.add_column("choreographed (services + events)", justify="right")
    table.add_row("orders", str(orders), str(orders))
    table.add_row("[green]shipped[/]", str(orchestrated.shipped), str(choreographed.shipped))
    table.add_row(
        "[yellow]compensated[/]", str(orchestrated.compensated), str(choreographed.compensated)
    )
    if orchestrated.other or choreographed.other:
        table.add_row("[red]other[/]", str(orchestrated.other), str(choreographed.other))
    table.add_row("wall time", fmt_duration(orchestrated.seconds),
                  fmt_duration(choreographed.seconds))
    table.add_row("orders/s", _rate(orders, orchestrated.seconds),
                  _rate(orders, choreographed.seconds))
    table.add_row("how it rolls back", "compensation steps, in reverse",
                  "payment.failed → inventory.released → order.cancelled")
    console.print(table)
    if store.startswith("memory:"):  # gone with this process: no command can read it
        console.print("\nThe memory:// store is gone with this process: run the demo with "
                      "--store sqlite:///demo.db to look at its runs and traces afterwards.")
        return
    if orchestrated.examples:
        say(f"\nA compensated saga:        cantata trace {orchestrated.examples[0]} "
            f"--app orders --store {store}")
    if choreographed.examples:
        say(f"A compensated event flow:  cantata trace {choreographed.examples[0]} "
            f"--app orders --store {store}")
    say(f"All runs:                  cantata runs --app orders --store {store}")


def _rate(orders: int, seconds: float) -> str:
    """Orders per second: whole above 10, else with one decimal (never a 0 for a slow
    but finished run)."""
    if not seconds:
        return "-"
    rate = orders / seconds
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.1f}" if rate >= 0.1 else f"{rate:.2g}"


def _spawn_workers(store: str, broker: str) -> list[subprocess.Popen[bytes]]:
    """One ``cantata worker --service S`` process per service of the example, returned
    once each serves: the orders are timed from then, so neither column counts the
    workers' start-up.

    Raises:
        ConfigurationError: a worker ended (or did not serve within a minute) first.
    """
    from cantata.examples.orders.app import SERVICES

    started: list[tuple[str, subprocess.Popen[bytes], int]] = []
    try:
        for service in SERVICES:
            started.append((service, *_start(
                [sys.executable, "-m", "cantata", "worker", "cantata.examples.orders.app:app",
                 "--service", service, "--store", store, "--broker", broker,
                 "--processes", "1", "--child-of", str(os.getpid())])))  # end with us
        _ready(started, timeout=60.0)
    except BaseException:
        for _, proc, _ in started:
            proc.terminate()
        for _, proc, _ in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        raise
    return [proc for _, proc, _ in started]


def _start(command: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``command --ready-fd N`` (a worker writes ``r``, then its worker id, to N
    once it serves, as under the supervisor); the process and the read end of its pipe."""
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen([*command, "--ready-fd", str(write_fd)],
                                pass_fds=(write_fd,), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child holds the only write end: its exit is EOF
    return proc, read_fd


def _ready(started: list[tuple[str, subprocess.Popen[bytes], int]], *, timeout: float) -> None:
    """Wait until every started worker says it serves (closing the pipes).

    Raises:
        ConfigurationError: one ended first, or ``timeout`` seconds passed.
    """
    deadline = time.monotonic() + timeout
    try:
        for service, proc, fd in started:
            readable, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            said = os.read(fd, 1) if readable else None
            if said == b"r":
                continue
            how = (f"did not serve within {timeout:g} s" if said is None else
                   f"ended (exit status {proc.wait()}) before it served")
            raise ConfigurationError(
                f"the {service} worker process {how}: run cantata worker "
                f"cantata.examples.orders.app:app --service {service} with the same --store "
                "and --broker to see why"
            )
    finally:
        for _, _, fd in started:
            with contextlib.suppress(OSError):
                os.close(fd)


async def _run(app: App, orders: int, *, serve: bool) -> tuple[Outcome, Outcome]:
    await app.open(serve=serve)
    try:
        with Progress(
            TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console,
        ) as progress:
            orchestrated = await _orchestrated(app, orders, progress)
            choreographed = await _choreographed(app, orders, progress)
    finally:
        await app.close()
    return orchestrated, choreographed


async def _orchestrated(app: App, orders: int, progress: Progress) -> Outcome:
    task = progress.add_task("orchestrated", total=orders)
    out = Outcome()
    t0 = time.perf_counter()
    handles = [
        await app.start("place_order", {"id": i, "items": 2}, idempotency_key=f"order-{i}")
        for i in range(1, orders + 1)
    ]

    async def follow(handle: object) -> None:
        from cantata.engine.handle import RunHandle

        assert isinstance(handle, RunHandle)
        try:
            await handle.result(timeout=120)
            out.shipped += 1
        except WorkflowError as exc:
            if exc.status == "compensated":
                out.compensated += 1
                out.examples.append(handle.run_id)
            else:
                out.other += 1
        progress.advance(task)

    await asyncio.gather(*(follow(h) for h in handles))
    out.seconds = time.perf_counter() - t0
    return out


async def _choreographed(app: App, orders: int, progress: Progress) -> Outcome:
    task = progress.add_task("choreographed", total=orders)
    out = Outcome()
    t0 = time.perf_counter()
    since = time.time()
    placed = {}
    for i in range(1, orders + 1):
        ev = await app.publish("order.placed", {"order_id": i}, subject=f"order-{i}")
        placed[i] = ev.correlation_id
    done: set[int] = set()
    deadline = time.monotonic() + 120
    while len(done) < orders and time.monotonic() < deadline:
        for kind in ("shipment.created", "order.cancelled"):
            events = await app.store.find_events(
                app.name, kind, since=since, exclude=(), limit=orders * 2
            )
            for ev in events:
                oid = ev.data["order_id"]
                if oid in done:
                    continue
                done.add(oid)
                if kind == "shipment.created":
                    out.shipped += 1
                else:
                    out.compensated += 1
                    out.examples.append(placed[oid] or "")
                progress.advance(task)
        if len(done) < orders:
            await asyncio.sleep(0.05)
    out.other = orders - len(done)
    out.seconds = time.perf_counter() - t0
    return out
