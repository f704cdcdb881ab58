"""What the CLI prints: user data is never read as Rich markup nor wrapped into invalid
JSON, times are UTC and say so, and a command group without its subcommand shows its
help without an empty error line."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cantata.cli import common
from cantata.cli.main import main

APP = """
import cantata

app = cantata.App("echoes", poll_interval=0.05)

@app.workflow
async def echo(ctx, x):
    return x

@app.workflow
async def two(ctx, a, b=0):
    return [a, b]

# (one attempt: the dead letter at once, not after the four backoffs of 7.5 s that a
# handler's default retry waits; what is printed of it is what these tests check)
@app.on("note.sent", group="[red]notes[/red]", retry=cantata.Retry(max_attempts=1))
async def note(event) -> None:
    raise ValueError("[bold]no[/bold] template for [/]")
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The app twice: ``echoesw`` served by the test, ``echoesc`` loaded by the CLI (one
    App object cannot be open in both)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("CANTATA_APP", "CANTATA_BROKER", "CANTATA_AUDIT_KEY", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CANTATA_STORE", f"sqlite:///{tmp_path}/c.db")
    for module in ("echoesw", "echoesc"):
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(APP))
    yield tmp_path
    for module in ("echoesw", "echoesc"):
        sys.modules.pop(module, None)


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.get_running_loop().run_in_executor(None, main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


def served() -> Any:
    import importlib

    return importlib.import_module("echoesw").app


LONG = " ".join(["w"] * 60)  # wider than the 80 columns of a pipe


@pytest.mark.parametrize("value", [{"tag": "[red]x[/red] and [bold]y[/bold]"}, LONG, "[/]",
                                   ["[link=http://x]a[/link]", 1.5, None]])
async def test_start_wait_prints_the_result_as_it_is_on_one_line(
    project: Path, capsys: pytest.CaptureFixture[str], value: Any
) -> None:
    async with served():
        code, out, err = await cli(capsys, "start", "echoesc:app", "echo", "--input",
                                   json.dumps(value), "--wait")
    assert code == 0, err
    run_id, result, rest = out.split("\n")
    assert len(run_id) == 32 and rest == ""
    assert json.loads(result) == value


async def test_user_text_in_tables_and_messages_is_not_markup(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(common.console, "_width", 250)
    app = served()
    async with app:
        await app.publish("note.sent", {"n": 1})
        for _ in range(200):
            if await app.dead_letters():
                break
            await asyncio.sleep(0.05)
    code, out, err = await cli(capsys, "dlq", "list")
    assert code == 0, err
    assert "[red]notes[/red]" in out and "[bold]no[/bold] template" in out
    code, out, err = await cli(capsys, "stalled", "--older-than", "0s")
    assert code == 0, err
    assert "[red]notes[/red]" in out
    target = project / "[b]api[i].json"
    code, out, err = await cli(capsys, "asyncapi", "echoesc:app", "-o", str(target))
    assert code == 0, err
    assert out.startswith(f"wrote {target}:") and target.exists()


@pytest.mark.parametrize("command", [[], ["dlq"], ["audit"], ["token"], ["schedules"]])
def test_a_group_without_its_subcommand_shows_its_help_and_no_empty_error(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    code = main(command)
    out, err = capsys.readouterr()
    assert code == 2  # a usage error, as click has it for a missing subcommand
    assert "Usage: cantata" in out and "Commands" in out, out
    assert err == "", err


@pytest.fixture
def tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's local time is UTC+9 (put back after)."""
    import time

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


async def test_table_times_are_utc_and_say_so(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tokyo: None,
) -> None:
    import datetime as dt

    monkeypatch.setattr(common.console, "_width", 250)
    app = served()
    async with app:
        handle = await app.start("echo", 1)
        await handle.result(timeout=10)
        info = await handle.info()
    created = dt.datetime.fromtimestamp(info.created_at, dt.UTC)
    local = dt.datetime.fromtimestamp(info.created_at)  # Tokyo: nine hours ahead
    assert local.hour != created.hour
    code, out, err = await cli(capsys, "runs", "--app", "echoes")
    assert code == 0, err
    assert "created (UTC)" in out and created.strftime("%Y-%m-%d %H:%M:%S") in out
    assert local.strftime("%Y-%m-%d %H:%M:%S") not in out
    code, out, err = await cli(capsys, "run", handle.run_id, "--app", "echoes")
    assert code == 0, err
    assert f"created {created.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]} UTC" in out, out
    assert "started (UTC)" in out and local.strftime("%H:%M:%S") not in out
    code, out, err = await cli(capsys, "trace", handle.run_id, "--app", "echoes")
    assert code == 0, err
    assert f"{created.strftime('%H:%M:%S')}" in out and " UTC" in out
    assert local.strftime("%H:%M:%S") not in out


async def test_messages_are_not_wrapped_at_the_width_of_a_pipe(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Output to a pipe or a log file is 80 columns wide for Rich: a message, a URL or a
    JSON value longer than that stays on one line (a script or grep reads it whole; a
    terminal wraps it itself)."""
    app = served()
    async with app:
        handle = await app.start("echo", LONG)
        assert await handle.result(timeout=10) == LONG
        await app.publish("note.sent", {"n": 1})
        for _ in range(200):
            if letters := await app.dead_letters():
                break
            await asyncio.sleep(0.05)
    code, out, err = await cli(capsys, "run", handle.run_id)
    assert code == 0, err
    assert f"args   {json.dumps([LONG])}\n" in out.replace('", "', '","'), out
    assert f"result {json.dumps(LONG)}\n" in out, out
    code, out, err = await cli(capsys, "dlq", "discard", letters[0].id)
    assert code == 0, err
    assert out == (f"discarded {letters[0].id}: note.sent {letters[0].event.id} of group "
                   "[red]notes[/red]\n"), out


async def _long_keyed_runs(n: int = 2) -> tuple[list[str], list[str]]:
    """Runs with keys far wider than 80 columns: their ids and keys."""
    app = served()
    keys = [f"order-{i}-" + "k" * 150 for i in range(n)]
    async with app:
        handles = [await app.start("echo", i, idempotency_key=key) for i, key in enumerate(keys)]
        for handle in handles:
            await handle.result(timeout=10)
    return [h.run_id for h in handles], keys


async def test_runs_to_a_pipe_prints_every_value_whole_and_each_run_on_one_line(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not to a terminal and without $COLUMNS, `cantata runs` is as wide as its values
    (`ps -ww`): a key far wider than 80 columns is whole, on its run's one line, for
    grep, cut and awk (docs/operating.md)."""
    ids, keys = await _long_keyed_runs()
    code, out, err = await cli(capsys, "runs")
    assert code == 0, err
    for run_id, key in zip(ids, keys, strict=True):
        [line] = [line for line in out.splitlines() if run_id in line]
        assert key in line and "completed" in line, line
    assert all(line == line.rstrip() for line in out.splitlines())  # (no padding)


async def test_runs_to_a_pipe_fit_columns_when_it_is_set(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, keys = await _long_keyed_runs(1)
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(common.console, "_width", None)  # (read $COLUMNS now)
    code, out, err = await cli(capsys, "runs")
    assert code == 0, err
    assert max(len(line) for line in out.splitlines()) <= 100, out
    assert keys[0] not in out and "order" in out  # folded
    assert ids[0] in out  # (an id is never folded)


async def test_runs_in_a_terminal_fit_its_width(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, keys = await _long_keyed_runs(1)
    monkeypatch.setattr(common.console, "_force_terminal", True)
    monkeypatch.setattr(common.console, "_width", 100)
    code, out, err = await cli(capsys, "runs")
    assert code == 0, err
    assert max(len(line) for line in out.splitlines()) <= 100, out
    assert keys[0] not in out and "order" in out  # folded, as before
    assert ids[0] in out
