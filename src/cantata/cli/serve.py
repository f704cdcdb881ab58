"""``cantata serve`` (the operator console) and ``cantata token create|list|revoke``."""

from __future__ import annotations

import datetime as dt
import errno
import re
import socket
import sys
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from cantata.app import App
from cantata.errors import ConfigurationError, TokenNotFound
from cantata.model.access import Role, TokenRecord
from cantata.store import audit as audit_chain
from cantata.store.audit import AuditKey
from cantata.store.base import Store
from cantata.store.factory import mask_url

from .audit import env_audit_key
from .common import (
    BROKER_HELP,
    STORE_HELP,
    app_option,
    console,
    err_console,
    existing_store,
    iso,
    known_app,
    load_app,
    operator,
    print_json,
    run,
    store_apps,
    store_url,
)

_TOKEN_NAME = re.compile(r"^[A-Za-z0-9_.@\-]{1,64}$")

StoreOpt = Annotated[
    str | None, typer.Option("--store", help=STORE_HELP.format(app="APP (or --app)"))
]
token_cli = typer.Typer(help="API tokens of the console (cantata serve).",
                        no_args_is_help=True)


def register(cli: typer.Typer) -> None:
    cli.command("serve")(serve)
    cli.add_typer(token_cli, name="token")


def _serve_app(spec: str | None, app_name: str | None, store: str | None,
               broker: str | None = None) -> tuple[App, str]:
    """The app to serve (see :func:`_app_to_serve`) on ``--broker`` when given (else
    its own broker, else ``$CANTATA_BROKER``, else embedded), and its store as shown."""
    the_app, shown = _app_to_serve(spec, app_name, store)
    if broker is not None:
        if not broker.strip():
            raise ConfigurationError(
                "--broker is empty: give a broker URL such as embedded or nats://host:4222"
            )
        the_app.configure(broker=broker)
    return the_app, shown


def _app_to_serve(spec: str | None, app_name: str | None, store: str | None
                  ) -> tuple[App, str]:
    """The app to serve, its code (``module:attribute``) or just its name and store, and
    the store as the banner shows it. The store must exist and hold the app (a typo
    is an error, not an empty console). APP and ``--app`` together must name the same
    app (its ``module:attribute`` or its name): one would be ignored otherwise."""
    if spec and app_name and app_name != spec and ":" not in spec:
        raise ConfigurationError(f"APP {spec} and --app {app_name} differ: give one of them")
    given = app_name
    spec = spec or app_option(app_name)
    if spec and ":" in spec:
        loaded = load_app(spec)
        if given is not None and given not in (spec, loaded.name):
            raise ConfigurationError(
                f"APP {spec} is app {loaded.name!r} but --app names {given!r}: give one of "
                "them"
            )
        url = store_url(store) if store else loaded._store_spec
        if isinstance(url, str):
            loaded.configure(store=existing_store(url))
            return loaded, mask_url(url)
        return loaded, type(url).__name__
    url = store_url(store)
    if spec:
        known_app(url, spec)
        return App(spec, store=existing_store(url)), mask_url(url)
    names = run(lambda: store_apps(url))
    if len(names) == 1:
        return App(names[0], store=existing_store(url)), mask_url(url)
    found = f"it holds {', '.join(names)}" if names else "it holds no app yet"
    raise ConfigurationError(
        f"which app? pass module:attribute or --app NAME ({found} in {mask_url(url)})"
    )


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the server, before anything is printed.

    Raises:
        ConfigurationError: the port is in use, or the address cannot be listened on.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(
                f"port {port} on {host} is in use (another server listens there): choose "
                "another with --port"
            ) from None
        raise ConfigurationError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): check --host and --port"
        ) from None
    sock.set_inheritable(True)
    return sock


def serve(
    app: Annotated[
        str | None, typer.Argument(help="The app as module:attribute (optional: --app NAME "
                                        "serves it from the store alone).")
    ] = None,
    store: StoreOpt = None,
    app_name: Annotated[
        str | None, typer.Option("--app", help="App name (default: $CANTATA_APP, or the "
                                               "store's only app).")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535,
                          help="Port to listen on (0: one the system chooses, printed).")
    ] = 8080,
    broker: Annotated[
        str | None, typer.Option("--broker", help=BROKER_HELP.format(app="APP"))
    ] = None,
    stream_interval: Annotated[
        float, typer.Option("--stream-interval", min=0.05, max=60,
                            help="Seconds between looks for other processes' changes.")
    ] = 0.5,
) -> None:
    """Serve the HTTP API and the dashboard of one app (needs only its store)."""
    import uvicorn

    the_app, shown = _serve_app(app, app_name, store, broker)
    api = the_app.asgi(stream_interval=stream_interval)
    sock = _listen(host, port)
    port = sock.getsockname()[1]  # the one the system chose for --port 0
    # Open dashboards hold their event streams: stop waiting for them after a few seconds.
    config = uvicorn.Config(api, host=host, port=port, log_level="warning",
                            server_header=False, proxy_headers=False,
                            timeout_graceful_shutdown=3)

    async def main() -> None:
        # Opened here, before the banner: a store that cannot be opened is one line
        # and a non-zero exit, not a server's start-up traceback. The console needs
        # only the store: an unreachable broker is connected in the background (what
        # the console publishes waits in the outbox meanwhile).
        await the_app.open(serve=False)
        try:
            console.print(Text(
                f"cantata console of app {the_app.name} on http://{host}:{port}/ (store "
                f"{shown}); create a token with `cantata token create`"
            ))
            await uvicorn.Server(config).serve(sockets=[sock])
        finally:
            await the_app.close()

    try:
        run(main)
    finally:
        sock.close()


