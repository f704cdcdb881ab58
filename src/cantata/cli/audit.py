"""``cantata audit verify``: check an app's hash-chained audit log for tampering."""

from __future__ import annotations

import os

import typer

from cantata.errors import CantataError, ConfigurationError
from cantata.model.records import AuditReport
from cantata.store.factory import mask_url

from .common import client_app, console, existing_store, run, store_url
from .runs import AppOpt, StoreOpt


class AuditTampered(CantataError):
    """``cantata audit verify`` found a changed, rewritten or missing audit record."""


def register(cli: typer.Typer) -> None:
    audit = typer.Typer(help="The audit log: verify its hash chain.", no_args_is_help=True)
    audit.command("verify")(verify)
    cli.add_typer(audit, name="audit")


def verify(app: AppOpt = None, store: StoreOpt = None) -> None:
    """Recompute the audit log's hash chain; exit 1 if a record was tampered with.

    Without --app (and $CANTATA_APP), the store's only app is verified.
    """

    async def go() -> tuple[str, AuditReport]:
        if app or os.environ.get("CANTATA_APP"):
            the_app = client_app(app, store)
            async with the_app.client():
                return the_app.name, await the_app.store.verify_audit(the_app.name)
        url = store_url(store)
        s = existing_store(url)
        await s.open()
        try:
            names = await s.apps()
            if len(names) != 1:
                held = f"apps {', '.join(names)}" if names else "no app"
                raise ConfigurationError(
                    f"store {mask_url(url)} holds {held}: pass --app NAME (or set CANTATA_APP)"
                )
            return names[0], await s.verify_audit(names[0])
        finally:
            await s.close()

    name, report = run(go)
    if not report.ok:
        where = "" if report.first_bad_seq is None else f" at record #{report.first_bad_seq}"
        raise AuditTampered(
            f"audit log of app {name}: TAMPERED{where}: {report.reason} "
            f"({report.records} records verified before it)"
        )
    console.print(f"audit log of app {name}: {report.records} records, chain intact")
