"""``cantata groups`` and ``cantata groups retire``: a handler group a deploy removed keeps
getting deliveries (its declaration stays) until an operator retires it; refused while a
live worker serves it (docs/operating.md, "Retiring a group")."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cantata.cli import common
from cantata.cli.main import main
from cantata.observability.eventmap import Handlers, edges_of_records
from cantata.testing.wait import eventually

# The first deploy: a ledger and a mailer react to order.placed.
V1 = """
import cantata

app = cantata.App("groupshop", lease=1.0, poll_interval=0.05)

@app.on("order.placed", group="ledger")
async def book(event) -> None:
    pass

@app.on("order.placed", group="mailer")
async def mail(event) -> None:
    pass
"""

# The next deploy removed the ledger.
V2 = """
import cantata

app = cantata.App("groupshop", lease=1.0, poll_interval=0.05)

@app.on("order.placed", group="mailer")
async def mail(event) -> None:
    pass
"""


@pytest.fixture
def project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_store: str
) -> Iterator[Path]:
    """A SQLite file, or PostgreSQL with NATS (``$CANTATA_BROKER``), for both deploys."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CANTATA_APP", raising=False)
    monkeypatch.setenv("CANTATA_STORE", shared_store)
    monkeypatch.setattr(common.console, "_width", 250)
    (tmp_path / "groupsv1.py").write_text(textwrap.dedent(V1))
    (tmp_path / "groupsv2.py").write_text(textwrap.dedent(V2))
    yield tmp_path
    sys.modules.pop("groupsv1", None)
    sys.modules.pop("groupsv2", None)


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.get_running_loop().run_in_executor(None, main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def listed(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = await cli(capsys, "groups", "--json")
    assert code == 0, err
    return {g["group"]: g for g in json.loads(out)}


async def test_a_removed_group_is_listed_and_retired_once_no_live_worker_serves_it(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = importlib.import_module("groupsv1").app
    v2 = importlib.import_module("groupsv2").app

    # v1 serves both groups: the ledger cannot be retired while it runs
    async with v1:
        async def ledger_served() -> bool:
            g = (await listed(capsys)).get("ledger")
            return bool(g and g["served"])

        await eventually(ledger_served, timeout=10)
        worker = v1.engine.worker_id
        assert (await listed(capsys))["ledger"]["served_by"] == [worker]
        code, out, err = await cli(capsys, "groups", "retire", "ledger", "--yes")
        assert code == 1, out
        assert "group 'ledger'" in err and worker in err and "GroupInUse" not in err
        assert "deploy code without it" in err
    async with v1.client():
        records = await v1.store.audit_records(v1.name, limit=10_000)
    assert not [r for r in records if r.action == "group.retired"]

    # v2 (no ledger) serves: events keep a pending delivery for the ledger
    async with v2:
        await eventually(lambda: v2.engine.handler_groups == ["mailer"], timeout=10)
        first = await v2.publish("order.placed", {"n": 1})
        second = await v2.publish("order.placed", {"n": 2})

        async def mailed() -> bool:
            ds = [d for e in (first, second) for d in await v2.store.deliveries(v2.name, e.id)]
            return sorted((d.group, str(d.status)) for d in ds) == [
                ("ledger", "pending"), ("ledger", "pending"),
                ("mailer", "done"), ("mailer", "done"),
            ]

        await eventually(mailed, timeout=10)

        async def mailer_served() -> bool:
            return bool((await listed(capsys))["mailer"]["served"])

        await eventually(mailer_served, timeout=10)
        groups = await listed(capsys)
        assert (groups["ledger"]["pending"], groups["ledger"]["served"]) == (2, False)
        assert groups["ledger"]["patterns"] == ["order.placed"]
        assert groups["ledger"]["oldest_pending_at"] is not None
        assert groups["mailer"]["pending"] == 0
        code, out, err = await cli(capsys, "groups")
        assert code == 0, err
        assert "ledger" in out and "no live worker serves ledger" in out
        code, out, err = await cli(capsys, "stalled", "--older-than", "0s", "--json")
        assert code == 0, err
        stalls = [s for s in json.loads(out) if s["reason"] == "unhandled_event"]
        assert sorted(s["node"]["group"] for s in stalls) == ["ledger", "ledger"]
        assert all("cantata groups retire ledger" in s["hint"] for s in stalls)

        code, out, err = await cli(capsys, "groups", "retire", "ledger", "--yes",
                                   "--actor", "ops:ann")
        assert code == 0, err
        assert "retired group 'ledger'" in out and "2 pending deliveries ended" in out

        code, out, err = await cli(capsys, "stalled", "--older-than", "0s", "--json")
        assert code == 0, err
        assert not [s for s in json.loads(out) if s["node"]["group"] == "ledger"]
        groups = await listed(capsys)
        assert "ledger" not in groups and groups["mailer"]["pending"] == 0
        # the trace says what became of the ledger's deliveries
        trace = await v2.trace(first.correlation_id or first.id)
        handlers = {n.group: n for n in trace.children}
        assert handlers["ledger"].status == "retired"
        assert handlers["ledger"].detail and "ops:ann" in handlers["ledger"].detail
        assert handlers["mailer"].status == "completed"
        code, out, err = await cli(capsys, "trace", first.id)
        assert code == 0, err
        [line] = [ln for ln in out.splitlines() if "handler ledger" in ln]
        assert "retired" in line and "cantata:retired by ops:ann" in line
        # and the observed event map does not draw the ledger as reached
        records = await v2.store.trace_records(v2.name, first.correlation_id or first.id,
                                               limit=100)
        seen = edges_of_records(v2.name, records,
                                Handlers(v2.router, await v2.store.declarations(v2.name)))
        assert sorted(e.target[1] for e in seen) == ["mailer: mail"]

        # a new event gets no delivery for the retired group; the mailer still handles it
        third = await v2.publish("order.placed", {"n": 3})

        async def only_mailer_done() -> bool:
            ds = await v2.store.deliveries(v2.name, third.id)
            return [(d.group, str(d.status)) for d in ds] == [("mailer", "done")]

        await eventually(only_mailer_done, timeout=10)

        # retiring it again changes nothing
        code, out, err = await cli(capsys, "groups", "retire", "ledger", "--yes")
        assert code == 0 and "nothing to retire" in out, err
        records = await v2.store.audit_records(v2.name, limit=10_000)
    retired = [r for r in records if r.action == "group.retired"]
    assert [(r.actor, r.target) for r in retired] == [("ops:ann", "ledger")]
    assert json.loads(retired[0].data)["ended"] == 2
    code, out, err = await cli(capsys, "audit", "verify")
    assert code == 0 and "chain intact" in out, err


async def test_groups_list_is_groups_as_dlq_list_is_the_dead_letters(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cantata groups list` lists what `cantata groups` lists, with the same options
    (`--json`, `--app`, `--store`), as `dlq list`, `schedules list` and `token list` do;
    `cantata groups` alone still lists them."""
    v1 = importlib.import_module("groupsv1").app
    async with v1:
        await eventually(lambda: sorted(v1.engine.handler_groups) == ["ledger", "mailer"],
                         timeout=10)
    store = os.environ["CANTATA_STORE"]
    for options in ([], ["--json"], ["--app", "groupshop", "--store", store, "--json"]):
        code, alone, err = await cli(capsys, "groups", *options)
        assert code == 0, err
        code, out, err = await cli(capsys, "groups", "list", *options)
        assert code == 0, err
        assert out == alone, options
        assert "ledger" in out and "mailer" in out
    code, out, err = await cli(capsys, "groups", "list", "--json")
    assert code == 0, err
    assert sorted(g["group"] for g in json.loads(out)) == ["ledger", "mailer"]
    code, out, err = await cli(capsys, "groups", "--help")
    assert code == 0 and "list" in out and "retire" in out, err
    code, out, err = await cli(capsys, "groups", "list", "--help")
    assert code == 0 and "--json" in out and "--app" in out, err
    # an option before the subcommand would be ignored (another store, or no JSON): refused
    for before, sub in ((["--json"], ["list"]), (["--store", store], ["retire", "ledger", "-y"])):
        code, out, err = await cli(capsys, "groups", *before, *sub)
        assert (code, out) == (1, ""), err
        assert err == (f"cantata: error: {before[0]} before `{sub[0]}` would be ignored: give "
                       f"the options of `cantata groups {sub[0]}` after it (see cantata "
                       f"groups {sub[0]} --help)\n"), err
    code, out, err = await cli(capsys, "groups", "list", "--json")
    assert code == 0, err
    assert sorted(g["group"] for g in json.loads(out)) == ["ledger", "mailer"]  # (kept)
