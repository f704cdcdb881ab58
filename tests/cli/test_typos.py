"""A typo is an error, not an empty answer: the CLI refuses a store that is not there
(SQLite file or PostgreSQL schema), an app the store never saw, a service the app
does not declare, and says so in one line; so do a short audit key, a cancel of an
ended run and a port in use."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cantata.cli import common, worker
from cantata.cli.main import main
from tests.helpers import with_schema

ROOT = Path(__file__).resolve().parents[2]

APP = """
from pathlib import Path
import cantata

app = cantata.App("shop", lease=1.0, poll_interval=0.05)

@app.step(service="payments", retry=cantata.Retry(max_attempts=1))
async def charge(order: dict) -> int:
    if not Path("fixed").exists():
        raise KeyError("total")
    return order["total"]

@app.workflow(service="orders")
async def order(ctx, order: dict) -> int:
    ctx.set_attributes(customer_id=order["customer"])
    return await ctx.run(charge, order)

@app.on("order.placed", group="mailer")
async def mail(event) -> None:
    pass
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("CANTATA_APP", "CANTATA_AUDIT_KEY", "CANTATA_BROKER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CANTATA_STORE", f"sqlite:///{tmp_path}/c.db")
    monkeypatch.setattr(common.console, "_width", 200)
    (tmp_path / "typoshop.py").write_text(textwrap.dedent(APP))
    yield tmp_path
    sys.modules.pop("typoshop", None)


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.get_running_loop().run_in_executor(None, main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


def shop() -> Any:
    import importlib

    return importlib.import_module("typoshop").app


async def runs(*keys: str, fixed: bool = False) -> list[str]:
    """One run per key, finished (completed when ``fixed``, else failed)."""
    if fixed:
        await asyncio.to_thread(Path("fixed").write_text, "")
    app = shop()
    ids = []
    async with app:
        for i, key in enumerate(keys):
            h = await app.start("order", {"customer": 7 + i, "total": i}, idempotency_key=key)
            if fixed:
                await h.result(timeout=10)
            else:
                with pytest.raises(Exception, match="KeyError"):
                    await h.result(timeout=10)
            ids.append(h.run_id)
    return ids


def cantata(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cantata", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**os.environ, **env})


async def test_a_short_audit_key_fails_only_the_commands_that_use_it_in_one_line(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await runs("order-1", fixed=True)
    helped = await asyncio.to_thread(cantata, "--help", env={"CANTATA_AUDIT_KEY": "short"})
    assert helped.returncode == 0 and "Traceback" not in helped.stderr, helped.stderr
    monkeypatch.setenv("CANTATA_AUDIT_KEY", "short")
    for args in (["runs", "--app", "shop"], ["audit", "verify"],
                 ["demo", "--orders", "1", "--store", f"sqlite:///{project}/demo.db"]):
        code, out, err = await cli(capsys, *args)
        assert code == 1 and out == "" and one_line(err), (args, err)
        assert err.startswith("cantata: error: CANTATA_AUDIT_KEY: the audit key must be at "
                              "least 16 bytes")
    assert not (project / "demo.db").exists()


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put back the logging that ``cantata worker`` sets up (a handler on this test's
    captured stderr would outlive it)."""
    root, ours = logging.getLogger(), logging.getLogger("cantata")
    handlers, level, our_level = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)


async def test_a_worker_refuses_a_service_the_app_does_not_declare(
    project: Path, capsys: pytest.CaptureFixture[str], root_logging: None
) -> None:
    assert worker.known_services(shop()) == ["mailer", "orders", "payments"]
    code, _, err = await cli(capsys, "worker", "typoshop:app", "--service", "orders",
                             "--service", "nosuch", "--processes", "1")
    assert code == 1 and one_line(err)
    assert err.startswith("cantata: error: app 'shop' has no service 'nosuch': its services "
                          "are mailer, orders, payments")
    assert not (project / "c.db").exists()


NOT_CREATING = [
    ("token", "create", "--name", "t", "--role", "viewer"), ("token", "list"),
    ("token", "revoke", "t"), ("serve", "--app", "shop"), ("serve",),
    ("start", "typoshop:app", "order", "--input", "{}"), ("check-replay", "typoshop:app"),
    ("runs", "--app", "shop"), ("audit", "verify", "--app", "shop"),
]


@pytest.mark.parametrize("command", NOT_CREATING, ids=[" ".join(c) for c in NOT_CREATING])
async def test_commands_that_do_not_create_a_store_refuse_a_missing_file(
    project: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    path = project / "typo.db"
    code, out, err = await cli(capsys, *command, "--store", f"sqlite:///{path}")
    assert code == 1 and out == "" and one_line(err), err
    assert err.startswith(f"cantata: error: store file {path} does not exist")
    assert "a worker (cantata worker, App(...)) or cantata demo creates a new store" in err
    assert not path.exists()


@pytest.mark.parametrize("command", NOT_CREATING, ids=[" ".join(c) for c in NOT_CREATING])
async def test_commands_that_do_not_create_a_store_refuse_a_missing_postgres_schema(
    project: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...],
    postgres_url: str, fresh_schema: str,
) -> None:
    url = with_schema(postgres_url, fresh_schema)
    code, out, err = await cli(capsys, *command, "--store", url)
    assert code == 1 and out == "" and one_line(err), err
    assert err.startswith(f"cantata: error: store schema {fresh_schema!r} does not exist in ")
    assert "cantata demo creates a new store" in err
    conn = await asyncpg.connect(postgres_url)
    try:
        assert not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname=$1)", fresh_schema)
    finally:
        await conn.close()


async def test_an_app_the_store_never_saw_is_an_error_naming_those_it_holds(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await runs("order-1", fixed=True)
    import cantata

    other = cantata.App("billing")  # declared by its code, no run yet

    @other.workflow
    async def invoice(ctx: Any) -> None: ...

    async with other.client():
        pass
    for command in (["runs"], ["dlq", "list"], ["audit", "verify"], ["stalled"],
                    ["trace", "x"], ["cancel", "--key", "order-1"], ["serve"]):
        code, out, err = await cli(capsys, *command, "--app", "gamma")
        assert code == 1 and out == "" and one_line(err), (command, err)
        assert err.startswith(f"cantata: error: store sqlite:///{project}/c.db holds no app "
                              "'gamma' (it holds apps billing, shop): check --app")
    code, out, err = await cli(capsys, "runs", "--app", "billing", "--json")
    assert (code, json.loads(out)) == (0, [])  # an app with no runs yet: an empty list


async def test_cancelling_a_run_that_ended_is_an_error(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    [run_id] = await runs("order-1", fixed=True)
    code, out, err = await cli(capsys, "cancel", "--key", "order-1")
    assert code == 1 and out == "" and one_line(err)
    assert err == (f"cantata: error: run {run_id} already ended (completed): only a live run "
                   "can be cancelled\n")
    app = shop()
    async with app.client():
        actions = [r.action for r in await app.store.audit_records(app.name)]
    assert "run.cancel_requested" not in actions


async def test_retry_and_fork_as_json_show_the_attributes(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await runs("order-1", "order-2")
    (project / "fixed").write_text("")
    code, out, err = await cli(capsys, "retry", "--key", "order-1", "--json")
    assert code == 0, err
    assert json.loads(out)["attributes"] == {"customer_id": "7"}
    code, out, err = await cli(capsys, "fork", "--key", "order-2", "--from-step",
                               "payments.charge#1", "--json")
    assert code == 0, err
    forked = json.loads(out)
    code, out, _ = await cli(capsys, "run", forked["run_id"], "--json")
    assert forked["attributes"] == json.loads(out)["attributes"] == {"customer_id": "8"}


async def test_check_replay_says_which_runs_it_checked(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await runs("order-1", fixed=True)
    code, out, err = await cli(capsys, "check-replay", "typoshop:app", "--all")
    assert code == 0, err
    assert ": 1 run(s) checked (live and finished), 0 would break" in out
    code, out, err = await cli(capsys, "check-replay", "typoshop:app")
    assert code == 0 and "all run(s)" not in out and "live run(s) checked" not in out
    assert "(live runs of shop, 0 checked)" in out


async def test_serving_on_a_port_in_use_is_one_line_without_the_banner(
    project: Path
) -> None:
    await runs("order-1", fixed=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = await asyncio.to_thread(
            cantata, "serve", "--app", "shop", "--port", str(port),
            env={"CANTATA_STORE": f"sqlite:///{project}/c.db"},
        )
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert done.stderr == (f"cantata: error: port {port} on 127.0.0.1 is in use (another "
                           "server listens there): choose another with --port\n")
