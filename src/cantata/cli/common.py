"""What every CLI command shares: loading APP, opening a client, printing."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import json
import math
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cantata.app import DEFAULT_STORE, App
from cantata.broker import binding
from cantata.broker.factory import broker_from_url
from cantata.errors import AmbiguousRunId, ConfigurationError, RunNotFound
from cantata.model import secrets
from cantata.model.checks import check_run_id
from cantata.model.records import RunRecord, utc_datetime
from cantata.store.base import Store
from cantata.store.factory import mask_url, store_from_url

T = TypeVar("T")


# Where a command's store comes from, in order (an App that names its store keeps it
# whatever $CANTATA_STORE says: code wins over the environment).
STORE_HELP = ("Store URL (default: the app's own store when {app} is a module:attribute "
              "whose App names one, else $CANTATA_STORE, else " + DEFAULT_STORE + ").")
BROKER_HELP = ("Broker URL to publish or redeliver through (default: the app's own broker "
               "when {app} is a module:attribute whose App names one, else "
               "$CANTATA_BROKER, else embedded); it must be the one the app's workers use.")


class UnknownApp(ConfigurationError):
    """``--app`` names an app the store has never seen."""

    code = "unknown_app"

class _Console(Console):
    """A console that never wraps a message (text alone: ``str`` or ``Text``). To a pipe
    or a log file Rich wraps at 80 columns, which cut a URL, an id or a JSON value in
    two for grep and scripts; a terminal wraps a long line itself. Tables and trees
    (renderables) still fit the terminal's width."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if "soft_wrap" not in kwargs and all(isinstance(o, str | Text) for o in objects):
            kwargs["soft_wrap"] = True
        super().print(*objects, **kwargs)


console = _Console(highlight=False)
err_console = _Console(stderr=True, highlight=False)


def load_app(spec: str) -> App:
    """Import ``module:attribute`` (from the current folder too) and return the App.

    Raises:
        ConfigurationError: the spec is malformed, the module or attribute is missing, or
            the attribute is not an ``App``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(
            f"APP must be 'module:attribute' (for example 'shop.app:app'), got {spec!r}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    found = f"module {module_name!r} was found, but importing it failed"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and missing != module_name and not module_name.startswith(missing + "."):
            # the module is there: something it imports is not
            raise ConfigurationError(
                f"{found}: {exc}: install what it imports, in the environment cantata runs in"
            ) from exc
        raise ConfigurationError(
            f"cannot import module {module_name!r} ({exc}); run from the folder that holds it "
            "or install it"
        ) from None
    except Exception as exc:  # the user's module raised while it was imported
        raise ConfigurationError(f"{found}: {_failure(exc)}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            apps = sorted(f"{module_name}:{name}" for name, value in vars(module).items()
                          if isinstance(value, App))
            here = f"here: {', '.join(apps)}" if apps else "for example 'shop.app:app'"
            raise ConfigurationError(
                f"module {module_name!r} has no attribute {attr!r}: APP is module:attribute "
                f"naming the cantata.App ({here})"
            )
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, App):
        try:
            obj = obj()
        except Exception as exc:  # the user's factory raised
            raise ConfigurationError(
                f"{spec} is a factory, and calling it failed: {_failure(exc)}") from exc
    if not isinstance(obj, App):
        raise ConfigurationError(
            f"{spec!r} is a {type(obj).__name__}, not a cantata.App"
        )
    return obj


def _failure(exc: Exception) -> str:
    """An exception the user's code raised, in one line, with where to see more."""
    return f"{type(exc).__name__}: {secrets.mask(str(exc))} (rerun with --debug for the traceback)"


def store_url(store: str | None) -> str:
    """The store URL a command uses: ``--store``, else ``$CANTATA_STORE``, else the
    default; an empty one is an error, not the default.

    Raises:
        ConfigurationError: ``--store`` or ``$CANTATA_STORE`` is empty.
    """
    if store is not None:
        if not store.strip():
            raise ConfigurationError(
                "--store is empty: give a store URL such as sqlite:///cantata.db or "
                "postgresql://user@host/db"
            )
        return store
    env = os.environ.get("CANTATA_STORE")
    if env is not None and not env.strip():
        raise ConfigurationError(
            "CANTATA_STORE is set but empty: unset it or give a store URL such as "
            "sqlite:///cantata.db"
        )
    return env or DEFAULT_STORE


