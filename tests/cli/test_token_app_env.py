"""``cantata token`` finds its store as the other commands do: ``--store``, else the
store of ``--app`` or ``$CANTATA_APP`` (``module:attribute``), else ``$CANTATA_STORE``.
It ignored ``$CANTATA_APP``: with it set (and no ``--app``) a token went to
``$CANTATA_STORE`` or ``./cantata.db``, another store than the one ``cantata serve``
(which reads ``$CANTATA_APP``) serves, and the new token was refused there."""

from __future__ import annotations

import asyncio
import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import cantata
from cantata.cli.main import main

APP = """
import cantata

app = cantata.App("tokshop", store="sqlite:///{path}/own.db")
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("CANTATA_APP", "CANTATA_STORE", "CANTATA_BROKER", "CANTATA_AUDIT_KEY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "tokshop.py").write_text(textwrap.dedent(APP.format(path=tmp_path)))
    yield tmp_path
    sys.modules.pop("tokshop", None)


async def tokens(url: str) -> list[str]:
    app = cantata.App("reader", store=url)
    async with app.client():
        return [t.name for t in await app.store.tokens()]


async def test_token_commands_use_the_store_of_cantata_app(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tokshop = importlib.import_module("tokshop")

    async with tokshop.app.client():
        pass  # its store exists
    async with cantata.App("other").client():
        pass  # and so does ./cantata.db, the default store
    monkeypatch.setenv("CANTATA_APP", "tokshop:app")
    loop = asyncio.get_running_loop()
    code = await loop.run_in_executor(None, main, ["token", "create", "--name", "ann",
                                                   "--role", "viewer"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert await tokens(f"sqlite:///{project}/own.db") == ["ann"]
    assert await tokens(f"sqlite:///{project}/cantata.db") == []
    code = await loop.run_in_executor(None, main, ["token", "list"])
    out, err = capsys.readouterr()
    assert code == 0 and "ann" in out, err
    code = await loop.run_in_executor(None, main, ["token", "revoke", "ann"])
    out, err = capsys.readouterr()
    assert code == 0, err
