"""``cantata check-replay``: stored histories against changed code."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from cantata.cli.main import main

V1 = """
import cantata
app = cantata.App("shop", lease=1.0, poll_interval=0.05)

@app.step
async def reserve(order: dict) -> str:
    return "r"

@app.step
async def charge(order: dict) -> str:
    return "c"

@app.step
async def bill(order: dict) -> str:
    return "b"

@app.workflow
async def place_order(ctx, order: dict) -> str:
    await ctx.run(reserve, order)
    await ctx.run(STEP, order)
    await ctx.sleep(3600)
    return "done"
"""


def write_app(folder: Path, module: str, step: str) -> None:
    (folder / f"{module}.py").write_text(textwrap.dedent(V1).replace("STEP", step))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CANTATA_STORE", f"sqlite:///{tmp_path}/c.db")
    write_app(tmp_path, "v1", "charge")
    write_app(tmp_path, "v2_same", "charge")
    write_app(tmp_path, "v2_changed", "bill")
    return tmp_path


async def start_sleeping_run(project: Path, module: str = "v1") -> str:
    import importlib

    mod = importlib.import_module(module)
    app = mod.app
    async with app:
        handle = await app.start("place_order", {"id": 1})
        for _ in range(200):
            history = await app.store.load_history(app.name, handle.run_id)
            if any(e.kind == "sleep" for e in history):
                break
            import asyncio

            await asyncio.sleep(0.01)
    return str(handle.run_id)


async def test_unchanged_code_passes_and_changed_code_is_reported(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A console wide enough that the table's words stay whole: without a terminal (a
    # pytest-xdist worker) Rich fixes 80 columns when the CLI is imported, and folds
    # "non_determinism" across lines.
    from cantata.cli import common

    monkeypatch.setattr(common.console, "_width", 200)
    run_id = await start_sleeping_run(project)
    import asyncio

    loop = asyncio.get_running_loop()
    code = await loop.run_in_executor(None, main, ["check-replay", "v2_same:app"])
    out = capsys.readouterr()
    assert code == 0, out
    assert "ok" in out.out
    code = await loop.run_in_executor(None, main, ["check-replay", "v2_changed:app"])
    out = capsys.readouterr()
    assert code == 1
    assert run_id in out.out and "non_determinism" in out.out
    assert "1 run(s) would break" in out.err
    for name in ("v1", "v2_same", "v2_changed"):
        sys.modules.pop(name, None)


async def test_a_check_cut_short_by_its_limit_does_not_pass(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate checks the newest runs up to --limit: when live runs were left out, it
    says so and fails, rather than passing on the runs it saw (the oldest runs, left
    out, are the likeliest to break)."""
    from cantata.cli import common

    monkeypatch.setattr(common.console, "_width", 200)
    await start_sleeping_run(project, "v1")  # would break under v2_changed
    await start_sleeping_run(project, "v2_changed")  # newer; replays
    import asyncio

    loop = asyncio.get_running_loop()
    code = await loop.run_in_executor(None, main, ["check-replay", "v2_changed:app",
                                                   "--limit", "1"])
    out = capsys.readouterr()
    assert code == 1, out
    assert "more live runs than --limit 1" in out.err, out
    assert "ok" not in out.out
    code = await loop.run_in_executor(None, main, ["check-replay", "v2_changed:app",
                                                   "--limit", "2"])
    out = capsys.readouterr()
    assert code == 1 and "1 run(s) would break" in out.err, out
    for name in ("v1", "v2_same", "v2_changed"):
        sys.modules.pop(name, None)
