"""``cantata worker APP``: serve an app's workflows and handlers, in one process or in
``--processes N`` under a supervisor (:mod:`cantata.supervisor`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import Annotated

import typer
from rich.markup import escape

from cantata.app import App
from cantata.errors import ConfigurationError, StoreUpgraded
from cantata.observability import logs
from cantata.store.factory import mask_url
from cantata.supervisor import FORCE_SIGNAL, Supervisor, die_with_parent, notify_ready
from cantata.supervisor.parent import CUT_SHORT, STORE_UPGRADED

from .common import STORE_HELP, console, existing_store, load_app, say, store_url

# Stores several processes can share (docs/guide.md: "several processes may share" a
# SQLite file; PostgreSQL is the distributed store). Others run one process unless asked.
SHARED_SCHEMES = ("sqlite", "postgresql", "postgres")


def register(cli: typer.Typer) -> None:
    cli.command("worker")(worker)


def worker(
    app: Annotated[str, typer.Argument(help="The app, as module:attribute.")],
    store: Annotated[
        str | None, typer.Option("--store", help=STORE_HELP.format(app="APP"))
    ] = None,
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
    max_runs: Annotated[
        int | None,
        typer.Option(
            "--max-runs", min=1,
            help="Runs in progress in each worker process at most; runs that only wait "
            "do not count (default: the app's max_runs, none).",
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes", min=1, envvar="CANTATA_PROCESSES", callback=_processes_cap,
            help="Worker processes under one supervisor that restarts a dead one "
            "(default: $CANTATA_PROCESSES, else the number of cores; 1: this process "
            "serves, no supervisor; memory:// always runs one).",
        ),
    ] = None,
    child_of: Annotated[int | None, typer.Option("--child-of", hidden=True)] = None,
    ready_fd: Annotated[int | None, typer.Option("--ready-fd", hidden=True)] = None,
) -> None:
    """Run a worker: resume unfinished runs, execute new ones, handle events.

    Every logger's records (the app's own too) go to stderr at --log-level; those
    logged inside a step or handler carry its run id, step and attempt (or event id
    and group).
    """
    if child_of is not None:  # started by a supervisor: never outlive it
        die_with_parent(child_of)
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
        check_services(the_app, service)
        the_app.services = frozenset(service)
    if grace is not None:
        the_app.shutdown_grace = grace
    if any_version:
        the_app.any_version = True
    if max_runs is not None:
        the_app.max_runs = max_runs
    count, note = process_count(the_app, processes)
    if note:
        say(note)
    if count > 1:
        passed = [*(["--store", store] if store is not None else []),
                  *(["--broker", broker] if broker else []),
                  *[x for s in service or [] for x in ("--service", s)],
                  "--log-level", log_level, "--log-format", log_format,
                  *(["--grace", repr(grace)] if grace is not None else []),
                  *(["--any-version"] if any_version else []),
                  *(["--max-runs", str(max_runs)] if max_runs is not None else [])]
        raise typer.Exit(supervise(the_app, app, passed, count))
    try:
        cut_short, unstored = serve(the_app, ready_fd, supervised=child_of is not None)
    except StoreUpgraded as exc:
        # A newer Cantata migrated the store (before the start, or under this worker,
        # which then drained): a status of its own, which a supervisor does not restart.
        print(f"cantata: error: {exc}", file=sys.stderr)
        raise typer.Exit(STORE_UPGRADED) from None
    if cut_short:
        console.print(cut_short_message(the_app, cut_short, unstored), soft_wrap=True)
        raise typer.Exit(CUT_SHORT)


def cut_short_message(app: App, cut_short: int, unstored: int) -> str:
    """Why a stop was cut short (exit status 3), and what to do: the grace ran out on
    steps and handlers still running, or the store could not be reached to store what
    finished (``unstored`` of the ``cut_short``: shutdown.release, the consumer)."""
    grace = f"{app.shutdown_grace:g} s"
    store = app.backends[0]  # (the app is closed: its URL, or the store object's)
    url = mask_url(store if isinstance(store, str) else store.url)
    parts = []
    if cut_short > unstored:
        parts.append(
            f"{cut_short - unstored} step(s) or handler(s) did not finish within the grace "
            f"({grace}, --grace) and were released to the other workers, which run them "
            "again: give a longer --grace (or App(shutdown_grace=...)) to let such work "
            "finish on a stop")
    if unstored:
        parts.append(
            f"the store ({escape(url)}) could not be reached to store the results of "
            f"{unstored} run(s)' steps or handler(s) that had finished (the stop waited for "
            f"it through the grace, {grace}), so other workers run "
            "them again: check that the store is up and reachable from this worker (see "
            "the warnings above)")
    return f"stopped: {'; '.join(parts)} (exit status {CUT_SHORT})"


def known_services(app: App) -> list[str]:
    """The services ``--service`` may name: those the app's workflows, steps and
    handlers declare, and its handler groups (a worker serving a group's name runs its
    handlers)."""
    router = app.router
    names = {w.service for w in router.workflows.values()}
    names |= {s.service for s in router.steps.values()}
    for h in router.handlers:
        names |= {h.service, h.group}
    return sorted(n for n in names if n)


def check_services(app: App, wanted: list[str]) -> None:
    """Refuse a ``--service`` the app does not declare: such a worker would serve
    nothing of it, and what waits for that service would wait for ever.

    Raises:
        ConfigurationError: a service is unknown (the message names the known ones).
    """
    known = known_services(app)
    unknown = sorted(set(wanted) - set(known))
    if not unknown:
        return
    names = ", ".join(repr(n) for n in unknown)
    has = (f"its services are {', '.join(known)}" if known else
           "it declares no service: leave --service out to serve all of it")
    raise ConfigurationError(
        f"app {app.name!r} has no service {names}: {has} (see @app.workflow(service=...), "
        "@app.step(service=...) and the groups of @app.on)"
    )


def cores() -> int:
    """The cores this process may run on."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# The most worker processes one supervisor runs: each is a whole Python process with
