"""``cantata schedules``: audited as the operator; a client records no code schedule."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import json
import sys
from pathlib import Path

import pytest

from cantata import App
from cantata.cli.common import operator
from cantata.cli.main import main


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANTATA_APP", raising=False)
    monkeypatch.delenv("CANTATA_STORE", raising=False)


def test_schedule_commands_write_the_operator_to_the_audit_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    app = App("shop", store=url)

    @app.workflow
    async def nightly(ctx: object, tick: dt.datetime) -> None:
        return None

    async def create() -> None:
        async with app.client():
            await app.schedules.create("n", "0 2 * * *", nightly, actor="token:bob")

    async def log() -> list[tuple[str, str, str]]:
        reader = App("shop", store=url)
        async with reader.client():
            records = await reader.store.audit_records("shop")
            assert (await reader.store.verify_audit("shop")).ok
        return [(r.actor, r.action, r.target) for r in records]

    me = operator()  # cli:<user>@<host>
    assert me.startswith("cli:")
    asyncio.run(create())
    for command in ("pause", "resume", "delete"):
        assert main(["schedules", command, "n", "--app", "shop", "--store", url]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "schedule n: paused", "schedule n: resumed", "schedule n: deleted"]
    assert asyncio.run(log()) == [
        ("token:bob", "schedule.created", "n"),
        (me, "schedule.paused", "n"),
        (me, "schedule.resumed", "n"),
        (me, "schedule.deleted", "n"),
    ]


NIGHTLY = """
import datetime as dt
import cantata

app = cantata.App("shop")

@app.schedule("0 2 * * *")
@app.workflow
async def nightly(ctx, tick: dt.datetime) -> None:
    return None
"""


def test_a_deleted_code_schedule_stays_deleted_until_a_worker_opens_the_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read-only commands and clients record no code schedule: ``schedules list`` (or
    any client) after ``schedules delete`` does not bring it back; a worker opening the
    app with the code that declares it does."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "nightmod.py").write_text(NIGHTLY)
    url = f"sqlite:///{tmp_path / 's.db'}"
    args = ["--app", "nightmod:app", "--store", url]

    def listed() -> list[str]:
        assert main(["schedules", "list", *args, "--json"]) == 0
        return [s["name"] for s in json.loads(capsys.readouterr().out)]

    def a_worker_opens() -> None:
        nightmod = importlib.import_module("nightmod")

        async def serve() -> None:
            nightmod.app.configure(store=url)
            async with nightmod.app:
                pass

        asyncio.run(serve())

    async def create_the_store() -> None:
        async with App("shop", store=url).client():
            pass

    asyncio.run(create_the_store())
    try:
        assert listed() == []  # a client records nothing: no worker has opened the app
        assert main(["schedules", "pause", "nightly", *args]) == 1
        assert "not recorded yet" in capsys.readouterr().err
        a_worker_opens()
        assert listed() == ["nightly"]
        assert main(["schedules", "delete", "nightly", *args]) == 0
        capsys.readouterr()
        assert listed() == []
        assert listed() == []  # nor the listing after that
        a_worker_opens()  # the code that declares it is served again
        assert listed() == ["nightly"]
    finally:
        sys.modules.pop("nightmod", None)
