"""``cantata trace | stalled | graph | asyncapi`` from the command line."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import cantata
from cantata import Event, Retry
from cantata.cli import common
from cantata.cli.main import main
from tests.helpers import eventually, make_app, with_schema

from .scenarios import Scenario

APP = "tests.observability.scenarios:example"


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps at 80 columns when not on a terminal; tests read whole lines."""
    monkeypatch.setattr(common.console, "_width", 200)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_trace_prints_the_timeline_and_where_it_stands(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "trace", scenario.ids["compensated"], "--app", "shop",
                         "--store", scenario.url)
    assert code == 0, err
    assert f"trace {scenario.ids['compensated']}" in out
    assert "run place_order  compensated" in out
    assert "step charge  failed" in out and "PaymentDeclined: card of order 1 declined" in out
    assert "compensate release  completed" in out
    assert "where it stands: compensated" in out


def test_trace_of_a_stalled_choreography(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, "trace", scenario.ids["dead"], "--app", "shop",
                       "--store", scenario.url)
    assert code == 0
    assert "event order.placed" in out and "event inventory.reserved  dead" in out
    assert "handler payment" in out and "2 attempts" in out
    assert "dead letter in payment" in out and "cantata dlq replay " in out
    assert "where it stands: stalled" in out
    assert "group audit has not reacted to order.placed" in out


def test_trace_as_json(scenario: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "trace", scenario.ids["hybrid"], "--json", "--app", "shop",
                       "--store", scenario.url)
    assert code == 0
    tree = json.loads(out)
    assert (tree["kind"], tree["name"], tree["ref"]) == ("event", "order.approved",
                                                         scenario.ids["hybrid"])
    assert tree["children"][0]["kind"] == "run"
    assert tree["started_at"].endswith("Z")  # as GET /api/trace answers it
    assert tree["correlation_id"] == scenario.ids["hybrid"] and tree["where"]


def test_trace_of_an_unknown_id_is_one_clear_line(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "trace", "nope", "--app", "shop", "--store", scenario.url)
    assert code == 1 and out == ""
    assert err.startswith("cantata: error: no business transaction 'nope' in app 'shop'")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.endswith("(check the id, --app and --store)\n"), err  # the command's options


def test_stalled_lists_every_reason_with_group_and_step(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "stalled", "--older-than", "0s", "--app", "shop",
                         "--store", scenario.url)
    assert code == 0, err
    for reason in ("pending_step", "waiting_event", "dead_letter", "unhandled_event",
                   "compensation_failed"):
        assert reason in out
    assert "group audit" in out and "group payment" in out and "cantata dlq replay" in out
    assert "run restock" in out and "wait invoice.approved" in out
    assert "compensation refund" in out and "RuntimeError: refund API is down" in out
    assert scenario.ids["waiting"] in out
    # the hint repeats the --app and --store given, so that it works as printed
    assert f"--app shop --store {scenario.url}" in "".join(out.split("\n")), out
    code, out, err = cli(capsys, "stalled", "--older-than", "0s", "--app", "shop",
                         "--store", scenario.url, "--json")
    [letter] = [s for s in json.loads(out) if s["reason"] == "dead_letter"]
    # as GET /api/stalled answers it: the replay command is the table's, not the JSON's
    assert set(letter) == {"correlation_id", "reason", "since", "where", "node", "hint"}
    assert letter["where"] == f"group {letter['node']['group']}" and letter["hint"] is None
    assert letter["since"].endswith("Z") and letter["node"]["started_at"].endswith("Z")


def test_stalled_with_nothing_old_enough(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, "stalled", "--older-than", "1h", "--app", "shop",
                       "--store", scenario.url)
    assert code == 0
    assert "no stalled transactions in app shop" in out


def test_stalled_rejects_a_bad_duration(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "stalled", "--older-than", "soon", "--app", "shop",
                       "--store", scenario.url)
    assert code == 1
    assert "--older-than 'soon' is invalid: give a duration >= 0" in err


def test_graph_of_a_workflow_needs_no_store(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "graph", APP, "place_order")
    assert code == 0, err
    assert out.startswith("flowchart TD\n")
    assert 'n2 -.->|"fails"| c1' in out
    code, out, err = cli(capsys, "graph", "cantata.examples.orders.app:app", "place_order")
    assert code == 0, err
    assert 'n2["payments.charge"]' in out and 'c1[/"↩ inventory.release"/]' in out