# its own store connections, so thousands would only exhaust memory and the store's
# connections (run more `cantata worker` commands, on more hosts, instead).
MAX_PROCESSES = 256
# Past this many per core, more processes mostly add contention (a warning).
PER_CORE = 4


def check_processes(requested: int | None) -> None:
    """Refuse a ``--processes`` above :data:`MAX_PROCESSES`.

    Raises:
        ConfigurationError: naming the value and the cap.
    """
    if requested is not None and requested > MAX_PROCESSES:
        raise ConfigurationError(
            f"{requested} worker processes are too many: one cantata worker runs at most "
            f"{MAX_PROCESSES} (each is a whole Python process with its own store "
            "connections); run several cantata worker commands, on more hosts, for more"
        )


def _processes_cap(value: int | None) -> int | None:
    """``--processes``' check: a usage error (exit 2) before the app is imported."""
    try:
        check_processes(value)
    except ConfigurationError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def process_count(app: App, requested: int | None) -> tuple[int, str | None]:
    """How many worker processes to run, and the line to print about it: why one, when
    more were asked or would be the default; a warning, when more than
    :data:`PER_CORE` per core were asked.

    Raises:
        ConfigurationError: more than :data:`MAX_PROCESSES` were asked.
    """
    check_processes(requested)
    wanted = requested if requested is not None else cores()
    if wanted == 1:
        return 1, None
    store, broker = app._store_spec, app._broker_spec
    if not isinstance(store, str) or not isinstance(broker, str):
        return 1, ("one worker process: the app's store or broker is an object made in "
                   "code, which other processes cannot share (give it as a URL)")
    scheme = store.split("://", 1)[0].lower()
    path = store.split("://", 1)[-1].partition("?")[0]
    if scheme == "memory" or (scheme == "sqlite" and path.strip("/") == ":memory:"):
        return 1, (f"one worker process: the store {mask_url(store)} lives inside one "
                   "process")
    if scheme not in SHARED_SCHEMES and requested is None:
        return 1, (f"one worker process: {scheme}:// stores are not known to be shared "
                   "safely by several processes (--processes N runs N anyway)")
    have = cores()
    if wanted > PER_CORE * have:
        return wanted, (f"warning: {wanted} worker processes on {have} cores (more than "
                        f"{PER_CORE} per core mostly adds contention for the cores and the "
                        "store; a step that waits on I/O does not need a process of its own)")
    return wanted, None


