"""A start by name from a process without the workflow's code (``cantata start`` with a
bare App, the console's API and its start form, a schedule's trigger) waits in the
queue ``@app.workflow(queue=...)`` gave it: each process with the code records the
workflow's queue in its declaration, and a start without the code reads it there. A
declaration that does not tell (written by an older version) is warned about."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cantata import App
from cantata.cli.main import main
from tests.server.conftest import make_tokens

CODE = """
import cantata

app = cantata.App("byname", poll_interval=0.05)
app.queue("one", concurrency=1)

@app.workflow(queue="one")
async def slow(ctx, tick=None):
    return 1

@app.workflow
async def plain(ctx, x=None):
    return x
"""
BARE = """
import cantata

app = cantata.App("byname")
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A folder with the app's code (``codeapp``) and a bare App of its name
    (``bareapp``); the store the code declared its workflows and queue in (its URL)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("CANTATA_APP", "CANTATA_BROKER", "CANTATA_AUDIT_KEY"):
        monkeypatch.delenv(name, raising=False)
    url = f"sqlite:///{tmp_path}/c.db"
    monkeypatch.setenv("CANTATA_STORE", url)
    (tmp_path / "codeapp.py").write_text(textwrap.dedent(CODE))
    (tmp_path / "bareapp.py").write_text(textwrap.dedent(BARE))
    yield url
    for module in ("codeapp", "bareapp"):
        sys.modules.pop(module, None)


def the_code() -> App:
    import importlib

    app: App = importlib.import_module("codeapp").app
    return app


async def declared(url: str) -> None:
    """The code opens the app as a client: it declares, nothing runs the runs."""
    app = the_code()
    app.configure(store=url)
    async with app.client():
        await app.schedules.create("hourly", None, "slow", every=3600)


async def queue_of(url: str, run_id: str) -> str | None:
    """The queue ``run_id`` waits in (``None``: it waits in none)."""
    bare = App("byname", store=url)
    async with bare.client():
        position = await bare.store.queue_position(bare.name, run_id)
    return None if position is None else position.queue


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.get_running_loop().run_in_executor(None, main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def test_cantata_start_without_the_code_waits_in_the_declared_queue(
    project: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await declared(project)
    code, out, err = await cli(capsys, "start", "bareapp:app", "slow")
    assert code == 0, err
    assert await queue_of(project, out.strip()) == "one"
    code, out, err = await cli(capsys, "start", "bareapp:app", "plain", "--input", "1")
    assert code == 0, err
    assert await queue_of(project, out.strip()) is None
    assert err == ""


async def test_the_api_without_the_code_starts_and_triggers_in_the_declared_queue(
    project: str,
) -> None:
    await declared(project)
    console = App("byname", store=project)  # `cantata serve --store ... --app byname`
    async with console.client():
        tokens, _ = await make_tokens(console)
        transport = httpx.ASGITransport(app=console.asgi())
        headers = {"Authorization": f"Bearer {tokens['operator']}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://c", headers=headers
        ) as client:
            started = await client.post("/api/workflows/slow/runs", json={})
            triggered = await client.post("/api/schedules/hourly/trigger")
            plain = await client.post("/api/workflows/plain/runs", json={"input": 1})
    assert started.status_code == triggered.status_code == plain.status_code == 201
    assert await queue_of(project, started.json()["run_id"]) == "one"
    assert await queue_of(project, triggered.json()["run_id"]) == "one"
    assert await queue_of(project, plain.json()["run_id"]) is None


async def test_a_declaration_that_does_not_tell_the_queue_is_warned_about(
    project: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers of an older version declared the workflow without its queue: the run
    begins outside any queue, as it did, and the start says so (the CLI on stderr)."""
    await declared(project)
    with sqlite3.connect(project.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE declarations SET detail=NULL WHERE kind='workflow'")
    command = [sys.executable, "-m", "cantata", "start", "bareapp:app", "slow"]
    started = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 0, started.stderr
    assert await queue_of(project, started.stdout.strip()) is None
    err = started.stderr
    assert err.startswith("WARNING cantata.queues: workflow 'slow' is started by name"), err
    assert "does not record its queue" in err and "app 'byname' has queues: one" in err, err
    bare = App("byname", store=project)
    with caplog.at_level(logging.WARNING, logger="cantata.queues"):
        async with bare.client():
            handle = await bare.start("slow")
    assert await queue_of(project, handle.run_id) is None
    [record] = [r for r in caplog.records if r.name == "cantata.queues"]
    assert "pass queue=NAME" in record.getMessage()


async def test_a_started_run_of_a_queue_by_name_begins_within_its_limits(
    project: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run queued by name is taken by a worker with the code, through the queue."""
    await declared(project)
    code, out, err = await cli(capsys, "start", "bareapp:app", "slow")
    assert code == 0, err
    worker = the_code()
    async with worker:
        result: Any = await worker.get_handle(out.strip()).result(timeout=10)
    assert result == 1
