"""``cantata audit verify`` from the command line."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from cantata.cli import common
from cantata.cli.main import main
from cantata.model.records import RunWrite
from cantata.model.status import RunStatus
from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract.support import entry, new_run


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANTATA_APP", raising=False)
    monkeypatch.delenv("CANTATA_STORE", raising=False)
    monkeypatch.setattr(common.console, "_width", 200)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def populate(path: Path, *apps: str) -> str:
    """A store where each app has two runs (three audit records each)."""

    async def go() -> None:
        store = SQLiteStore(str(path))
        await store.open()
        try:
            for app in apps:
                for _ in range(2):
                    run, _ = await store.create_run(new_run(app))
                    await store.commit_run(app, run.run_id, 0, RunWrite(
                        entries=[entry("a#1", 1)], status=RunStatus.RUNNING))
                    await store.commit_run(app, run.run_id, 0, RunWrite(
                        status=RunStatus.COMPLETED, result="1"))
        finally:
            await store.close()

    asyncio.run(go())
    return f"sqlite:///{path}"


def test_an_intact_log_of_the_only_app(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = populate(tmp_path / "c.db", "shop")
    code, out, err = cli(capsys, "audit", "verify", "--store", url)
    assert (code, err) == (0, "")
    assert out.strip() == "audit log of app shop: 6 records, chain intact"
    code, out, _ = cli(capsys, "audit", "verify", "--app", "shop", "--store", url)
    assert code == 0 and "6 records, chain intact" in out


def test_a_tampered_record_is_named_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.db"
    url = populate(path, "shop", "other")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER audit_no_update")
        conn.execute("UPDATE audit SET actor='nobody' WHERE app='shop' AND seq=4")
    finally:
        conn.close()
    code, out, err = cli(capsys, "audit", "verify", "--app", "shop", "--store", url)
    assert code == 1 and out == ""
    assert err.startswith("cantata: error: audit log of app shop: TAMPERED at record #4: ")
    assert "record #4 was changed" in err and "3 records verified" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    code, out, _ = cli(capsys, "audit", "verify", "--app", "other", "--store", url)
    assert code == 0 and "chain intact" in out


def test_which_app_must_be_said_when_it_is_not_the_only_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = populate(tmp_path / "c.db", "shop", "billing")
    code, out, err = cli(capsys, "audit", "verify", "--store", url)
    assert code == 1 and out == ""
    assert "holds apps billing, shop: pass --app NAME" in err and err.count("\n") == 1
    empty = populate(tmp_path / "empty.db")
    code, _, err = cli(capsys, "audit", "verify", "--store", empty)
    assert code == 1 and "holds no app" in err


def test_the_app_may_come_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = populate(tmp_path / "c.db", "shop", "billing")
    monkeypatch.setenv("CANTATA_APP", "billing")
    monkeypatch.setenv("CANTATA_STORE", url)
    code, out, _ = cli(capsys, "audit", "verify")
    assert code == 0 and out.strip() == "audit log of app billing: 6 records, chain intact"


def test_verify_json_is_the_apis_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.db"
    url = populate(path, "shop")
    code, out, err = cli(capsys, "audit", "verify", "--store", url, "--json")
    assert (code, err) == (0, "")
    # field for field GET /api/audit/verify's answer
    assert json.loads(out) == {"ok": True, "records": 6, "first_bad_seq": None, "reason": None}
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER audit_no_update")
        conn.execute("UPDATE audit SET actor='nobody' WHERE app='shop' AND seq=4")
    finally:
        conn.close()
    code, out, err = cli(capsys, "audit", "verify", "--store", url, "--json")
    report = json.loads(out)  # the report still goes to stdout, for the script to read
    assert code == 1 and (report["ok"], report["first_bad_seq"], report["records"]) == (
        False, 4, 3)
    assert "record #4 was changed" in report["reason"]
    assert err.startswith("cantata: error: audit log of app shop: TAMPERED at record #4")
    assert err.count("\n") == 1 and "Traceback" not in err