def supervise(app: App, spec: str, passed: list[str], count: int) -> int:
    """Run ``count`` worker processes of ``spec`` until a signal stops them; the exit
    code (0: every one drained cleanly; 3: work was released past the grace)."""

    def command(parent: int, fd: int) -> list[str]:
        return [sys.executable, "-m", "cantata", "worker", spec, *passed, "--processes",
                "1", "--child-of", str(parent), "--ready-fd", str(fd)]

    def on_ready(pids: list[int]) -> None:
        console.print(
            f"cantata supervisor {os.getpid()}: {len(pids)} worker processes of app "
            f"[bold]{escape(app.name)}[/] on {escape(mask_url(str(app._store_spec)))}, pids "
            f"{', '.join(map(str, pids))}; a worker process that dies is restarted",
            soft_wrap=True,
        )

    def on_stop(pids: list[int]) -> None:
        console.print(
            f"stopping: worker processes {', '.join(map(str, pids))} get up to "
            f"{app.shutdown_grace:g} s to finish (a second signal stops them at once)",
            soft_wrap=True,
        )

    url = str(app._store_spec)

    async def on_gone(worker_id: str) -> None:
        # The child's process has ended: its worker is gone. Forgetting it (what a
        # worker does itself on a clean stop) lets the others take its runs,
        # deliveries, tasks and slots now rather than when its lease runs out; the
        # attempts it was in count as WorkerLost when they are taken, as after a lease.
        store = existing_store(url)
        try:
            await store.open()
            await store.remove_worker(app.name, worker_id)
        finally:
            with contextlib.suppress(Exception):
                await store.close()

    supervisor = Supervisor(command, count, on_ready=on_ready, on_stop=on_stop,
                            on_gone=on_gone)
    code = asyncio.run(supervisor.run())
    console.print(f"cantata supervisor {os.getpid()}: every worker process has ended",
                  soft_wrap=True)
    if code == STORE_UPGRADED:
        print(
            f"cantata: error: the store {mask_url(str(app._store_spec))} was upgraded by a "
            "newer Cantata (see the worker processes' messages above): restart cantata "
            f"worker with the new release (exit status {STORE_UPGRADED})",
            file=sys.stderr,
        )
    return code


def serve(
    the_app: App, ready_fd: int | None, *, supervised: bool = False
) -> tuple[int, int]:
    """Serve in this process until SIGTERM or SIGINT (a second one forces the stop);
    the number of steps and handlers the stop cut short, and of those the number whose
    results the store could not take (the rest: released past the grace).

    Raises:
        StoreUpgraded: the store's schema is newer than this code (at the start; or a
            newer Cantata migrated it while this worker served: it stopped gracefully).

    Under a supervisor only its FORCE_SIGNAL forces: a second SIGTERM may be the
    service manager's own, sent to every process besides the supervisor's
    (cantata.supervisor.parent).
    """

    async def main() -> tuple[int, int]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        forcing: list[asyncio.Task[None]] = []

        async def keep_forcing() -> None:
            # force_stop() acts on a stop under way: one that has not begun yet (the
            # signals came close together) is forced as soon as it begins.
            while True:
                the_app.force_stop()
                await asyncio.sleep(0.05)

        def force() -> None:
            console.print("second signal: releasing what still runs now")
            if not forcing:
                forcing.append(asyncio.ensure_future(keep_forcing()))

        def on_signal() -> None:
            # The first signal stops gracefully; a second one releases everything now.
            if stop.is_set() and not supervised:
                force()
            stop.set()

        def on_force() -> None:
            stop.set()
            force()

        if supervised:
            loop.add_signal_handler(FORCE_SIGNAL, on_force)

            def on_os_signal(signum: int, frame: object) -> None:
                # A plain handler, not the loop's: closing the loop resets the signals
                # it handles to their default (SIGTERM: die), and a SIGTERM landing
                # then (the service manager's and the supervisor's come close
                # together; an idle child ends at once) killed a child that had
                # drained. This one outlives the loop and ignores what comes after it.
                if not loop.is_closed():
                    loop.call_soon_threadsafe(on_signal)

            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, on_os_signal)
        else:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, on_signal)
        async with the_app:
            engine = the_app.engine
            console.print(
                f"cantata worker {the_app.engine.worker_id} serving app "
                f"[bold]{escape(the_app.name)}[/] ({len(the_app.workflows)} workflows, "
                f"{len(the_app.handlers)} handlers, version {escape(str(the_app.version))}) "
                f"on {escape(mask_url(the_app.store.url))}"
            )
            notify_ready(ready_fd, engine.worker_id)
            # A signal, or the store upgraded under this worker by a newer Cantata
            # (engine.store_upgraded): both stop gracefully.
            upgraded = asyncio.ensure_future(engine.must_stop.wait())
            upgraded.add_done_callback(lambda _: stop.set())
            try:
                await stop.wait()
            finally:
                upgraded.cancel()
            why = "the store was upgraded by a newer Cantata: " if engine.upgraded else ""
            console.print(
                f"stopping: {why}steps and handlers in progress get up to "
                f"{the_app.shutdown_grace:g} s to finish (a second signal stops at once); "
                "what is left is released to the other workers"
            )
        for task in forcing:
            task.cancel()
        if engine.upgraded is not None:
            raise engine.upgraded
        return engine.cut_short, engine.unstored

    try:
        return asyncio.run(main())
    finally:
        if supervised:
            # ... and the interpreter's exit resets Python's handlers to the default, not
            # an ignored signal: from here on, SIGTERM and SIGINT no longer concern this
            # child.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
