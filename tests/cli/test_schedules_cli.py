"""``cantata schedules pause|resume|delete`` are audited as the operator."""

from __future__ import annotations

import asyncio
import datetime as dt
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
