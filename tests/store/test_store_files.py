"""A SQLite store is created only on purpose; store URLs are checked, one line each.

Query commands (``runs``, ``run``, ``trace``, ``stalled``, ``dlq list``, ``audit
verify``) never create a store: on a missing file they say so, with its path. On a
read-only store they still work; commands that write fail with one line.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cantata import App, ConfigurationError, Event, Retry, WorkflowContext
from cantata.cli import common
from cantata.cli.main import main
from tests.store.fault_support import immutable


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CANTATA_APP", raising=False)
    monkeypatch.delenv("CANTATA_STORE", raising=False)
    monkeypatch.delenv("CANTATA_BROKER", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common.console, "_width", 200)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


QUERIES = [
    ("runs",), ("run", "r1"), ("trace", "c1"), ("stalled",), ("dlq", "list"),
    ("audit", "verify"), ("dlq", "redrive"),
]


@pytest.mark.parametrize("command", QUERIES, ids=[" ".join(c) for c in QUERIES])
def test_query_commands_never_create_a_store(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: tuple[str, ...]
) -> None:
    path = tmp_path / "typo.db"
    code, _, err = cli(capsys, *command, "--app", "shop", "--store", f"sqlite:///{path}")
    assert code == 1
    assert err.startswith(f"cantata: error: store file {path} does not exist")
    assert "cantata worker" in err and "\n" not in err.strip()
    assert not path.exists()
    # ... nor the default ./cantata.db
    code, _, err = cli(capsys, *command, "--app", "shop")
    assert code == 1 and f"{tmp_path}/cantata.db does not exist" in err
    assert not (tmp_path / "cantata.db").exists()


def test_an_app_creates_its_store(tmp_path: Path) -> None:
    async def go() -> None:
        async with App("shop", store=f"sqlite:///{tmp_path}/new.db").client():
            pass

    asyncio.run(go())
    assert (tmp_path / "new.db").stat().st_size > 0


def test_drafts_left_by_a_killed_creator_are_swept(tmp_path: Path) -> None:
    """A process killed while it created the store leaves its draft (``.new.db.PID.
    X.new`` and its WAL): the next creation in that folder removes those of processes
    that no longer exist, and leaves a live process's, its creation under way."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(gone.stdout)
    left = [tmp_path / f".new.db.{dead}.0a1b2c3d.new{side}" for side in ("", "-wal", "-shm")]
    live = tmp_path / f".new.db.{os.getpid()}.0a1b2c3d.new"
    other = tmp_path / f".other.db.{dead}.0a1b2c3d.new"
    for path in (*left, live, other):
        path.write_bytes(b"draft")

    async def go() -> None:
        async with App("shop", store=f"sqlite:///{tmp_path}/new.db").client():
            pass

    asyncio.run(go())
    assert (tmp_path / "new.db").stat().st_size > 0
    assert not any(path.exists() for path in left)
    assert live.exists() and other.exists()


@pytest.mark.parametrize("store, message", [
    ("", "--store is empty"),
    ("  ", "--store is empty"),
    ("postgresql://[bad", "store URL 'postgresql://[bad' is malformed"),
    ("postgresql://u@h:notaport/db", "is malformed"),
    ("cantata.db", "is not a URL"),
])
def test_bad_store_options_are_one_line(
    capsys: pytest.CaptureFixture[str], store: str, message: str
) -> None:
    code, _, err = cli(capsys, "runs", "--app", "shop", "--store", store)
    assert code == 1
    assert err.startswith("cantata: error: ") and message in err
    assert "unexpected" not in err and err.count("\n") == 1


def test_an_empty_cantata_store_variable_is_an_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CANTATA_STORE", "")
    code, _, err = cli(capsys, "runs", "--app", "shop")
    assert code == 1 and "CANTATA_STORE is set but empty" in err


def test_a_malformed_postgres_url_in_app_is_a_configuration_error() -> None:
    async def go() -> None:
        async with App("shop", store="postgresql://[bad").client():
            pass

    with pytest.raises(ConfigurationError, match="malformed"):
        asyncio.run(go())


def test_a_corrupt_file_is_one_clear_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "bad.db").write_bytes(b"not sqlite at all" * 1000)
    code, _, err = cli(capsys, "runs", "--app", "shop", "--store", "sqlite:///bad.db")
    assert code == 1
    assert "is not a usable SQLite database" in err and err.count("\n") == 1


def _populate(path: Path) -> dict[str, str]:
    app = App("shop", store=f"sqlite:///{path}", poll_interval=0.05)

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> int:
        return n

    @app.on("order.placed", group="billing", retry=Retry(max_attempts=1))
    async def bill(event: Event[Any]) -> None:
        raise ValueError("no card")

    async def go() -> dict[str, str]:
        async with app:
            handle = await app.start(order, 1)
            await handle.result()
            event = await app.publish("order.placed", {"n": 1})
            for _ in range(200):
                if await app.dead_letters():
                    break
                await asyncio.sleep(0.05)
            return {"run": handle.run_id, "event": event.id}

    return asyncio.run(go())


def test_read_commands_work_on_a_read_only_store_and_writes_fail_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "shop.db"
    ids = _populate(path)
    for side in (f"{path}-wal", f"{path}-shm"):
        assert not os.path.exists(side)  # closed cleanly
    store = ["--app", "shop", "--store", f"sqlite:///{path}"]
    with immutable(path):
        for command in (["runs"], ["run", ids["run"]], ["trace", ids["event"]],
                        ["stalled", "--older-than", "0s"], ["dlq", "list"],
                        ["audit", "verify"]):
            code, out, err = cli(capsys, *command, *store)
            assert (code, err) == (0, ""), command
        _, out, _ = cli(capsys, "dlq", "list", *store)
        assert "no card" in out
        code, _, err = cli(capsys, "publish", "order.placed", *store)
        assert code == 1 and "is read-only" in err and err.count("\n") == 1