def test_graph_of_the_choreography_with_traffic(
    scenario: Scenario, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # opening the app declares its handlers: use a copy of the shared store
    store = scenario.copy(tmp_path)
    code, out, err = cli(capsys, "graph", APP, "--events", "--store", store)
    assert code == 0, err
    assert out.startswith("flowchart LR\n")
    assert "declared and seen" in out
    assert '-.->|"never seen"|' in out  # the audit group and the invoice wait


@pytest.mark.postgres
def test_graph_of_a_missing_postgres_schema_creates_none(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped schema is read, never made: the map is drawn from the code, with a
    warning that names the store."""
    import asyncpg

    schema = f"cantata_missing_{uuid.uuid4().hex[:8]}"
    code, out, err = cli(capsys, "graph", APP, "--events", "--store",
                         with_schema(postgres_url, schema))
    assert code == 0, err
    assert out.startswith("flowchart LR\n")
    assert f"store schema {schema!r} does not exist" in err and "from the code alone" in err

    async def exists() -> bool:
        conn = await asyncpg.connect(postgres_url)
        try:
            return bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname=$1)", schema))
        finally:
            await conn.close()

    assert not asyncio.run(exists())


def test_graph_needs_a_workflow_or_events(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "graph", APP)
    assert code == 1
    assert "give either a WORKFLOW to draw or --events" in err
    code, _, err = cli(capsys, "graph", APP, "nope")
    assert code == 1
    assert "no workflow named 'nope'" in err


def test_asyncapi_to_stdout_and_to_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "asyncapi", APP)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["asyncapi"] == "3.0.0" and "order.placed" in doc["channels"]

    target = tmp_path / "asyncapi.json"
    code, out, err = cli(capsys, "asyncapi", APP, "--output", str(target))
    assert code == 0, err
    assert json.loads(target.read_text()) == doc
    assert f"wrote {target}" in out

    code, _, err = cli(capsys, "asyncapi", APP, "--output", str(tmp_path / "no" / "x.json"))
    assert code == 1 and "cannot write" in err


def test_user_data_is_not_read_as_markup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/m.db"

    async def make() -> str:
        app = make_app(url)

        @app.on("odd.event", group="[bold]grp[/]", retry=Retry(max_attempts=1))
        async def fail(event: Event[Any]) -> None:
            raise KeyError("[red]not markup[/red]")

        async with app:
            ev = await app.publish("odd.event", {}, correlation_id="[cid]")
            await eventually(app.dead_letters)
        return ev.correlation_id or ""

    cid = asyncio.run(make())
    code, out, err = cli(capsys, "stalled", "--older-than", "0s", "--app", "shop",
                         "--store", url)
    assert code == 0, err
    assert "[cid]" in out and "[red]not markup[/red]" in out
    code, out, err = cli(capsys, "trace", cid, "--app", "shop", "--store", url)
    assert code == 0, err
    assert "[bold]grp[/]" in out and "[red]not markup[/red]" in out


def test_a_stored_time_past_year_9999_breaks_no_trace_or_listing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Such a time cannot be made any more (durations are at most 100 years), but one
    stored before (or by hand) must not break the trace, ``cantata run``, nor the
    stalled listing of the whole app: it shows as the latest date there is."""
    import sqlite3

    import httpx

    from cantata.model.access import Role
    from cantata.observability.trace import render_timeline
    from cantata.server.auth import create_token

    url = f"sqlite:///{tmp_path}/far.db"
    app = make_app(url, "far")

    @app.workflow
    async def nap(ctx: cantata.WorkflowContext) -> None:
        await ctx.sleep(1000)

    async def start() -> list[str]:
        async with app:
            ids = [(await app.start(nap)).run_id, (await app.start(nap, deadline=1000)).run_id]

            async def sleeping() -> bool:
                return all([any(e.kind == "sleep" for e in await app.store.load_history(
                    app.name, i)) for i in ids])

            await eventually(sleeping)
            return ids

    far, farther = asyncio.run(start())
    with sqlite3.connect(tmp_path / "far.db") as db:  # year 33715, and past any time_t
        db.execute("UPDATE history SET wake_at=1e12 WHERE run_id=?", (far,))
        db.execute("UPDATE history SET wake_at=1e19 WHERE run_id=?", (farther,))
        db.execute("UPDATE runs SET deadline_at=1e19 WHERE run_id=?", (farther,))

    async def read() -> tuple[str, int, list[int]]:
        async with app.client():
            root = await app.trace(far)
            await app.trace(farther)
            stalls = await app.stalled(older_than=0)
            token = await create_token(app.store, "viewer-far", Role.VIEWER)
            auth = {"Authorization": f"Bearer {token}"}
            transport = httpx.ASGITransport(app=app.asgi())
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                codes = [(await http.get(path, headers=auth)).status_code for path in (
                    f"/api/trace/{far}", f"/api/trace/{farther}", f"/api/runs/{farther}",
                    "/api/runs", "/api/stalled?older_than=0")]
        out = io.StringIO()
        Console(file=out, width=200, color_system=None).print(render_timeline(root))
        return out.getvalue(), len(stalls), codes

    text, _, codes = asyncio.run(read())
    assert "wakes 9999-12-31 23:59:59 UTC" in text, text
    assert codes == [200] * 5
    for args in (("trace", far), ("trace", farther), ("run", farther), ("stalled",),
                 ("runs",)):
        code, _, err = cli(capsys, *args, "--app", "far", "--store", url)
        assert code == 0, (args, err)