def existing_store(url: str) -> Store:
    """The store a command that reads or operates one uses: a SQLite file or a
    PostgreSQL schema must exist already (a typo in a URL must not create a new, empty
    store; only workers, ``App(...)`` and ``cantata demo`` create one)."""
    return store_from_url(url, create=False)


def use_existing_store(app: App, store: str | None) -> None:
    """Point an imported app at ``--store`` (else its own URL), which must exist (see
    :func:`existing_store`); a store object made in code is kept."""
    url = store_url(store) if store is not None else app._store_spec
    if isinstance(url, str):
        app.configure(store=existing_store(url))


def app_option(app: str | None) -> str | None:
    """``--app``, else ``$CANTATA_APP`` (``None``: neither); an empty ``--app`` is an
    error, as an empty ``--store`` is, not the store's only app.

    Raises:
        ConfigurationError: ``--app`` is empty.
    """
    if app is not None and not app.strip():
        raise ConfigurationError(
            "--app is empty: give the app's name or its module:attribute, or leave --app "
            "out when the store holds one app"
        )
    return app or os.environ.get("CANTATA_APP")


def client_app(app: str | None, store: str | None, broker: str | None = None) -> App:
    """The app a query command works on.

    ``app`` is either ``module:attribute`` (the user's App is imported) or just the
    app's name (a bare App is enough to read the store); ``store`` overrides the URL.
    The store must exist (see :func:`existing_store`), and an app given by name must be
    one it holds (see :func:`known_app`). Without an app (nor ``$CANTATA_APP``), the
    store's only app. ``broker`` (``--broker``) overrides the app's own broker (else
    ``$CANTATA_BROKER``, else ``embedded``).
    """
    spec = app_option(app)
    if broker is not None and not broker.strip():
        raise ConfigurationError(
            "--broker is empty: give a broker URL such as embedded or nats://host:4222"
        )
    if not spec:
        url = store_url(store)
        spec = run(lambda: only_app(url))
    elif ":" not in spec:
        known_app(store_url(store), spec)
    if ":" in spec:
        loaded = load_app(spec)
        use_existing_store(loaded, store)
    else:
        loaded = App(spec, store=existing_store(store_url(store)))
    if broker is not None:
        loaded.configure(broker=broker)
    return loaded


def check_broker(app: App, *, publishing: bool = False) -> None:
    """Refuse to redeliver (or publish) through another broker than the one the app's
    workers take its events through (:func:`cantata.broker.binding.check`), before the
    app opens: a refused broker is never connected to (nor a NATS stream made in a
    name space no worker reads). The store is read through a store of its own, made
    from its URL.

    Raises:
        BrokerMismatch: naming the workers' broker.
    """
    store_spec, broker_spec = app._store_spec, app._broker_spec
    url = store_spec if isinstance(store_spec, str) else getattr(store_spec, "url", None)
    if not isinstance(url, str):
        return
    # built, not opened
    broker = broker_from_url(broker_spec) if isinstance(broker_spec, str) else broker_spec

    async def go() -> None:
        store = existing_store(url)
        await store.open()
        try:
            await binding.check(store, app.name, broker, publishing=publishing)
        finally:
            await store.close()

    run(go)


def refuse_options_before(ctx: Any, group: str) -> None:
    """Refuse the options of ``cantata GROUP`` typed before its subcommand: the
    subcommand takes its own, so they would be ignored (another store, no JSON). One
    line names them and says where they go. (Typer has its own copy of click's
    ``ParameterSource``: the member is told by its name, as main.py tells Typer's
    exceptions.)"""
    given = [param.opts[0] for param in ctx.command.params
             if getattr(ctx.get_parameter_source(param.name), "name", None) == "COMMANDLINE"]
    if given:
        sub = ctx.invoked_subcommand
        raise ConfigurationError(
            f"{' and '.join(given)} before `{sub}` would be ignored: give the options of "
            f"`cantata {group} {sub}` after it (see cantata {group} {sub} --help)"
        )


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine function to completion."""

    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def parse_json(text: str, what: str) -> Any:
    """Parse a JSON option value, with a message naming the option.

    Numbers are read as written: an integer stays an integer whatever its size (orjson
    would read one beyond 64 bits as a float, silently), so the library refuses one it
    cannot store as it refuses it from code and over HTTP (``SerializationError``).
    ``NaN`` and ``Infinity`` are not JSON.
    """

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    try:
        return json.loads(text, parse_constant=no_constant)
    except ValueError as exc:  # JSONDecodeError, or an integer of over 4300 digits
        raise ConfigurationError(f"{what} is not valid JSON ({exc}): {text[:80]!r}") from None


def parse_duration(text: str, what: str = "--older-than") -> float:
    """``90``, ``90s``, ``5m``, ``2h``, ``1d`` → seconds (a finite number >= 0).

    Raises:
        ConfigurationError: naming ``what`` (the option): not a number, NaN, infinite
            or negative.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        seconds = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigurationError(
            f"{what} {text!r} is invalid: give a duration >= 0, in seconds or as a number "
            "with s, m, h or d ('90', '90s', '5m')"
        )
    return seconds


