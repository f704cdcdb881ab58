"""``cantata audit verify|head``: check an app's audit log, export its signed head."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import orjson
import typer

from cantata.errors import CantataError, ConfigurationError
from cantata.model.records import AuditReport
from cantata.server.models import verify_out
from cantata.store import audit as chain
from cantata.store.base import Store

from .common import client_app, print_json, print_line, run, say
from .runs import AppOpt, JsonOpt, StoreOpt

T = TypeVar("T")

HeadOpt = Annotated[
    Path | None,
    typer.Option("--head", help="An exported head (cantata audit head) the log must still hold."),
]


class AuditTampered(CantataError):
    """``cantata audit verify`` found a changed, rewritten or missing audit record."""


def register(cli: typer.Typer) -> None:
    audit = typer.Typer(
        help="The audit log: verify its hash chain, export its signed head.",
        no_args_is_help=True,
    )
    audit.command("verify")(verify)
    audit.command("head")(head)
    cli.add_typer(audit, name="audit")


def env_audit_key(required: bool = False) -> chain.AuditKey | None:
    """``$CANTATA_AUDIT_KEY``, with ``$CANTATA_AUDIT_PREVIOUS_KEYS`` (the keys before a
    rotation), as a key (``None``: unset, unless ``required``)."""
    key = chain.key_from_env(os.environ)
    if key is None and required:
        raise ConfigurationError(
            "an exported head is signed with the audit key: set CANTATA_AUDIT_KEY to the "
            "key the app uses (App(audit_key=...))"
        )
    return key


def _with_store(
    app: str | None, store: str | None, use: Callable[[str, Store], Awaitable[T]]
) -> T:
    """Open the app's store and call ``use(app name, store)``; the app is the store's
    only one when neither --app nor $CANTATA_APP names it (see
    :func:`~cantata.cli.common.client_app`: the store and the app must exist)."""
    the_app = client_app(app, store)

    async def go() -> T:
        async with the_app.client():
            return await use(the_app.name, the_app.store)

    return run(go)


def verify(
    app: AppOpt = None, store: StoreOpt = None, head_file: HeadOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the audit log's hash chain; exit 1 if a record was tampered with.

    With $CANTATA_AUDIT_KEY the chain must be keyed with it (after a rotation, its
    older records with $CANTATA_AUDIT_PREVIOUS_KEYS, in order); with --head FILE the
    record that head names must still be there. Without --app (and $CANTATA_APP),
    the store's only app is verified. --json prints the report as GET /api/audit/verify
    answers it (a broken chain still exits 1).
    """
    key = env_audit_key(required=head_file is not None)
    doc = None
    if head_file is not None:
        try:
            doc = orjson.loads(head_file.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ConfigurationError(f"cannot read the head file {head_file}: {exc}") from None

    async def go(name: str, s: Store) -> tuple[str, AuditReport]:
        exported = None
        if doc is not None:
            assert key is not None
            exported = chain.check_signed_head(doc, name, key)
        return name, await s.verify_audit(name, key=key, head=exported)

    name, report = _with_store(app, store, go)
    if as_json:
        print_json(verify_out(report))
    if not report.ok:
        if report.wrong_key:
            raise AuditTampered(f"audit log of app {name} cannot be verified: {report.reason}")
        where = "" if report.first_bad_seq is None else f" at record #{report.first_bad_seq}"
        raise AuditTampered(
            f"audit log of app {name}: TAMPERED{where}: {report.reason} "
            f"({report.records} records verified before it)"
        )
    keyed = " (keyed)" if key is not None else ""
    anchored = f", holds the head exported in {head_file}" if head_file is not None else ""
    if not as_json:
        say(f"audit log of app {name}: {report.records} records, chain intact{keyed}{anchored}")


def head(app: AppOpt = None, store: StoreOpt = None) -> None:
    """Print the chain head, signed with $CANTATA_AUDIT_KEY, as JSON: keep it outside the
    store, then `cantata audit verify --head FILE` detects a cut or rewritten tail."""
    key = env_audit_key(required=True)
    assert key is not None

    async def go(name: str, s: Store) -> dict[str, object]:
        report = await s.verify_audit(name, key=key)
        if not report.ok:
            state = "cannot be verified" if report.wrong_key else "is already TAMPERED"
            raise AuditTampered(
                f"audit log of app {name} {state} ({report.reason}): no head exported"
            )
        return chain.signed_head(name, await s.audit_head(name), key)

    doc = _with_store(app, store, go)
    print_line(orjson.dumps(doc).decode())
