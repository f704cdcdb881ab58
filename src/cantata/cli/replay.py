"""``cantata check-replay APP``: the gate to run before a deploy."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.text import Text

from cantata.engine.replaycheck import replay_report
from cantata.errors import CantataError

from .common import console, load_app, print_json, run, show, table, use_existing_store
from .runs import CodeStoreOpt, JsonOpt


class ReplayCheckFailed(CantataError):
    """Some stored runs would break under the current code."""

    code = "replay_check_failed"


class ReplayCheckIncomplete(CantataError):
    """More runs than ``--limit`` were there: the check did not see them all."""

    code = "replay_check_incomplete"


def register(cli: typer.Typer) -> None:
    cli.command("check-replay")(check)


def check(
    app: Annotated[str, typer.Argument(help="The app (new code), as module:attribute.")],
    store: CodeStoreOpt = None,
    all_runs: Annotated[
        bool, typer.Option("--all", help="Also replay finished runs, not only live ones.")
    ] = False,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="At most this many runs checked.")
    ] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Replay stored histories against the current code, call for call; list every run
    it would break, with the first call that differs, per recorded code version."""
    the_app = load_app(app)
    use_existing_store(the_app, store)

    async def go() -> None:
        async with the_app.client():
            report = await replay_report(the_app, all_runs=all_runs, limit=limit)
            version = the_app.version
        which = "all" if all_runs else "live"
        checked = "run(s) checked (live and finished)" if all_runs else "live run(s) checked"
        if as_json:
            print_json({
                "app": the_app.name, "version": version, "runs": which,
                "versions": {v: {"checked": n, "broken": report.broken(v)}
                             for v, n in sorted(report.checked.items())},
                "problems": [dataclasses.asdict(p) for p in report.problems],
                "incomplete": report.incomplete,
            })
        else:
            for v, n in sorted(report.checked.items()):
                mark = "this code" if v == version else ("no version" if v == "-" else "")
                console.print(Text(f"version {v}{f' ({mark})' if mark else ''}: {n} {checked}, "
                                   f"{report.broken(v)} would break"))
            if not report.problems and not report.incomplete:
                console.print(Text.assemble(("ok", "green"), (
                    f": the current code (version {version}) replays every checked run "
                    f"({which} runs of {the_app.name}, {sum(report.checked.values())} checked)"
                )))
                return
            if report.problems:
                out = table("runs the current code would break", "run id", "workflow",
                            "version", "status", "problem", "first difference")
                for p in report.problems:
                    out.add_row(Text(p.run_id), Text(p.workflow), Text(p.version or "-"),
                                p.status, p.problem, Text(p.detail))
                show(out)
        # A gate that did not see every run does not pass: the runs left out are the
        # oldest, the likeliest to break.
        left_out = (
            f"there are more {which} runs than --limit {limit}: only the newest {limit} were "
            "checked; raise --limit to check them all"
        )
        if report.problems:
            raise ReplayCheckFailed(
                f"{len(report.problems)} run(s) would break: deploy the old code until they "
                "finish, guard the change with ctx.patched, or cancel them"
                + (f" (and {left_out})" if report.incomplete else "")
            )
        if report.incomplete:
            raise ReplayCheckIncomplete(left_out)

    run(go)
