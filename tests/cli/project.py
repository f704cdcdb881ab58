"""A CLI test's project: a folder holding one app module, the store in it, and the
command line run as a user types it (``main``, off the event loop)."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from cantata.cli.main import main


def project_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str,
                 source: str) -> Iterator[Path]:
    """The body of a ``project`` fixture: ``tmp_path`` as the working folder, holding
    ``module``.py (``source``) and the store ``c.db``; no app, broker or audit key
    from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("CANTATA_APP", "CANTATA_BROKER", "CANTATA_AUDIT_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CANTATA_STORE", f"sqlite:///{tmp_path}/c.db")
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    yield tmp_path
    sys.modules.pop(module, None)


def store_of(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The body of a ``store`` fixture parametrized ``sqlite`` / ``postgres`` over a
    ``project`` (:func:`project_with`): $CANTATA_STORE, the project's SQLite file or a
    PostgreSQL schema of its own (``pooled_schema``, tests/conftest.py)."""
    if request.param == "postgres":
        from tests.helpers import with_schema

        base: str = request.getfixturevalue("postgres_url")
        schema: str = request.getfixturevalue("pooled_schema")
        monkeypatch.setenv("CANTATA_STORE", with_schema(base, schema))
    return os.environ["CANTATA_STORE"]


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``cantata ARGS``: its exit code, stdout and stderr."""
    code = await asyncio.get_running_loop().run_in_executor(None, main, list(args))
    out, err = capsys.readouterr()
    return code, out, err
