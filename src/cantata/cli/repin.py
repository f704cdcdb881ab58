"""``cantata runs repin``: move live runs back to older code, for a rollback
(docs/operating.md, versions)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.text import Text

from cantata.errors import CantataError

from .common import client_app, operator, print_json, run, say, show, table
from .runs import AppOpt, JsonOpt, StoreOpt


class RunsLeft(CantataError):
    """``cantata runs repin`` left some runs of the version where they were (each with
    why, in its table), or did not look at them all (``--limit``)."""

    code = "runs_left"


def repin(
    from_version: Annotated[str, typer.Option(
        "--from-version", help="The version whose live runs move (the newer code rolled "
        "back): `cantata runs --version V` lists them.", show_default=False)],
    to_version: Annotated[str | None, typer.Option(
        "--to-version", help="The version they move to: the code of --app, which must be "
        "of it (default: that code's version).")] = None,
    workflow: Annotated[str | None, typer.Option(
        "--workflow", help="Only this workflow's runs.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check each run and say what would move; change nothing.")
    ] = False,
    actor: Annotated[str | None, typer.Option(
        "--actor", help="Who re-pins, for the audit log (default: cli:user@host).")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="At most this many runs (the oldest).")
    ] = 1000,
    app: AppOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-pin the live runs of a newer version to the code of --app (module:attribute, the
    older code being redeployed), for a rollback without --any-version.

    Each run moves only if that code replays its whole history (as check-replay checks
    it) and no live worker holds it; each move is audited (run.repinned). The runs left
    are listed with why, and the exit status is then 1.
    """
    the_app = client_app(app, store)

    async def go() -> None:
        async with the_app.client():
            report = await the_app.repin_runs(
                from_version, to_version, workflow=workflow, dry_run=dry_run,
                actor=actor or operator(), limit=limit,
            )
        if as_json:
            print_json({**dataclasses.asdict(report), "moved": len(report.moved),
                        "left": len(report.left)})
        else:
            verb = "would move" if dry_run else "moved"
            if report.runs:
                out = table(f"live runs of version {report.from_version} of {the_app.name}",
                            "run id", "workflow", "status", "outcome")
                for r in report.runs:
                    outcome = verb if r.moved else f"left: {r.reason}"
                    out.add_row(Text(r.run_id), Text(r.workflow), r.status, Text(outcome))
                show(out)
            say(f"{len(report.moved)} live run(s) of version {report.from_version} {verb} to "
                f"version {report.to_version}, {len(report.left)} left"
                + (" (dry run: nothing changed)" if dry_run else ""))
        left_out = (f"there are more live runs of version {report.from_version} than "
                    f"--limit {limit}: only the oldest {limit} were looked at; run it again "
                    "or raise --limit")
        if report.left:
            raise RunsLeft(
                f"{len(report.left)} run(s) of version {report.from_version} were left where "
                "they are (the table says why): let those in progress finish and re-pin "
                "again; those this code does not replay need their own version's workers "
                "(or `cantata worker --any-version`, unchecked)"
                + (f"; and {left_out}" if report.incomplete else "")
            )
        if report.incomplete:
            raise RunsLeft(left_out)

    run(go)
