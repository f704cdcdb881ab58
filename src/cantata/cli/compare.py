"""``cantata compare APP SAGA``: one saga run both ways, measured side by side."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from .common import console, load_app, parse_json, print_json, run
from .compare_harness import ModeFigures, compare


def register(cli: typer.Typer) -> None:
    cli.command("compare")(compare_cmd)


def compare_cmd(
    app: Annotated[str, typer.Argument(help="The app, as module:attribute.")],
    saga: Annotated[str, typer.Argument(help="The name of a declarative Saga of the app.")],
    runs: Annotated[int, typer.Option("--runs", help="Runs per mode.")] = 200,
    fail_rate: Annotated[float, typer.Option(
        "--fail-rate", help="Share of runs in which one step (chosen at random) fails.")] = 0.1,
    input_json: Annotated[str, typer.Option(
        "--input", help="The saga's input, as JSON.")] = "{}",
    store: Annotated[str | None, typer.Option(
        "--store", help="Store kind to measure on (a fresh file or schema is used).")] = None,
    broker: Annotated[str | None, typer.Option(
        "--broker", help="Broker to measure on (a fresh namespace is used).")] = None,
    concurrency: Annotated[int, typer.Option(
        "--concurrency", help="Runs in flight at once.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the failure positions.")] = 1,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds allowed per run.")] = 60,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Run SAGA orchestrated and choreographed on fresh stores; print the figures."""
    application = load_app(app)
    data = parse_json(input_json, "--input")
    figures = run(lambda: compare(
        application, saga, runs=runs, fail_rate=fail_rate, data=data, store=store,
        broker=broker, concurrency=concurrency, seed=seed, timeout=timeout,
    ))
    if as_json:
        print_json([as_dict(f) for f in figures])
        return
    console.print(table(saga, figures))


def as_dict(f: ModeFigures) -> dict[str, Any]:
    """The figures of one mode as plain JSON."""
    return {
        "mode": f.mode, "runs": f.runs, "seconds": round(f.seconds, 3),
        "throughput_per_s": round(f.throughput, 1),
        "p50_ms": round(f.percentile(50) * 1000, 2), "p99_ms": round(f.percentile(99) * 1000, 2),
        "statuses": dict(f.statuses), "compensations": f.compensations,
        "compensation_orders": {" → ".join(k): v for k, v in f.orders.items()},
        "events_published": f.events, "store_writes": dict(f.writes),
        "store_writes_per_saga": round(f.writes_per_saga, 2),
        "broker_messages": f.deliveries, "broker_published": f.published,
        "service_down": f.stall,
    }


def table(saga: str, figures: list[ModeFigures]) -> Table:
    """The side-by-side table."""
    # Text cells and title: step and saga names are the user's, never read as markup.
    t = Table(title=Text(f"saga {saga}: {figures[0].runs} runs per mode"))
    t.add_column("")
    for f in figures:
        t.add_column(Text(f.mode), justify="right")

    def row(label: str, fn: Any) -> None:
        t.add_row(label, *(Text(fn(f)) for f in figures))

    row("throughput", lambda f: f"{f.throughput:.1f} sagas/s")
    row("p50 latency", lambda f: f"{f.percentile(50) * 1000:.1f} ms")
    row("p99 latency", lambda f: f"{f.percentile(99) * 1000:.1f} ms")
    row("events published", lambda f: f"{f.events} ({f.events / f.runs:.1f}/saga)")
    row("store writes per saga", lambda f: f"{f.writes_per_saga:.1f}")
    row("messages on the broker", lambda f: f"{f.deliveries} ({f.deliveries / f.runs:.1f}/saga)")
    row("outcomes", lambda f: ", ".join(f"{k} {v}" for k, v in sorted(f.statuses.items())))
    row("compensations run", lambda f: str(f.compensations))
    row("failures rolled back", lambda f: "\n".join(
        f"{' → '.join(k)}: {v}" for k, v in sorted(f.orders.items())) or "-")
    row("one service down", lambda f: "\n".join(f.stall))
    return t