# -- tokens -----------------------------------------------------------------------------------


def _token_store(store: str | None, app: str | None) -> tuple[Store, AuditKey | None]:
    """The store the tokens are in, and the audit key its apps' chains are keyed with
    (``$CANTATA_AUDIT_KEY``, or the loaded app's own). The store must exist (tokens are
    made for a store that workers or an App created: a typo in the URL must not make a
    new one)."""
    if store:
        return existing_store(store_url(store)), env_audit_key()
    app = app_option(app)  # as every command that takes --app
    if app and ":" in app:
        the_app = load_app(app)
        spec = the_app._store_spec
        return (spec if not isinstance(spec, str) else existing_store(spec)), the_app.audit_key
    return existing_store(store_url(None)), env_audit_key()


async def _audited_apps(store: Store, key: AuditKey | None) -> list[str]:
    """The apps of ``store`` whose audit logs record a token created or revoked (a
    token opens each of them): those whose chain a record keyed with ``key`` (``None``:
    plain) may follow, judged by its last record: plain, or keyed with ``key`` or one
    of its previous keys (a rotation). A record written with another key than the
    chain's would make ``audit verify`` report the chain tampered, so an app whose
    chain this command cannot key is left out, with a warning saying how to record
    it there."""
    audited = []
    for name in await store.apps():
        head = await store.audit_head(name)
        if head is not None:
            last = await store.audit_records(name, after_seq=head[0] - 1, limit=1)
            if last and not audit_chain.may_follow(last[0], key):
                err_console.print(Text(
                    f"warning: not recorded in the audit log of app {name}: its chain is "
                    f"keyed with {'an' if key is None else 'another'} audit key; set "
                    "CANTATA_AUDIT_KEY to the key its app writes with (or pass --app "
                    "module:attribute of that app) to record it there", style="yellow"))
                continue
        if key is not None:
            store.set_audit_key(name, key)
        audited.append(name)
    return audited


AppOpt = Annotated[
    str | None, typer.Option("--app", help="module:attribute whose store to use (default: "
                                           "$CANTATA_APP; tokens belong to the store: they "
                                           "open each of its apps).")
]


@token_cli.command("create")
def token_create(
    name: Annotated[str, typer.Option("--name", help="Who or what uses it (audited as "
                                                     "token:NAME).")],
    role: Annotated[str, typer.Option("--role", help="viewer, operator or admin.")],
    store: StoreOpt = None,
    app: AppOpt = None,
) -> None:
    """Create a token and print it once (the store keeps only its hash)."""
    from cantata.server.auth import create_token

    if not _TOKEN_NAME.fullmatch(name):
        raise ConfigurationError(
            f"token name {name!r} is invalid: use 1-64 letters, digits, '_', '.', '@' or '-'")
    try:
        the_role = Role(role)
    except ValueError:
        raise ConfigurationError(
            f"role {role!r} is unknown: use {', '.join(r.value for r in Role)}") from None
    the_store, key = _token_store(store, app)

    async def go() -> str:
        await the_store.open()
        try:
            return await create_token(the_store, name, the_role, actor=operator(),
                                      apps=await _audited_apps(the_store, key))
        finally:
            await the_store.close()

    secret = run(go)
    sys.stdout.write(secret + "\n")
    err_console.print(Text(f"token {name} ({the_role}) created; it is shown this once, keep it "
                           "in a secret store"))


@token_cli.command("list")
def token_list(
    store: StoreOpt = None,
    app: AppOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON instead of a table: a list of {name, role, created_at, "
        "status, revoked_at}, times RFC 3339 UTC.")] = False,
) -> None:
    """List tokens: name, role, created, revoked (never the tokens themselves)."""
    the_store, _ = _token_store(store, app)

    async def go() -> list[TokenRecord]:
        await the_store.open()
        try:
            return await the_store.tokens()
        finally:
            await the_store.close()

    tokens = run(go)
    if as_json:
        print_json([token_out(t) for t in tokens])
        return
    table = Table(title="API tokens")
    for col in ("name", "role", "created", "status"):
        table.add_column(col)

    def when(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    for t in tokens:
        status = "active" if t.revoked_at is None else f"revoked {when(t.revoked_at)}"
        table.add_row(Text(t.name), str(t.role), when(t.created_at), status)
    console.print(table)


def token_out(t: TokenRecord) -> dict[str, str | None]:
    """A token as ``cantata token list --json`` prints it: what the table shows, times
    RFC 3339 UTC as the API prints them; never its hash (nor the secret, not stored)."""
    return {"name": t.name, "role": str(t.role), "created_at": iso(t.created_at),
            "status": "active" if t.revoked_at is None else "revoked",
            "revoked_at": iso(t.revoked_at)}


@token_cli.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    store: StoreOpt = None,
    app: AppOpt = None,
) -> None:
    """Revoke a token: requests carrying it get 401 from now on."""
    import time

    the_store, key = _token_store(store, app)

    async def go() -> bool:
        await the_store.open()
        try:
            return await the_store.revoke_token(name, time.time(), actor=operator(),
                                                apps=await _audited_apps(the_store, key))
        finally:
            await the_store.close()

    if not run(go):
        raise TokenNotFound(f"no active token named {name!r} (see `cantata token list`)")
    console.print(Text(f"token {name} revoked"))