# Times in tables and messages are UTC, as in traces and the console, whatever the
# machine's zone: a column says "(UTC)" in its header, a time in a line ends in "UTC".


def _utc(ts: float) -> dt.datetime:
    return utc_datetime(ts)  # (a time no date can hold shows as the latest: records.py)


def fmt_time(ts: float | None) -> str:
    """``14:36:45.123``: the UTC time of day (for a column headed "(UTC)")."""
    return "-" if ts is None else _utc(ts).strftime("%H:%M:%S.%f")[:-3]


def fmt_date(ts: float | None) -> str:
    """``2026-12-03 14:36:45``: the UTC date and time (for a column headed "(UTC)")."""
    return "-" if ts is None else _utc(ts).strftime("%Y-%m-%d %H:%M:%S")


def fmt_stamp(ts: float | None) -> str:
    """``2026-12-03 14:36:45.123 UTC``: a UTC time in a line of text."""
    return "-" if ts is None else _utc(ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"


def demo_db_path() -> Path:
    return Path.cwd() / "cantata-demo.db"


def operator() -> str:
    """Who is acting, for the audit log: ``cli:user@host``."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


async def store_apps(url: str) -> list[str]:
    """The names of the apps an existing store holds (see :func:`existing_store`)."""
    s = existing_store(url)
    await s.open()
    try:
        return await s.apps()
    finally:
        await s.close()


def held(names: list[str]) -> str:
    """``apps a, b`` or ``no app``: what a store holds, for messages."""
    return f"app{'s' if len(names) > 1 else ''} {', '.join(names)}" if names else "no app"


async def only_app(url: str) -> str:
    """The name of the one app a store holds.

    Raises:
        ConfigurationError: it holds none or several (named), so --app is needed.
    """
    names = await store_apps(url)
    if len(names) != 1:
        raise ConfigurationError(
            f"which app? store {mask_url(url)} holds {held(names)}: pass --app NAME (or set "
            "CANTATA_APP)"
        )
    return names[0]


def known_app(url: str, name: str) -> None:
    """Refuse an app name the store has never seen (no run, event, declaration, worker
    or audit record of it): a typo is an error, not an empty answer.

    Raises:
        UnknownApp: the store does not hold ``name`` (the message names those it holds).
    """
    names = run(lambda: store_apps(url))
    if name not in names:
        raise UnknownApp(
            f"store {mask_url(url)} holds no app {name!r} (it holds {held(names)}): check "
            "--app or CANTATA_APP"
        )


async def resolve_run(app: App, ref: str | None, key: str | None = None) -> RunRecord:
    """The run a CLI argument names: a full id, a unique id prefix, or ``--key``.

    Raises:
        ConfigurationError: neither or both given.
        RunNotFound: nothing matches.
        AmbiguousRunId: the prefix matches several runs (they are listed).
    """
    store, name = app.store, app.name
    if key is not None:
        if ref:
            raise ConfigurationError("give a run id or --key KEY, not both")
        found = await store.find_runs(name, idempotency_key=key, limit=1)
        if not found:
            raise RunNotFound(f"no run with idempotency key {key!r} in app {name!r}")
        return found[0]
    if not ref:
        raise ConfigurationError("which run? give its id (or a unique start of it) or --key KEY")
    # an argument that is not UTF-8 (a lone surrogate) is no run's id, as App's lookups say
    check_run_id(ref)
    run_rec = await store.get_run(name, ref)
    if run_rec is not None:
        return run_rec
    found = await store.runs_by_prefix(name, ref, limit=MAX_CANDIDATES + 1)
    if not found:
        raise RunNotFound(
            f"no run {ref!r} in app {name!r} (neither an id nor the start of one); list them "
            "with `cantata runs`"
        )
    if len(found) > 1:
        more = len(found) > MAX_CANDIDATES
        shown = ", ".join(f"{r.run_id} ({r.workflow}, {r.status})" for r in found[:MAX_CANDIDATES])
        raise AmbiguousRunId(
            f"id prefix {ref!r} matches {'more than ' if more else ''}"
            f"{min(len(found), MAX_CANDIDATES)} runs of app {name!r}: {shown}"
            f"{', ...' if more else ''}; give more of the id"
        )
    return found[0]


MAX_CANDIDATES = 10


async def check_known(app: App, kind: str, name: str, option: str) -> None:
    """Refuse a workflow (``kind`` ``"workflow"``) or a handler group (``"handler"``)
    that the app's code does not have and no process of the app ever declared: a
    filter that names one is a typo, an error rather than an empty answer. Called
    when the filter found nothing (a name that found something is known).

    Raises:
        ConfigurationError: naming the known ones, and ``option``.
    """
    if kind == "handler":  # (as GET /api/dead-letters?group= answers it)
        problem = await app._unknown_group(name)
        if problem is not None:
            raise ConfigurationError(f"{problem}: check {option}")
        return
    known = await app._workflow_names()
    if name in known:
        return
    raise ConfigurationError(
        f"no workflow {name!r} in app {app.name!r} (known: {', '.join(known) or 'none'}"
        f"): check {option}"
    )


def iso(ts: float | None) -> str | None:
    """POSIX seconds as RFC 3339 UTC (``None`` stays ``None``)."""
    if ts is None:
        return None
    return utc_datetime(ts).isoformat().replace("+00:00", "Z")


def print_line(text: str) -> None:
    """Write one line to stdout as it is: never read as Rich markup, never wrapped (ids
    and values a script reads)."""
    sys.stdout.write(text + "\n")


def say(text: str) -> None:
    """Print a message holding user data (names, ids, paths, errors): as plain text,
    never read as Rich markup."""
    console.print(Text(text))


def print_json(value: Any) -> None:
    """Write ``value`` as indented JSON to stdout (no markup, no wrapping); a pydantic
    model of the HTTP API (:mod:`cantata.server.models`), or a list of them, as the API
    answers it."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def table(title: str, *columns: str, ids: tuple[str, ...] = ("run id", "id")) -> Table:
    """A table whose cells fold instead of being cut; the ``ids`` columns never wrap
    (see :func:`show`), so an id prints whole, ready to copy."""
    t = Table(title=title)
    for col in columns:
        t.add_column(col, overflow="fold", no_wrap=col in ids)
    return t


def show(t: Table) -> None:
    """Print a :func:`table`: its id columns as wide as their longest id, the other
    columns folded into what is left of the terminal.

    Not to a terminal (a pipe, a file, a log) and without ``$COLUMNS``, every value is
    printed whole, each row on one line, however wide that makes it (as ``ps -ww``
    does): Rich would fold the table into 80 columns there, cutting an error or a key
    into pieces that ``grep``, ``cut`` and ``awk`` cannot read. ``$COLUMNS`` sets the
    width, as in a terminal."""
    for col in t.columns:
        if col.no_wrap:
            widths = [Text.from_markup(c).cell_len if isinstance(c, str) else
                      c.cell_len if isinstance(c, Text) else 0 for c in col.cells]
            col.min_width = max([len(str(col.header)), *widths])
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        console.print(t)
        return
    for col in t.columns:
        col.no_wrap = True
    t.title_justify = "left"  # (not centred in a line of hundreds of columns)
    natural = console.measure(t, options=console.options.update_width(1 << 20)).maximum
    whole = Console(width=max(natural, 1), highlight=False, color_system=None,
                    force_terminal=False)
    with whole.capture() as out:
        whole.print(t)
    file = console.file  # (sys.stdout as it is now)
    file.write("".join(line.rstrip() + "\n" for line in out.get().splitlines()))
    file.flush()
